"""The trainer's checkpoints: their directory layout, the tracker file, save and resume.

Megatron-LM's names where it has them::

    <save>/latest_checkpointed_iteration.txt   iteration of the last complete checkpoint
    <save>/iter_0000100/model/                 the package's save_checkpoint (any TP/PP layout)
    <save>/iter_0000100/optimizer/             the optimizer's sharded state (dist_checkpointing)
    <save>/iter_0000100/train_state.pt         iteration, consumed samples, LR schedule, flags
    <save>/iter_0000100/rng/rank_00000.pt      each rank's random number generator states

A checkpoint is written under a temporary name, renamed once every rank has written its part,
and only then named in the tracker file, so a run killed at any moment leaves the previous
checkpoint intact as the latest. A resumed run continues the data where it stopped and
restores the random states, so its losses are those of an uninterrupted run.

What goes wrong is found before a process group exists (``checks``): ``resume_iteration`` is
the tracker's iteration or ``--ckpt-step``; ``check_checkpoint_files`` reads the small files
and checks every tensor file against the sizes its ``dist_checkpointing`` metadata records, so
a truncated file is named up front. ``save_training_checkpoint`` refuses a model with a
non-finite parameter, and ``locked_save_directory`` keeps a second run from saving into the
same ``--save``.

The model's part is the package's ``checkpointing`` (megatron-core ``dist_checkpointing`` and
the HC record); this module adds what resuming a training run needs around it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import random
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.utils import unwrap_model

from ..checkpointing import load_checkpoint, save_checkpoint
from .exits import NonFiniteError
from .parser import UsageError, args_as_dict

__all__ = [
    "LOCK_FILE",
    "TRACKER_FILE",
    "TRAIN_STATE_FILE",
    "TrainState",
    "check_checkpoint_files",
    "checkpoint_iteration",
    "checkpoint_path",
    "complete_iterations",
    "is_complete",
    "load_training_checkpoint",
    "locked_save_directory",
    "resume_iteration",
    "save_training_checkpoint",
    "saved_train_state",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's name for the file in a checkpoint directory that holds the last iteration."""

TRAIN_STATE_FILE = "train_state.pt"
"""The file of a checkpoint that rank 0 writes last: a checkpoint without it is incomplete."""

LOCK_FILE = ".lock"
"""The file in ``--save`` that the saving run holds a lock on (and names itself in)."""

# megatron-core's distributed-optimizer checkpoint format (Megatron-LM's default): every rank
# writes its own shard in parallel.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    iteration: int = 0
    consumed_train_samples: int = 0


def checkpoint_path(checkpoint_dir: str | os.PathLike, iteration: int) -> Path:
    """The directory of iteration ``iteration``'s checkpoint (Megatron-LM's naming)."""
    return Path(checkpoint_dir) / f"iter_{iteration:07d}"


def checkpoint_iteration(checkpoint_dir: str | os.PathLike) -> int | None:
    """The iteration of the last complete checkpoint in ``checkpoint_dir``, None if it holds
    none (a run that starts anew); ``UsageError`` if its tracker file is broken."""
    tracker = Path(checkpoint_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise UsageError(
            f"--load {checkpoint_dir}: {TRACKER_FILE} holds {text!r}, not an iteration number"
        )
    iteration = int(text)
    if not is_complete(checkpoint_dir, iteration):
        raise UsageError(
            f"--load {checkpoint_dir}: {TRACKER_FILE} names iteration {iteration}, but "
            f"{checkpoint_path(checkpoint_dir, iteration)} is not a complete checkpoint"
        )
    return iteration


def resume_iteration(args: argparse.Namespace) -> int | None:
    """The iteration a run with ``args`` resumes from: ``--ckpt-step`` if given, else the
    last complete one in ``--load``; None without ``--load`` or a checkpoint there.
    ``UsageError`` for a broken tracker or a ``--ckpt-step`` with no complete checkpoint."""
    if args.load is None:
        return None
    if args.ckpt_step is None:
        return checkpoint_iteration(args.load)
    if not is_complete(args.load, args.ckpt_step):
        found = ", ".join(map(str, complete_iterations(args.load))) or "none"
        raise UsageError(
            f"--ckpt-step {args.ckpt_step}: no complete checkpoint of iteration "
            f"{args.ckpt_step} in --load {args.load} (complete ones: {found})"
        )
    return args.ckpt_step


def is_complete(checkpoint_dir: str | os.PathLike, iteration: int) -> bool:
    """Whether ``checkpoint_dir`` holds a complete checkpoint of iteration ``iteration``."""
    return (checkpoint_path(checkpoint_dir, iteration) / TRAIN_STATE_FILE).is_file()


def complete_iterations(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The iterations of the complete checkpoints in ``checkpoint_dir``, in order."""
    numbers = (path.name.removeprefix("iter_") for path in Path(checkpoint_dir).glob("iter_*"))
    return sorted(int(n) for n in numbers if n.isdigit() and is_complete(checkpoint_dir, int(n)))


def saved_train_state(checkpoint_dir: str | os.PathLike, iteration: int) -> dict[str, Any]:
    """What ``save_training_checkpoint`` wrote for iteration ``iteration``: ``iteration``,
    ``consumed_train_samples``, ``scheduler``, ``world_size`` and ``args`` (the run's flags).
    ``UsageError`` naming the file if it cannot be read."""
    return _read(checkpoint_path(checkpoint_dir, iteration) / TRAIN_STATE_FILE)


def check_checkpoint_files(
    checkpoint_dir: str | os.PathLike,
    iteration: int,
    rank: int,
    world_size: int,
    with_optimizer: bool = True,
) -> None:
    """Raise ``UsageError`` naming the first file of iteration ``iteration``'s checkpoint that
    a resume by rank ``rank`` of ``world_size`` could not read: ``train_state.pt``, the
    ``dist_checkpointing`` metadata and common state of ``model/`` (and ``optimizer/``), every
    tensor file they refer to (missing, or shorter than the data recorded in it), and this
    rank's random states when the number of ranks is unchanged. Reads no tensor data."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = checkpoint_path(checkpoint_dir, iteration)
    saved = saved_train_state(checkpoint_dir, iteration)
    for part in ("model", "optimizer") if with_optimizer else ("model",):
        folder = directory / part
        try:
            metadata = FileSystemReader(str(folder)).read_metadata()
        except Exception as error:  # a pickle cut short raises anything
            raise UsageError(
                f"{folder / '.metadata'}: cannot be read ({_reason(error)})"
            ) from error
        # The common (non-tensor) state: common.pt from older megatron-core releases; newer
        # ones keep it in the checkpoint itself, as the sharded object "common_state".
        common = folder / "common.pt"
        if common.exists() or not any(
            index.fqn.startswith("common_state/") for index in metadata.storage_data
        ):
            _read(common)
        needed: dict[str, int] = {}
        for item in metadata.storage_data.values():
            end = item.offset + item.length
            needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
        for name, size in sorted(needed.items()):
            path = folder / name
            if not path.is_file():
                raise UsageError(f"{path}: missing (its checkpoint's metadata refers to it)")
            if path.stat().st_size < size:
                raise UsageError(
                    f"{path}: {path.stat().st_size} bytes, but the checkpoint's metadata "
                    f"records {size}: the file is truncated"
                )
    if saved["world_size"] == world_size:
        _read(directory / "rng" / f"rank_{rank:05d}.pt")


def _read(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; ``UsageError`` naming the file if it fails."""
    if not path.is_file():
        raise UsageError(f"{path}: missing")
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # EOFError, RuntimeError, UnpicklingError, ...
        raise UsageError(f"{path}: cannot be read ({_reason(error)})") from error


def _reason(error: BaseException) -> str:
    text = str(error).split("\n")[0].split(". ")[0].strip()  # its first sentence
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def locked_save_directory(save: str | os.PathLike | None) -> Iterator[None]:
    """An exclusive lock on the checkpoint directory ``save`` while the block runs (nothing
    for None). Taken by one process of a run, global rank 0.

    ``flock`` on ``<save>/.lock``: the kernel (or the file server) releases it when the
    process ends, however it ends, so a run killed or preempted never blocks the next one.
    ``UsageError`` naming the holder if another run holds it. On a file system without locks
    the run goes on unlocked."""
    if save is None:
        yield
        return
    path = Path(save) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise UsageError(
                    f"--save {save}: another run is saving there ({holder} holds {path}): "
                    "give each run its own --save directory"
                ) from None
            print(
                f"warning: --save {save}: no lock on {path} ({error.strerror}): a second run on "
                "it would not be refused",
                flush=True,
            )
        else:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        yield  # the lock goes with the file when it is closed; the file stays (see above)


# --------------------------------------------------------------------------------------------
# Save and resume: the package's model checkpoint, plus what resuming needs


def save_training_checkpoint(
    args: argparse.Namespace, state: TrainState, model: list, optimizer: Any, scheduler: Any
) -> None:
    """Write the checkpoint of ``state.iteration`` into ``--save`` (see the module
    docstring): staged under a temporary name, then renamed and named in the tracker file.
    Collective. Raises ``NonFiniteError``, before writing anything, if a parameter of the
    model is NaN or infinite on any rank."""
    if not _model_is_finite(model):
        raise NonFiniteError(
            f"iteration {state.iteration}: the model holds non-finite (NaN or inf) parameters; "
            f"not saved, so {Path(args.save) / TRACKER_FILE} still names the last finite "
            "checkpoint"
        )
    rank = dist.get_rank()
    final = checkpoint_path(args.save, state.iteration)
    staging = final.with_name(f".{final.name}.incomplete")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        (staging / "rng").mkdir(parents=True)
        (staging / "optimizer").mkdir()
    dist.barrier()
    save_checkpoint(model, staging / "model")
    optimizer_state = optimizer.sharded_state_dict(
        _model_sharded_state_dict(model), metadata=OPTIMIZER_METADATA
    )
    dist_checkpointing.save({"optimizer": optimizer_state}, str(staging / "optimizer"))
    torch.save(_rng_states(), staging / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(
            {
                "iteration": state.iteration,
                "consumed_train_samples": state.consumed_train_samples,
                "scheduler": scheduler.state_dict(),
                "world_size": dist.get_world_size(),
                "args": args_as_dict(args),
            },
            staging / TRAIN_STATE_FILE,
        )
    dist.barrier()  # every rank's part is on disk
    if rank == 0:
        if final.exists():  # the same iteration from an earlier run: replace it whole
            replaced = final.with_name(f".{final.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            os.replace(staging, final)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, final)
        tracker = Path(args.save) / TRACKER_FILE
        tracker.with_suffix(".tmp").write_text(f"{state.iteration}\n", encoding="utf-8")
        os.replace(tracker.with_suffix(".tmp"), tracker)
    dist.barrier()


def load_training_checkpoint(
    args: argparse.Namespace, model: list, optimizer: Any, scheduler: Any
) -> TrainState:
    """Restore the last complete checkpoint in ``--load``: the weights (any TP/PP layout), the
    optimizer state unless ``--no-load-optim``, the learning-rate schedule, the random states
    (when the number of ranks is unchanged) and the data position. Collective."""
    iteration = resume_iteration(args)
    directory = checkpoint_path(args.load, iteration)
    load_checkpoint(model, directory / "model")
    if args.no_load_optim:
        optimizer.reload_model_params()  # fp32 main weights from the loaded ones
    else:
        _initialize_adam_state(optimizer)
        sharded = optimizer.sharded_state_dict(
            _model_sharded_state_dict(model), is_loading=True, metadata=OPTIMIZER_METADATA
        )
        loaded = dist_checkpointing.load({"optimizer": sharded}, str(directory / "optimizer"))
        with torch.no_grad():  # it copies into the fp32 main weights, which are leaves
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    saved = saved_train_state(args.load, iteration)
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = directory / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if saved["world_size"] == dist.get_world_size():
        _restore_rng_states(torch.load(rng_file, weights_only=True))
    return TrainState(saved["iteration"], saved["consumed_train_samples"])


def _model_is_finite(model: list) -> bool:
    """Whether every parameter of every rank's chunks is finite (a collective)."""
    finite = torch.ones((), device=_device())
    for chunk in model:
        for param in chunk.parameters():
            finite *= torch.isfinite(param).all()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def _torch_adams(optimizer: Any) -> list[tuple[Any, torch.optim.Optimizer]]:
    """(megatron optimizer, torch Adam) pairs of megatron-core's distributed optimizer when it
    runs torch's Adam (no Apex or Transformer Engine, e.g. on a CPU), whose checkpoints
    megatron-core 0.16.1 mishandles; see ``load_training_checkpoint``."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [
        (inner, inner.optimizer)
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(inner, DistributedOptimizer) and isinstance(inner.optimizer, torch.optim.Adam)
    ]


def _initialize_adam_state(optimizer: Any) -> None:
    """Zero Adam moments and step 0 for a new distributed optimizer: megatron-core reads every
    parameter's ``step`` while it builds the state dict to load into, and a new one has none."""
    for inner, adam in _torch_adams(optimizer):
        if not adam.state:
            inner.init_state_fn(adam, inner.config)
            for state in adam.state.values():
                state.setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer: Any) -> None:
    """Each parameter's Adam step from its loaded parameter group: megatron-core restores the
    group's ``step`` but then copies the step the parameter had before loading over it."""
    for _, adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if "step" in group and "step" in adam.state[param]:
                    adam.state[param]["step"] = torch.tensor(float(group["step"]))


def _model_sharded_state_dict(model: list) -> dict:
    """The model's sharded state dict, which names the optimizer's state of each parameter."""
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(unwrap_model(model))}


def _rng_states() -> dict[str, Any]:
    numpy_state = numpy.random.get_state()
    return {
        "python": random.getstate(),
        # As plain values, so that torch.load(weights_only=True) reads them.
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "megatron": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["megatron"])
