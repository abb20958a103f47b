"""tools/benchmark.py on a tiny model: the table it writes and the memory it reports.

Times are not asserted (they belong to the benchmark); saved-for-backward bytes are exact and
hardware independent, so the memory targets are checked here.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import benchmark

pytestmark = pytest.mark.usefixtures("megatron_single_rank")

HIDDEN = 256


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    argv = [
        *("--hidden-size", str(HIDDEN), "--num-attention-heads", "4", "--seq-length", "16"),
        *("--num-layers", "4", "--vocab-size", "64", "--repeats", "1", "--warmup", "0"),
        *("--streams", "2", "4", "--extras", "recompute", "--output-dir", str(out)),
    ]
    result = benchmark.main(argv)
    assert json.loads((out / "benchmark.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "benchmark.md").read_text()
    assert "| gpt | mHC n=4 +recompute | lean (eager coefficients) |" in table
    assert "- mHC n=4: memory-lean autograd with PyTorch ops" in table
    return result


def test_every_variant_in_every_scope(result):
    names = [(row["scope"], row["variant"]) for row in result["results"]]
    expected = ["residual", "DHC n=2", "DHC n=4", "mHC n=2", "mHC n=4"]
    expected += ["mHC-lite n=2", "mHC-lite n=4"]
    recompute = ["DHC n=4 +recompute", "mHC n=4 +recompute"]  # a chain needs a block
    assert names == [("layer", name) for name in expected] + [
        ("gpt", name) for name in expected + recompute
    ]
    for row in result["results"]:
        if row["variant"] == "residual":
            assert row["time_ratio"] == 1.0 and row["extra_saved_units_per_layer"] == 0.0
        else:
            assert row["parameter_overhead"] > 0 and row["flop_overhead"] > 0
            assert row["step_ms"] > 0


def test_every_row_names_its_backend_and_why(result):
    for row in result["results"]:
        if row["variant"] == "residual":
            assert (row["backend"], row["backend_reason"]) == ("-", "-")
        else:  # CPU: no fused rows, no HC dropout
            assert row["backend"] == "lean (eager coefficients)", row
            assert row["backend_reason"] == "memory-lean autograd with PyTorch ops", row


def test_lean_autograd_saves_at_most_two_n_plus_one_units_per_layer(result):
    for row in result["results"]:
        if row["variant"] == "residual" or "recompute" in row["variant"]:
            continue
        n = row["options"]["num_residual_streams"]
        extra = row["extra_saved_units_per_layer"]
        assert extra == 2 * (n + 1), (row["variant"], extra)


def test_hc_recompute_saves_at_most_three_units_per_layer(result):
    rows = [r for r in result["results"] if r["scope"] == "gpt" and "recompute" in r["variant"]]
    assert rows
    for row in rows:
        extra = row["extra_saved_units_per_layer"]
        assert extra <= 3, (row["variant"], extra)


# Aten ops of one sublayer's hyper-connection, forward + backward, before the coefficients
# were batched (DHC 169, mHC 885 with Sinkhorn's unrolled autograd, mHC-lite 211): the counts
# are hardware independent, so a bound catches a change that adds ops.
OPS_BOUND = {"DHC": 135, "mHC": 442, "mHC-lite": 155}


def test_ops_per_sublayer_are_counted_and_bounded(result):
    for row in result["results"]:
        if row["variant"] == "residual":
            assert row["ops_per_sublayer"] is None and row["ops_forward_backward"] is None
            continue
        forward, backward = row["ops_forward_backward"]
        assert forward > 0 and backward > 0 and row["ops_per_sublayer"] == forward + backward
        kind = row["variant"].split(" n=")[0]
        assert row["ops_per_sublayer"] <= OPS_BOUND[kind], (row["variant"], forward, backward)


def test_demo_preset_is_the_demo_model_and_flags_override_it():
    import demo as demo_tool

    preset = benchmark.parse_args(["--preset", "demo"])
    flags = dict(zip(demo_tool.MODEL_FLAGS[::2], demo_tool.MODEL_FLAGS[1::2], strict=True))
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        assert getattr(preset, name) == int(flags["--" + name.replace("_", "-")]), name
    assert preset.micro_batch_size == int(flags["--micro-batch-size"])
    # The demo's ByteTokenizer: 257 ids, padded to a multiple of 128; FFN 4x hidden.
    assert (preset.vocab_size, preset.ffn_hidden_size) == (384, 512)
    assert benchmark.parse_args(["--preset", "demo", "--clock", "cpu"]).clock == "cpu"
    changed = benchmark.parse_args(["--preset", "demo", "--vocab-size", "8192"])
    assert (changed.vocab_size, changed.hidden_size) == (8192, 128)
    assert benchmark.parse_args([]).hidden_size == 1024


def test_bad_arguments_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--streams", "1", "4"])
    assert "--streams must be >= 2 (mHC needs two streams), got [1]" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            benchmark.parse_args(["--extras", "fused"])
        assert "--extras fused needs a CUDA device and Triton" in capsys.readouterr().err
