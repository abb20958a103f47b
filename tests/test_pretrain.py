"""The pretraining entry point end to end (``megatron.hyper_connections.training``).

A tiny mHC GPT trains for 8 iterations in two gloo processes with PP=2 and the distributed
optimizer, through ``main([...flags])``, on a dataset made here with tools/preprocess_data.py:
its loss is finite and falls, and TensorBoard (and the JSONL log) hold the training scalars and
the stability metrics of every sublayer of both stages. A run started under torchrun and killed
with SIGKILL after its checkpoint of iteration 4, then resumed, logs the same losses as the
uninterrupted run. Every bad input ends with its own usage error before a process group exists
and leaves an existing checkpoint directory byte-identical.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.processes import ProcessTree

ITERATIONS = 8
STALL_AT = 6  # the killed run stalls when it starts this iteration (5 logged, 4 checkpointed)
REPO = Path(__file__).resolve().parents[1]
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _flags(data: str, run: Path) -> list[str]:
    """The tiny run's flags: checkpoints in ``run/save``, logs in ``_log_dir(run)``."""
    return [
        *("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"),
        *("--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"),
        *("--train-iters", str(ITERATIONS), "--lr", "1e-2", "--lr-warmup-iters", "2"),
        *("--lr-decay-style", "cosine", "--log-interval", "1"),
        *("--eval-interval", "4", "--eval-iters", "2"),
        *("--data-path", data, "--split", "90,10,0", "--num-workers", "0"),
        *("--data-cache-path", str(Path(data).parent / "cache")),
        *("--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"),
        *("--use-hyper-connections", "--num-residual-streams", "4"),
        *("--use-manifold-hyper-connections", "--log-mhc-amax"),
        *("--save", str(run / "save"), "--save-interval", "2"),
        *(("--tensorboard-dir", str(run / "tb")) if HAVE_TENSORBOARD else ()),
    ]


def _log_dir(run: Path) -> Path:
    """Where the JSONL log is: the TensorBoard directory, else the checkpoint directory."""
    return run / "tb" if HAVE_TENSORBOARD else run / "save"


def _main(rank: int, world_size: int, argv: list[str]) -> None:
    from megatron.hyper_connections.training.pretrain import main

    main(argv)


def _records(run: Path) -> dict[int, dict[str, float]]:
    """The JSONL log: iteration -> every scalar logged for it (each iteration logged once)."""
    records: dict[int, dict[str, float]] = {}
    for line in (_log_dir(run) / "scalars.jsonl").read_text().splitlines():
        record = json.loads(line)
        iteration = record.pop("iteration")
        assert not set(record) & set(records.get(iteration, {})), f"{iteration} logged twice"
        records.setdefault(iteration, {}).update(record)
    return records


def _losses(run: Path) -> dict[tuple[int, str], float]:
    return {
        (iteration, tag): value
        for iteration, scalars in _records(run).items()
        for tag, value in scalars.items()
        if tag.startswith("lm loss") or tag == "grad-norm"
    }


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ~200 kB slice of the embedded corpus, byte-tokenized: the --data-path prefix."""
    from tools.preprocess_data import main as preprocess

    prefix = tmp_path_factory.mktemp("data") / "corpus"
    flags = ["--input", "embedded", "--embedded-max-bytes", "200000", "--append-eod"]
    preprocess([*flags, "--output-prefix", str(prefix)])
    return f"{prefix}_text_document"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, dataset: str) -> Path:
    """The uninterrupted run's directory (see ``_flags``)."""
    run = tmp_path_factory.mktemp("reference")
    run_distributed(_main, 2, _flags(dataset, run), timeout=300)
    return run


def test_training_loss_is_finite_and_falls(reference_run: Path) -> None:
    records = _records(reference_run)
    assert sorted(records) == list(range(1, ITERATIONS + 1))
    losses = [records[i]["lm loss"] for i in range(1, ITERATIONS + 1)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.5, f"the loss does not fall: {losses}"
    validation = [records[i]["lm loss validation"] for i in (4, 8)]
    assert validation[1] < validation[0], validation


def test_checkpoints_are_complete_and_tracked(reference_run: Path) -> None:
    save = reference_run / "save"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATIONS)
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == [
        f"iter_{i:07d}" for i in (2, 4, 6, 8)
    ]
    for parts in ("model/metadata.json", "optimizer/metadata.json", "train_state.pt"):
        assert (save / "iter_0000008" / parts).is_file(), parts
    assert sorted(p.name for p in (save / "iter_0000008" / "rng").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="needs tensorboard")
def test_tensorboard_holds_training_and_stability_scalars(reference_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    training = {"lm loss", "learning-rate", "grad-norm", "batch-size", "iteration-time"}
    assert training | {"tokens-per-second", "lm loss validation"} <= tags
    # Every sublayer of both pipeline stages (layer 0 on the first, layer 1 on the second).
    sublayers = ["layer_00_attn", "layer_00_mlp", "layer_01_attn", "layer_01_mlp"]
    for direction in ("forward", "backward"):
        for kind in ("h_res_mean_matrix", "h_res_per_token"):
            for sublayer in [*sublayers, "max"]:
                assert f"hyper-connections/{direction}_gain/{kind}/{sublayer}" in tags
        for kind in ("composite_mean_matrix", "composite_per_token"):
            for sublayer in [*sublayers, "max"]:
                assert f"hyper-connections/{direction}_gain/{kind}/{sublayer}" in tags
    assert {f"hyper-connections/log_amax/{s}" for s in sublayers} <= tags

    steps = [event.step for event in events.Scalars("lm loss")]
    assert steps == list(range(1, ITERATIONS + 1))
    # mHC's H_res is doubly stochastic: forward gains 1, the composites' gains about 1.
    for event in events.Scalars("hyper-connections/forward_gain/composite_per_token/layer_00_attn"):
        assert event.value == pytest.approx(1.0, abs=1e-3)
    for event in events.Scalars("hyper-connections/log_amax/layer_01_mlp"):
        assert event.value == pytest.approx(0.0, abs=1e-3)


# Stalls the run when it starts iteration STALL_AT, so that the test kills it at a known point.
DRIVER = f"""
import sys, time
from megatron.hyper_connections.training import pretrain

train_step, steps = pretrain.train_step, []

def stalling_train_step(*args):
    steps.append(None)
    if len(steps) == {STALL_AT}:
        time.sleep(600)
    return train_step(*args)

if __name__ == "__main__":
    pretrain.train_step = stalling_train_step
    pretrain.main(sys.argv[1:])
"""


def test_run_killed_after_a_checkpoint_resumes_with_the_same_losses(
    reference_run: Path, dataset: str, tmp_path: Path
) -> None:
    save = tmp_path / "save"
    driver = tmp_path / "stalling_pretrain.py"
    driver.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(driver), *_flags(dataset, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed.log"
    # Leaving the block kills whatever is left of the run, however the test ends.
    with (
        log.open("w") as output,
        ProcessTree(command, cwd=REPO, env=env, stdout=output, stderr=output) as run,
    ):
        deadline = time.monotonic() + 240
        tracker = save / "latest_checkpointed_iteration.txt"
        while not (
            tracker.is_file()
            and tracker.read_text().strip() == "4"
            and STALL_AT - 1 in _safe_records(tmp_path)
        ):
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach its checkpoint"
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before it was killed"
        # As in a crash: torchrun and both ranks get SIGKILL at once (and are gone after it).
        killed = run.kill()
    assert run.returncode == -signal.SIGKILL
    torchrun = [command for command in killed.values() if "torch.distributed.run" in command]
    ranks = [c for c in killed.values() if str(driver) in c and c not in torchrun]
    assert (len(torchrun), len(ranks)) == (1, 2), f"not torchrun and its 2 ranks: {killed}"
    assert _records(tmp_path).keys() == set(range(1, STALL_AT))

    resumed = [*_flags(dataset, tmp_path), "--load", str(save)]
    run_distributed(_main, 2, resumed, timeout=300)

    # Iteration 5, logged by the killed run after its checkpoint, was dropped and logged anew.
    assert _losses(tmp_path) == _losses(reference_run)
    if HAVE_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        steps = [event.step for event in events.Scalars("lm loss")]
        assert steps == list(range(1, ITERATIONS + 1)), "TensorBoard kept the lost iteration 5"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATIONS)


def _safe_records(run: Path) -> dict[int, dict[str, float]]:
    try:
        return _records(run)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half written
        return {}


def _word_level_tokenizer(path: Path) -> Path:
    """A Hugging Face tokenizer.json with 10 ids (the data's byte ids go up to 256)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {token: i for i, token in enumerate(["</s>", "<unk>", *"abcdefgh"])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.save(str(path))
    return path


BAD_INPUTS = {
    "unknown flag": (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    "bf16 and fp16": (
        ["--bf16", "--fp16"],
        "--bf16 and --fp16 are exclusive: give at most one of them",
    ),
    "global batch": (
        ["--pipeline-model-parallel-size", "1", "--global-batch-size", "6"],
        "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2 "
        "= 4: use a multiple of 4",
    ),
    "layers per stage": (
        ["--num-layers", "3"],
        "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2: each pipeline "
        "stage holds the same number of layers",
    ),
    "model config": (
        ["--num-fracs", "2"],
        "invalid model configuration: num_fracs=2 has no effect on mHC (it is an option of HC): "
        "leave num_fracs at its default 1 (flags: --num-fracs)",
    ),
    "bad value": (
        ["--hidden-dropout", "1.5"],
        "argument --hidden-dropout: '1.5' is not a number in [0, 1)",
    ),
    "missing data": (
        ["--data-path", "{tmp}/missing"],
        "--data-path: data prefix {tmp}/missing: no {tmp}/missing.bin or {tmp}/missing.idx (a "
        "prefix names the files without the .bin/.idx suffix)",
    ),
    "missing tokenizer file": (
        ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{tmp}/none.json"],
        "--tokenizer-model: no such file: {tmp}/none.json",
    ),
    "tokenizer smaller than the data": (
        ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{tmp}/small.json"],
        "--tokenizer-type HuggingFaceTokenizer does not fit --data-path: the data at {data} "
        "holds token id 256 but the tokenizer's vocabulary has only 10 entries",
    ),
    "padded vocabulary of the checkpoint": (
        ["--pipeline-model-parallel-size", "1", "--tensor-model-parallel-size", "2"],
        "--load {save}: the checkpoint pads the vocabulary to 384 ids, this run to 512 "
        "(--make-vocab-size-divisible-by 128 x --tensor-model-parallel-size 2): choose "
        "--make-vocab-size-divisible-by so that they agree",
    ),
    "broken checkpoint tracker": (
        ["--load", "{tmp}/broken"],
        "--load {tmp}/broken: latest_checkpointed_iteration.txt holds 'latest', not an "
        "iteration number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_start_and_leaves_checkpoints_alone(
    case: str,
    reference_run: Path,
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from megatron.hyper_connections.training import distributed, pretrain

    if case == "tokenizer smaller than the data":
        _word_level_tokenizer(tmp_path / "small.json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "latest_checkpointed_iteration.txt").write_text("latest\n")
    extra, message = BAD_INPUTS[case]
    extra = [flag.format(tmp=tmp_path) for flag in extra]
    save = reference_run / "save"
    message = message.format(tmp=tmp_path, data=dataset, save=save)
    before = _tree(reference_run)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it for the two stages

    def no_set_up(*args: object, **kwargs: object) -> None:
        raise AssertionError("process groups were being set up")

    monkeypatch.setattr(distributed, "initialize_distributed", no_set_up)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*_flags(dataset, reference_run), "--load", str(save), *extra])

    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"megatron-hc-pretrain: error: {message}"
    assert _tree(reference_run) == before
