"""Megatron-LM checkpoints of models with hyper-connections.

Megatron-LM saves its arguments with every checkpoint (``args`` in the common state dict of a
``torch_dist`` checkpoint, in each file of a ``torch`` one), so the HC flags a checkpoint was
made with are known before any of its tensors is read. ``check_load`` compares them with the
run's: a checkpoint of another variant (residual, HC, mHC, static or dynamic, Frac), or one that
differs in an option declared ``must_match`` (the options that decide which parameters exist),
is refused naming each flag that differs with both values. Options that may change between runs
(Sinkhorn iterations, dropout, recomputation) are not compared.

A residual checkpoint (saved without ``--use-hyper-connections``, e.g. by Megatron-LM's own
``pretrain_gpt.py``) loads into an HC model on purpose: the HC parameters keep their
initialisation, at which the HC model is the residual network, so training continues from the
residual model's loss. Its optimizer state has nothing for the HC parameters, so such a load
needs ``--no-load-optim`` (or ``--finetune``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing

from ..options import flag_of, hyper_connection_options, hyper_connection_variant, must_match_fields

__all__ = ["TRACKER_FILE", "check_load", "checkpoint_directory", "saved_arguments"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's file naming a checkpoint directory's latest iteration (or ``release``)."""


def checkpoint_directory(load_dir: str | Path, iteration: int | None = None) -> Path | None:
    """The directory of the latest checkpoint in ``load_dir`` (or of ``iteration``), None if
    there is none."""
    load_dir = Path(load_dir)
    if iteration is None:
        tracker = load_dir / TRACKER_FILE
        if not tracker.is_file():
            return None
        text = tracker.read_text(encoding="utf-8").strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}"
    else:
        name = f"iter_{iteration:07d}"
    directory = load_dir / name
    return directory if directory.is_dir() else None


def saved_arguments(directory: Path) -> argparse.Namespace | None:
    """The arguments a Megatron-LM checkpoint directory was saved with, read without loading
    any tensor; None when it holds none."""
    if dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        common = dist_checkpointing.load_common_state_dict(str(directory))
    else:  # --ckpt-format torch: memory-mapped, so that its tensors stay on disk
        files = sorted(directory.glob("mp_rank_*/model_optim_rng.pt"))
        if not files:
            return None
        common = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    return common.get("args")


def check_load(args: argparse.Namespace, config: Any) -> bool:
    """Check the checkpoint that Megatron-LM will load (``--load``, else
    ``--pretrained-checkpoint``) against a model built from ``config``, before any tensor is
    read (see the module docstring); raise ``ValueError`` when it does not fit.

    Returns True when it is a residual model's checkpoint and ``config`` has hyper-connections:
    the model then keeps its HC parameters at their initialisation when it loads.
    """
    for load_dir in (args.load, getattr(args, "pretrained_checkpoint", None)):
        directory = (
            None
            if load_dir is None
            else checkpoint_directory(load_dir, getattr(args, "ckpt_step", None))
        )
        if directory is not None:
            break
    else:
        return False
    saved = saved_arguments(directory)
    if saved is None:
        return False
    options = hyper_connection_options()
    saved_values = {f.name: getattr(saved, f.name, f.default) for f, _ in options}
    run_values = {f.name: getattr(config, f.name, f.default) for f, _ in options}
    saved_variant = hyper_connection_variant(argparse.Namespace(**saved_values))
    run_variant = hyper_connection_variant(argparse.Namespace(**run_values))
    if saved_variant == "residual":
        if run_variant != "residual" and not _loads_no_optimizer_state(args, saved):
            raise ValueError(
                f"{directory} is a residual model's checkpoint (saved without "
                f"{flag_of('use_hyper_connections')}) and this run builds a {run_variant} model: "
                f"its hyper-connection parameters start at their initialisation, where the model "
                f"is the residual one, but the checkpoint's optimizer state has none of them: "
                f"add --no-load-optim (or --finetune)"
            )
        return run_variant != "residual"
    mismatched = saved_variant != run_variant or any(
        saved_values[name] != run_values[name] for name in must_match_fields()
    )
    if mismatched:
        differences = "; ".join(
            f"{flag_of(name)}: {name}={saved_values[name]!r} in the checkpoint, "
            f"{run_values[name]!r} in this run"
            for name in saved_values
            if saved_values[name] != run_values[name]
        )
        raise ValueError(
            f"cannot load {directory}: it was saved by a {saved_variant} model and this run "
            f"builds a {run_variant} one ({differences}); run with the flags it was saved with"
        )
    return False


def _loads_no_optimizer_state(args: argparse.Namespace, saved: argparse.Namespace) -> bool:
    return bool(args.no_load_optim or args.finetune or getattr(saved, "no_save_optim", False))
