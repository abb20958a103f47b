"""The pretraining entry point end to end (``megatron.hyper_connections.training``).

A tiny mHC GPT trains for 8 iterations in two gloo processes with PP=2 and the distributed
optimizer, through ``main([...flags])``, on a dataset made here with tools/preprocess_data.py:
its loss is finite and falls, and TensorBoard (and the JSONL log) hold the training scalars and
the stability metrics of every sublayer of both stages. A run started under torchrun and killed
with SIGKILL after its checkpoint of iteration 4, then resumed, logs the same losses as the
uninterrupted run. Every bad input ends with its own usage error before a process group exists
and leaves an existing checkpoint directory byte-identical.

Faults and restarts, each through the real entry point: a run that diverges stops at the
first non-finite loss, before the update, and its last checkpoint is finite; a run under
torchrun that gets SIGTERM (every process of it, as SLURM sends it) finishes its step, saves
and exits, a second run on its --save is refused meanwhile, and resumed over a partial last
line of its JSONL log it logs the losses of the uninterrupted run until --exit-interval saves
and ends it; a stopped rank ends the job after --distributed-timeout-minutes; a changed
schedule, a checkpoint of another model, and each damaged dataset or checkpoint file are
refused before a process group exists.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.processes import ProcessTree, child_environment

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
    env = child_environment(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = tmp_path / "killed.log"
    # Leaving the block kills whatever is left of the run, however the test ends.
    with (
        log.open("w") as output,
        ProcessTree(command, cwd=REPO, env=env, stdout=output, stderr=output) as run,
    ):
        _wait_until_stalled(run, save, tmp_path, log)
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


def _wait_until_stalled(run: ProcessTree, save: Path, run_dir: Path, log: Path) -> None:
    """Until the stalling run has checkpointed iteration 4 and logged the one before it stalls
    (it must not end before)."""
    deadline = time.monotonic() + 240
    tracker = save / "latest_checkpointed_iteration.txt"
    while not (
        tracker.is_file()
        and tracker.read_text().strip() == "4"
        and STALL_AT - 1 in _safe_records(run_dir)
    ):
        assert run.poll() is None, _tail(log)
        assert time.monotonic() < deadline, "the run did not reach its checkpoint"
        time.sleep(0.2)


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
    "changed schedule": (
        ["--train-iters", "12", "--lr", "5e-3"],
        "--load {save}: this run's learning-rate schedule is not the one of the checkpoint of "
        "iteration 8: --lr 0.01 in the checkpoint, 0.005 in this run; --lr-decay-iters "
        "(default: --train-iters) 8 in the checkpoint, 12 in this run: give "
        "--override-opt_param-scheduler to follow this run's flags from iteration 8 on, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule",
    ),
    "both schedules": (
        ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
        "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are "
        "exclusive: take the learning-rate schedule from this run's flags or from the "
        "checkpoint, not both",
    ),
    "checkpoint of a shorter model": (
        ["--seq-length", "64"],
        "--load {save}: the checkpoint of iteration 8 was made for another model: "
        "--max-position-embeddings (default: --seq-length) 32 in the checkpoint, 64 in this "
        "run: give the flags it was made with (its train_state.pt records them), or leave out "
        "--load to start anew",
    ),
    "checkpoint with tied embeddings": (
        ["--untie-embeddings-and-output-weights"],
        "--load {save}: the checkpoint of iteration 8 was made for another model: "
        "--untie-embeddings-and-output-weights False in the checkpoint, True in this run: give "
        "the flags it was made with (its train_state.pt records them), or leave out --load to "
        "start anew",
    ),
    "no such checkpoint step": (
        ["--ckpt-step", "5"],
        "--ckpt-step 5: no complete checkpoint of iteration 5 in --load {save} (complete ones: "
        "2, 4, 6, 8)",
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


# --------------------------------------------------------------------------------------------
# Faults and restarts


def _no_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make setting up a process group fail the test: the checks come first."""
    from megatron.hyper_connections.training import distributed

    def no_set_up(*args: object, **kwargs: object) -> None:
        raise AssertionError("process groups were being set up")

    monkeypatch.setattr(distributed, "initialize_distributed", no_set_up)


def _refusal(argv: list[str], capsys: pytest.CaptureFixture, status: int = 2) -> str:
    """The last line of what ``main(argv)`` says when it exits with ``status``."""
    from megatron.hyper_connections.training import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    assert exit_info.value.code == status
    return capsys.readouterr().err.splitlines()[-1]


def _finish(run: ProcessTree, log: Path, seconds: float) -> int:
    """Wait for ``run`` to end by itself within ``seconds``; its exit status."""
    deadline = time.monotonic() + seconds
    while run.poll() is None:
        assert time.monotonic() < deadline, f"still running after {seconds} s:\n" + _tail(log)
        time.sleep(0.2)
    return run.returncode


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _diverging_flags(data: str, run: Path) -> list[str]:
    """The issue's diverging run: DHC x4, --lr 1e4 without clipping, a checkpoint per step."""
    return [
        *("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"),
        *("--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "4"),
        *("--lr", "1e4", "--clip-grad", "0", "--log-interval", "1", "--eval-iters", "0"),
        *("--data-path", data, "--split", "100,0,0", "--num-workers", "0"),
        *("--data-cache-path", str(Path(data).parent / "cache")),
        *("--use-hyper-connections", "--num-residual-streams", "4"),
        *("--save", str(run / "save"), "--save-interval", "1"),
    ]


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory: pytest.TempPathFactory, dataset: str) -> tuple[Path, int]:
    """The diverging run, one process through ``python -m``: (its directory, exit status)."""
    run = tmp_path_factory.mktemp("diverged")
    command = [sys.executable, "-m", "megatron.hyper_connections.training.pretrain"]
    env = child_environment(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = run / "console.log"
    with (
        log.open("w") as output,
        ProcessTree(
            [*command, *_diverging_flags(dataset, run)],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=output,
        ) as tree,
    ):
        status = _finish(tree, log, 300)
    return run, status


def test_non_finite_loss_stops_before_the_update_and_the_last_checkpoint_is_finite(
    diverged_run: tuple[Path, int],
) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run, status = diverged_run
    console = (run / "console.log").read_text()
    assert status == 1, _tail(run / "console.log")
    found = re.search(
        r"^megatron-hc-pretrain: error: iteration (\d+): the (loss|gradient) is not finite "
        r"\(NaN or inf\); stopped before the update \(--check-for-nan-in-loss-and-grad\), so "
        r"the model and its last checkpoint are finite: lower --lr or clip the gradients "
        r"\(--clip-grad\) and resume with --load, or give --no-check-for-nan-in-loss-and-grad "
        r"to train on regardless$",
        console,
        re.MULTILINE,
    )
    assert found, _tail(run / "console.log")
    stopped_at = int(found.group(1))
    assert stopped_at > 1  # the first step is fine, its update of lr 1e4 is not
    save = run / "save"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped_at - 1)
    assert sorted(p.name for p in save.glob("iter_*")) == [
        f"iter_{i:07d}" for i in range(1, stopped_at)
    ]
    for part in ("model", "optimizer"):
        converted = run / f"{part}.pt"
        dcp_to_torch_save(save / f"iter_{stopped_at - 1:07d}" / part, converted)
        tensors = [
            value
            for value in _leaves(torch.load(converted, weights_only=False))
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        ]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), part


def _leaves(tree: object) -> list:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def test_no_tanh_model_refuses_a_tanh_checkpoint_before_set_up(
    diverged_run: tuple[Path, int],
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    run, _ = diverged_run
    save = run / "save"
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    _no_set_up(monkeypatch)
    flags = [*_diverging_flags(dataset, tmp_path), "--load", str(save)]
    assert _refusal([*flags, "--hyper-connections-no-tanh"], capsys) == (
        f"megatron-hc-pretrain: error: --load {save}: the checkpoint of iteration {iteration} "
        "was made for another model: --hyper-connections-no-tanh (hyper_connections_tanh) True "
        "in the checkpoint, False in this run: give the flags it was made with (its "
        "train_state.pt records them), or leave out --load to start anew"
    )


def _truncate(path: Path, size: int = 10) -> Path:
    with path.open("r+b") as file:
        file.truncate(size)
    return path


# Each case damages a copy of the reference run (checkpoints in {save}, its log) or of the
# dataset (prefix {data}) and gives the message that refuses it; {file} is the damaged file.
DAMAGED = {
    "truncated train_state.pt": (
        "iter_0000008/train_state.pt",
        "--load {save}: the checkpoint of iteration 8 is damaged: {file}: cannot be read "
        "(RuntimeError: PytorchStreamReader failed reading zip archive: not a ZIP archive); give "
        "--ckpt-step N to resume from another checkpoint (complete ones: 2, 4, 6)",
    ),
    "truncated tensor file": (
        "iter_0000008/model/__0_0.distcp",
        "--load {save}: the checkpoint of iteration 8 is damaged: {file}: 10 bytes, but the "
        "checkpoint's metadata records {size}: the file is truncated; give --ckpt-step N to "
        "resume from another checkpoint (complete ones: 2, 4, 6)",
    ),
    "truncated optimizer metadata": (
        "iter_0000008/optimizer/.metadata",
        "--load {save}: the checkpoint of iteration 8 is damaged: {file}: cannot be read "
        "(UnpicklingError: pickle data was truncated); give --ckpt-step N to resume from "
        "another checkpoint (complete ones: 2, 4, 6)",
    ),
    "broken log line": (
        "log",
        "{log_flag} {log_dir}: {file} line 2 is not a JSON record: {reason}: repair or remove "
        "the file (a resumed run keeps the records up to iteration 8 and appends to them)",
    ),
    "corrupt index header": (
        "data.idx",
        "--data-path: {file}: not a megatron-core index (it starts with b'XXXXIDX\\x00\\x00', "
        "not b'MMIDIDX\\x00\\x00'): the file is corrupt, or not an .idx",
    ),
    "truncated index": (
        "data.idx",
        "--data-path: {file}: 40 bytes, but its header announces {sequences} sequences and "
        "{documents} documents, which take {size} bytes: the file is truncated or corrupt",
    ),
    "truncated data file": (
        "data.bin",
        "--data-path: {file}: 1000 bytes, but {data}.idx places its last sequence at bytes "
        "{last} to {size}: the data file is cut short, or the two files do not belong together",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_files_stop_before_start(
    case: str,
    reference_run: Path,
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    save = tmp_path / "save"
    shutil.copytree(reference_run / "save", save)
    if HAVE_TENSORBOARD:
        shutil.copytree(reference_run / "tb", tmp_path / "tb")
    data = str(tmp_path / "data" / "corpus")
    (tmp_path / "data").mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(dataset + suffix, data + suffix)
    target, message = DAMAGED[case]
    values = {"save": save, "data": data, "log_dir": _log_dir(tmp_path)}
    values["log_flag"] = "--tensorboard-dir" if HAVE_TENSORBOARD else "--save"
    if target == "log":
        file = _log_dir(tmp_path) / "scalars.jsonl"
        lines = file.read_text().splitlines(keepends=True)
        lines[1] = lines[1][:-9] + "\n"  # its end lost, the records after it kept
        file.write_text("".join(lines))
        with pytest.raises(json.JSONDecodeError) as raised:
            json.loads(lines[1][:-1])
        values["reason"] = str(raised.value)
    elif target.startswith("data"):
        file = Path(data + target.removeprefix("data"))
        indexed = IndexedDataset(data)  # referenced: it unmaps its arrays when collected
        index = indexed.index
        sequences = len(index.sequence_lengths)
        last_start = int(index.sequence_pointers[-1])
        last_end = last_start + int(index.sequence_lengths[-1]) * index.dtype_size
        del index, indexed  # before the file changes under its memory map
        if case == "corrupt index header":
            with file.open("r+b") as stream:
                stream.write(b"XXXX")
        elif case == "truncated index":
            values.update(sequences=sequences, documents=sequences, size=34 + 20 * sequences + 8)
            _truncate(file, 40)
        else:
            values.update(last=last_start, size=last_end)
            _truncate(file, 1000)
    else:
        file = save / target
        values["size"] = file.stat().st_size
        _truncate(file)
    values["file"] = file
    _no_set_up(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it for the two stages
    argv = [*_flags(data, tmp_path), "--load", str(save)]
    expected = message.format(**values)
    assert _refusal(argv, capsys) == f"megatron-hc-pretrain: error: {expected}"

    if case == "truncated tensor file":  # another complete checkpoint passes every check
        with pytest.raises(AssertionError, match="process groups were being set up"):
            from megatron.hyper_connections.training import pretrain

            pretrain.main([*argv, "--ckpt-step", "6"])


# Stalls both ranks when they start iteration STALL_AT until the file RELEASE exists.
WAITING_DRIVER = f"""
import os, sys, time
from megatron.hyper_connections.training import pretrain

train_step, steps = pretrain.train_step, []

def waiting_train_step(*args):
    steps.append(None)
    while len(steps) == {STALL_AT} and not os.path.exists(os.environ["RELEASE"]):
        time.sleep(0.05)
    return train_step(*args)

if __name__ == "__main__":
    pretrain.train_step = waiting_train_step
    pretrain.main(sys.argv[1:])
"""


def test_sigterm_saves_and_exits_and_the_run_resumes_with_the_same_losses(
    reference_run: Path,
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import psutil

    save = tmp_path / "save"
    driver = tmp_path / "waiting_pretrain.py"
    driver.write_text(WAITING_DRIVER)
    flags = _flags(dataset, tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(driver), *flags, "--exit-signal-handler"]
    env = child_environment(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # torchrun passes SIGTERM on and SIGKILLs a rank still running this long after.
    env.update(RELEASE=str(tmp_path / "release"), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")
    log = tmp_path / "terminated.log"
    with (
        log.open("w") as output,
        ProcessTree(command, cwd=REPO, env=env, stdout=output, stderr=output) as run,
    ):
        _wait_until_stalled(run, save, tmp_path, log)

        # Meanwhile a second run on the same --save is refused (rank 0 takes the lock).
        _no_set_up(monkeypatch)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        refused = _refusal(flags, capsys)
        assert re.fullmatch(
            rf"megatron-hc-pretrain: error: --save {re.escape(str(save))}: another run is "
            rf"saving there \(pid \d+ on \S+ holds {re.escape(str(save))}/\.lock\): give each "
            "run its own --save directory",
            refused,
        ), refused
        monkeypatch.undo()

        # As SLURM does at a time limit: SIGTERM to every process of the job step at once.
        everyone = [psutil.Process(run.popen.pid), *psutil.Process(run.popen.pid).children(True)]
        for process in everyone:
            process.send_signal(signal.SIGTERM)
        (tmp_path / "release").touch()
        _finish(run, log, 240)
    tracker = save / "latest_checkpointed_iteration.txt"
    console = log.read_text()
    assert console.count("exiting after receiving SIGTERM (--exit-signal-handler)") == 1, _tail(log)
    assert tracker.read_text().strip() == str(STALL_AT), _tail(log)  # the step it finished
    assert _records(tmp_path).keys() == set(range(1, STALL_AT + 1))

    # A run killed while writing its log leaves a partial line: the resumed run drops it.
    with (_log_dir(tmp_path) / "scalars.jsonl").open("a") as jsonl:
        jsonl.write('{"iteration": 7, "lm loss": 5.')
    run_distributed(_main, 2, [*flags, "--load", str(save), "--exit-interval", "7"], timeout=300)

    assert tracker.read_text().strip() == "7"  # --exit-interval saves and exits too
    reference = {key: value for key, value in _losses(reference_run).items() if key[0] <= 7}
    assert _losses(tmp_path) == reference


def test_a_stopped_rank_ends_the_job_after_the_timeout(dataset: str, tmp_path: Path) -> None:
    import psutil

    timeout_minutes = 0.25
    flags = [*_flags(dataset, tmp_path)[: _flags(dataset, tmp_path).index("--save")]]
    flags += ["--train-iters", "1000", "--eval-iters", "0"]
    flags += ["--distributed-timeout-minutes", str(timeout_minutes)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "megatron.hyper_connections.training.pretrain"]
    env = child_environment(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "2"  # torchrun: SIGTERM, then SIGKILL 2 s later
    log = tmp_path / "stopped.log"
    with (
        log.open("w") as output,
        ProcessTree([*command, *flags], cwd=REPO, env=env, stdout=output, stderr=output) as run,
    ):
        deadline = time.monotonic() + 240
        while not re.search(r"^iteration +3/", log.read_text(errors="replace"), re.MULTILINE):
            assert run.poll() is None, _tail(log)
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        ranks = [
            child
            for child in psutil.Process(run.popen.pid).children()
            if "megatron.hyper_connections.training.pretrain" in " ".join(child.cmdline())
        ]
        assert len(ranks) == 2, ranks
        first_stage = min(ranks, key=lambda rank: rank.environ()["RANK"])
        first_stage.suspend()  # SIGSTOP: alive, but it never answers again
        stopped = time.monotonic()
        status = _finish(run, log, 60 * timeout_minutes + 120)
        waited = time.monotonic() - stopped
    assert status != 0
    assert 60 * timeout_minutes - 5 < waited < 60 * timeout_minutes + 90, waited
    assert (
        "megatron-hc-pretrain: error: rank 1: a collective waited longer than "
        "--distributed-timeout-minutes 0.25 for another rank (hung, stopped or gone); the job "
        "ends"
    ) in log.read_text(), _tail(log)
