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

The model's part is the package's ``checkpointing`` (megatron-core ``dist_checkpointing`` and
the HC record); this module adds what resuming a training run needs around it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.utils import unwrap_model

from ..checkpointing import load_checkpoint, save_checkpoint
from .parser import UsageError, args_as_dict

__all__ = [
    "TRACKER_FILE",
    "TRAIN_STATE_FILE",
    "TrainState",
    "checkpoint_iteration",
    "checkpoint_path",
    "is_complete",
    "load_training_checkpoint",
    "save_training_checkpoint",
    "saved_train_state",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's name for the file in a checkpoint directory that holds the last iteration."""

TRAIN_STATE_FILE = "train_state.pt"
"""The file of a checkpoint that rank 0 writes last: a checkpoint without it is incomplete."""

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


def is_complete(checkpoint_dir: str | os.PathLike, iteration: int) -> bool:
    """Whether ``checkpoint_dir`` holds a complete checkpoint of iteration ``iteration``."""
    return (checkpoint_path(checkpoint_dir, iteration) / TRAIN_STATE_FILE).is_file()


def saved_train_state(checkpoint_dir: str | os.PathLike, iteration: int) -> dict[str, Any]:
    """What ``save_training_checkpoint`` wrote for iteration ``iteration``: ``iteration``,
    ``consumed_train_samples``, ``scheduler``, ``world_size`` and ``args`` (the run's flags)."""
    state_file = checkpoint_path(checkpoint_dir, iteration) / TRAIN_STATE_FILE
    return torch.load(state_file, weights_only=True)


# --------------------------------------------------------------------------------------------
# Save and resume: the package's model checkpoint, plus what resuming needs


def save_training_checkpoint(
    args: argparse.Namespace, state: TrainState, model: list, optimizer: Any, scheduler: Any
) -> None:
    """Write the checkpoint of ``state.iteration`` into ``--save`` (see the module
    docstring): staged under a temporary name, then renamed and named in the tracker file.
    Collective."""
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
    iteration = checkpoint_iteration(args.load)
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
