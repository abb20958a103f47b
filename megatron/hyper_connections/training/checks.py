"""The trainer's flags checked up front: ``parse_args(argv)`` and ``check_args(args)``.

``parse_args(argv)`` parses the flags (``parser.build_parser``) and checks everything that can
be checked before a process group or a model exists: conflicting or out-of-range values, the
parallel layout against torchrun's ``WORLD_SIZE``, the data and tokenizer files (each index
against its data file), the tokenizer against the largest token id in the data, the
checkpoint to resume from (its files, the model flags and the learning-rate schedule it was
made with), the JSONL log a resumed run appends to, the output directories, and the model
configuration itself (built by ``factories.transformer_config`` through the package's
``TransformerConfig``, so that its own validation applies). A problem
ends the program with argparse's usage error (exit status 2) that names the flags, the values
and what is allowed; ``check_args`` raises the same message as ``UsageError`` for programmatic
use, and touches no process group and writes nothing.

Derived values are set on the namespace, as Megatron-LM does: ``world_size``,
``data_parallel_size``, ``global_batch_size`` (default: one micro-batch per data-parallel
rank), ``num_microbatches``, ``virtual_pipeline_model_parallel_size``, ``ffn_hidden_size``,
``max_position_embeddings``, ``lr_decay_iters`` and ``padded_vocab_size``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..options import USE_HC, USE_MHC, flag_of, must_match_fields
from .checkpoints import (
    check_checkpoint_files,
    complete_iterations,
    resume_iteration,
    saved_train_state,
)
from .factories import scheduler_values, tokenizer_from_args, transformer_config
from .monitoring import JSONL_FILE, read_scalar_records
from .parser import EMBEDDED, UsageError, build_parser, embedded_cache_dir, parse_and_check

__all__ = ["check_args", "parse_args"]


# Here rather than in ``parser``: the checks build the config through ``factories``, which
# names flags from ``parser.build_parser``; so the imports run parser <- factories <- checks.
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked flags with the derived values set; exits with a usage error (status
    2) naming the problem, before anything has started, if they cannot work."""
    return parse_and_check(build_parser(), argv, check_args)


def check_args(args: argparse.Namespace, world_size: int | None = None) -> None:
    """Check ``args`` and set the derived values; ``world_size`` defaults to torchrun's
    ``WORLD_SIZE`` (1 without it). Raises ``UsageError``. Touches no process group and
    writes nothing."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    _check_precision(args)
    _check_parallel_layout(args)
    _check_model_shape(args)
    _check_schedule(args)
    _check_optional_features(args)
    _check_data(args)
    _check_directories(args)
    transformer_config(args)  # the config's own validation, as a clean CLI error
    _check_resume_and_log(args)


# --------------------------------------------------------------------------------------------
# Checks, each raising UsageError with the flags, values and what is allowed


def _check_precision(args: argparse.Namespace) -> None:
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 are exclusive: give at most one of them")


def _check_parallel_layout(args: argparse.Namespace) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp, ep = args.context_parallel_size, args.expert_model_parallel_size
    model_parallel = tp * pp * cp
    if args.world_size % model_parallel:
        raise UsageError(
            f"world size {args.world_size} (WORLD_SIZE) is not divisible by "
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} x "
            f"--context-parallel-size {cp} = {model_parallel}: use sizes whose product "
            f"divides {args.world_size}"
        )
    args.data_parallel_size = args.world_size // model_parallel
    dp = args.data_parallel_size

    if args.sequence_parallel and tp == 1:
        raise UsageError(
            "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence "
            "over the tensor-parallel ranks), got --tensor-model-parallel-size 1"
        )
    if args.overlap_grad_reduce and dp == 1:
        raise UsageError(
            "--overlap-grad-reduce needs a data-parallel size > 1 (there is no gradient "
            f"reduction to overlap), got data-parallel size 1 from world size {args.world_size}"
        )
    if cp > 1:
        if args.transformer_impl != "transformer_engine":
            raise UsageError(
                f"--context-parallel-size {cp} needs --transformer-impl transformer_engine: "
                "megatron-core's local attention has no context parallelism"
            )
        if args.seq_length % (2 * cp):
            raise UsageError(
                f"--seq-length {args.seq_length} must be divisible by 2 x "
                f"--context-parallel-size {cp} = {2 * cp} (each rank takes two chunks)"
            )
    if ep > 1:
        if args.num_experts is None:
            raise UsageError(
                f"--expert-model-parallel-size {ep} needs --num-experts (a mixture of experts)"
            )
        if args.num_experts % ep:
            raise UsageError(
                f"--num-experts {args.num_experts} is not divisible by "
                f"--expert-model-parallel-size {ep}"
            )
        if args.world_size % (pp * ep * tp):
            raise UsageError(
                f"world size {args.world_size} is not divisible by --pipeline-model-parallel-size "
                f"{pp} x --expert-model-parallel-size {ep} x --tensor-model-parallel-size {tp} = "
                f"{pp * ep * tp} (experts are split over the other ranks of a pipeline stage)"
            )

    if args.num_layers % pp:
        raise UsageError(
            f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size "
            f"{pp}: each pipeline stage holds the same number of layers"
        )
    layers_per_stage = args.num_layers // pp
    args.virtual_pipeline_model_parallel_size = None
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        if pp == 1:
            raise UsageError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual} needs "
                "--pipeline-model-parallel-size > 1"
            )
        if layers_per_stage % per_virtual or layers_per_stage == per_virtual:
            raise UsageError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual} must divide the "
                f"{layers_per_stage} layers of a pipeline stage (--num-layers {args.num_layers} / "
                f"--pipeline-model-parallel-size {pp}) into at least two virtual stages"
            )
        args.virtual_pipeline_model_parallel_size = layers_per_stage // per_virtual

    mbs = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    if args.global_batch_size % (mbs * dp):
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {mbs} x data-parallel size {dp} = {mbs * dp}: use a multiple "
            f"of {mbs * dp}"
        )
    args.num_microbatches = args.global_batch_size // (mbs * dp)
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        raise UsageError(
            f"the interleaved pipeline schedule needs a number of micro-batches per step "
            f"divisible by --pipeline-model-parallel-size {pp}, got {args.num_microbatches} "
            f"(--global-batch-size {args.global_batch_size} / (--micro-batch-size {mbs} x "
            f"data-parallel size {dp}))"
        )


def _check_model_shape(args: argparse.Namespace) -> None:
    heads, tp = args.num_attention_heads, args.tensor_model_parallel_size
    if args.hidden_size % heads:
        raise UsageError(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}"
        )
    if heads % tp:
        raise UsageError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if args.num_query_groups is not None:
        groups = args.num_query_groups
        if not args.group_query_attention:
            raise UsageError(
                f"--num-query-groups {groups} has no effect without --group-query-attention"
            )
        if heads % groups or groups % tp:
            raise UsageError(
                f"--num-query-groups {groups} must divide --num-attention-heads {heads} and be "
                f"divisible by --tensor-model-parallel-size {tp}"
            )
    elif args.group_query_attention:
        raise UsageError("--group-query-attention needs --num-query-groups")

    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if (
        args.position_embedding_type == "learned_absolute"
        and args.seq_length > args.max_position_embeddings
    ):
        raise UsageError(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
            f"{args.max_position_embeddings}: learned absolute positions exist only up to it"
        )
    if args.ffn_hidden_size is None:
        # Megatron-LM's rule: SwiGLU's two input projections keep the parameter count of 4h.
        ffn = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
        if ffn == 0:
            raise UsageError(
                f"--swiglu with --hidden-size {args.hidden_size} gives no default FFN size "
                "(a multiple of 64 of 8/3 x hidden size): give --ffn-hidden-size"
            )
        args.ffn_hidden_size = ffn


def _check_schedule(args: argparse.Namespace) -> None:
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}: use --min-lr <= --lr")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters > args.lr_decay_iters:
        raise UsageError(
            f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --lr-decay-iters "
            f"{args.lr_decay_iters} (default: --train-iters): warm-up is part of the schedule"
        )
    if args.save_interval is not None and args.save is None:
        raise UsageError(
            f"--save-interval {args.save_interval} needs --save (a checkpoint directory)"
        )
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise UsageError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are "
            "exclusive: take the learning-rate schedule from this run's flags or from the "
            "checkpoint, not both"
        )
    if args.load is None:
        for flag, value in (
            ("--ckpt-step", args.ckpt_step),
            ("--override-opt_param-scheduler", args.override_opt_param_scheduler),
            ("--use-checkpoint-opt_param-scheduler", args.use_checkpoint_opt_param_scheduler),
        ):
            if value:
                raise UsageError(f"{flag} has no effect without --load (a checkpoint directory)")


def _check_optional_features(args: argparse.Namespace) -> None:
    if args.mtp_num_layers is None and args.mtp_loss_scaling_factor is not None:
        raise UsageError(
            f"--mtp-loss-scaling-factor {args.mtp_loss_scaling_factor} has no effect without "
            "--mtp-num-layers"
        )
    pp = args.pipeline_model_parallel_size
    if args.mtp_num_layers and pp > 1 and args.position_embedding_type == "learned_absolute":
        raise UsageError(
            f"--mtp-num-layers {args.mtp_num_layers} with --pipeline-model-parallel-size {pp} "
            "needs --position-embedding-type rope: megatron-core gives the MTP block on the "
            "last stage its own copy of learned absolute position embeddings and does not keep "
            "it in sync with the first stage's"
        )
    moe_flags = {
        "--moe-router-topk": args.moe_router_topk,
        "--moe-token-dispatcher-type": args.moe_token_dispatcher_type,
        "--moe-aux-loss-coeff": args.moe_aux_loss_coeff,
    }
    if args.num_experts is None:
        for flag, value in moe_flags.items():
            if value is not None:
                raise UsageError(f"{flag} {value} has no effect without --num-experts")
    else:
        if args.moe_router_topk is not None and args.moe_router_topk > args.num_experts:
            raise UsageError(
                f"--moe-router-topk {args.moe_router_topk} exceeds --num-experts {args.num_experts}"
            )
        if not args.disable_bias_linear:
            raise UsageError(
                f"--num-experts {args.num_experts} needs --disable-bias-linear: megatron-core's "
                "expert MLP adds its bias in place on a view, which autograd rejects"
            )
    if args.log_mhc_amax and not args.use_hyper_connections:
        raise UsageError("--log-mhc-amax has no effect without --use-hyper-connections")
    if args.transformer_impl == "transformer_engine":
        if importlib.util.find_spec("transformer_engine") is None:
            raise UsageError(
                "--transformer-impl transformer_engine needs Transformer Engine: pip install "
                "'megatron-hyper-connections[te]' on a GPU machine, or use --transformer-impl local"
            )
        if not torch.cuda.is_available():
            raise UsageError(
                "--transformer-impl transformer_engine needs a GPU and none is visible: use "
                "--transformer-impl local"
            )
    if args.wandb_exp_name is not None and args.wandb_project is None:
        raise UsageError(
            f"--wandb-exp-name {args.wandb_exp_name} has no effect without --wandb-project"
        )
    if args.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise UsageError(
            f"--wandb-project {args.wandb_project} needs Weights & Biases: pip install wandb"
        )
    if args.tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            f"--tensorboard-dir {args.tensorboard_dir} needs TensorBoard: pip install "
            "'megatron-hyper-connections[train]' (or pip install tensorboard)"
        )


def _check_data(args: argparse.Namespace) -> None:
    """The data paths and split, the tokenizer's files, and that the tokenizer knows every
    token id in the data. Sets ``args.padded_vocab_size``."""
    from megatron.hyper_connections.data.datasets import (
        check_data_prefixes,
        check_vocab_size,
        parse_data_path,
    )

    weights = _split_weights(args.split)
    if args.eval_iters > 0 and weights[1] == 0:
        raise UsageError(
            f"--eval-iters {args.eval_iters} needs validation data, but --split {args.split!r} "
            "gives the validation split no weight: give it a weight or use --eval-iters 0"
        )
    try:
        prefixes, _ = parse_data_path(args.data_path, "--data-path")
        tokenizer = tokenizer_from_args(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UsageError(str(error)) from error
    files = [prefix for prefix in prefixes if prefix != EMBEDDED]
    try:
        check_data_prefixes(files)  # and each index against its data file
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--data-path: {error}") from error
    try:
        check_vocab_size(files, tokenizer)
    except ValueError as error:
        raise UsageError(
            f"--tokenizer-type {args.tokenizer_type} does not fit --data-path: {error}"
        ) from error
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    args.padded_vocab_size = math.ceil(tokenizer.vocab_size / multiple) * multiple


def _check_directories(args: argparse.Namespace) -> None:
    for flag in ("--save", "--tensorboard-dir", "--data-cache-path"):
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is not None:
            _require_writable_directory(path, flag)
    if EMBEDDED in args.data_path and args.data_cache_path is None:
        _require_writable_directory(str(embedded_cache_dir(args)), f"--data-path {EMBEDDED}")


def _check_resume_and_log(args: argparse.Namespace) -> None:
    """The checkpoint a run resumes from (after the model configuration: it names flags of
    the model) and the log it appends to."""
    iteration = resume_iteration(args)
    if iteration is not None:
        _check_resume(args, iteration)
    _check_log(args, iteration or 0)


def _check_resume(args: argparse.Namespace, iteration: int) -> None:
    """The checkpoint of ``iteration`` in ``--load`` can be read, was made for this run's model
    and with its learning-rate schedule (unless a flag says which schedule to take)."""
    try:
        check_checkpoint_files(
            args.load,
            iteration,
            int(os.environ.get("RANK", "0")),
            args.world_size,
            with_optimizer=not args.no_load_optim,
        )
    except UsageError as error:
        others = [str(i) for i in complete_iterations(args.load) if i != iteration]
        hint = (
            f"give --ckpt-step N to resume from another checkpoint (complete ones: "
            f"{', '.join(others)})"
            if others
            else "it holds no other complete checkpoint"
        )
        raise UsageError(
            f"--load {args.load}: the checkpoint of iteration {iteration} is damaged: {error}; "
            f"{hint}"
        ) from error
    state = saved_train_state(args.load, iteration)
    _check_checkpoint_model(args, iteration, state["args"])
    if not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        _check_checkpoint_schedule(args, iteration, state["scheduler"])


# The flags that decide the model's parameters (which exist, and their shapes): a checkpoint
# made with other values cannot be loaded. (Derived defaults are named after the flag.)
_MODEL_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size (default: from --hidden-size)",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "swiglu": "--swiglu",
    "disable_bias_linear": "--disable-bias-linear",
    "normalization": "--normalization",
    "position_embedding_type": "--position-embedding-type",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "num_experts": "--num-experts",
    "mtp_num_layers": "--mtp-num-layers",
}


def _check_checkpoint_model(args: argparse.Namespace, iteration: int, saved: dict) -> None:
    """The model flags of ``saved`` (the checkpoint's) are this run's: the vocabulary padding,
    ``_MODEL_FLAGS``, the learned position embeddings' length and, unless the checkpoint is
    a residual model's (which loads into an HC model on purpose), the HC variant and every
    option declared ``must_match``."""
    # A larger vocabulary would load (megatron-core lets the vocabulary dimension differ),
    # with new random rows in the output layer that raise the loss.
    if saved["padded_vocab_size"] != args.padded_vocab_size:
        raise UsageError(
            f"--load {args.load}: the checkpoint pads the vocabulary to "
            f"{saved['padded_vocab_size']} ids, this run to {args.padded_vocab_size} "
            f"(--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} x "
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}): choose "
            "--make-vocab-size-divisible-by so that they agree"
        )
    flags = dict(_MODEL_FLAGS)
    if args.position_embedding_type == "learned_absolute":
        flags["max_position_embeddings"] = "--max-position-embeddings (default: --seq-length)"
    if saved.get(USE_HC):
        for name in (USE_HC, USE_MHC, "hyper_connections_dynamic", *must_match_fields()):
            flag = flag_of(name)
            flags[name] = flag if flag == "--" + name.replace("_", "-") else f"{flag} ({name})"
    differences = [
        f"{flag} {saved[name]!r} in the checkpoint, {getattr(args, name)!r} in this run"
        for name, flag in flags.items()
        if name in saved and saved[name] != getattr(args, name)
    ]
    if differences:
        raise UsageError(
            f"--load {args.load}: the checkpoint of iteration {iteration} was made for another "
            f"model: {'; '.join(differences)}: give the flags it was made with (its "
            "train_state.pt records them), or leave out --load to start anew"
        )


# The schedule's values as the flags name them (``factories.scheduler_values``); the weight
# decay increment follows --train-iters but has no effect on a constant weight decay.
_SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters (default: --train-iters)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
}


def _check_checkpoint_schedule(args: argparse.Namespace, iteration: int, saved: dict) -> None:
    """This run's learning-rate schedule is the checkpoint's: megatron-core would otherwise
    take the checkpoint's values without a word (Megatron-LM refuses the resume)."""
    values = scheduler_values(args)
    differences = [
        f"{flag} {saved[key]!r} in the checkpoint, {values[key]!r} in this run"
        for key, flag in _SCHEDULE_FLAGS.items()
        if key in saved and saved[key] != values[key]
    ]
    if differences:
        raise UsageError(
            f"--load {args.load}: this run's learning-rate schedule is not the one of the "
            f"checkpoint of iteration {iteration}: {'; '.join(differences)}: give "
            "--override-opt_param-scheduler to follow this run's flags from "
            f"iteration {iteration} on, or --use-checkpoint-opt_param-scheduler to keep the "
            "checkpoint's schedule"
        )


def _check_log(args: argparse.Namespace, iteration: int) -> None:
    """The JSONL log the run appends to (``monitoring``) is readable up to its last line, which
    may be incomplete (a run killed while writing it): the run drops that line."""
    directory = args.tensorboard_dir or args.save
    path = None if directory is None else Path(directory) / JSONL_FILE
    if path is None or not path.is_file():
        return
    flag = "--tensorboard-dir" if args.tensorboard_dir else "--save"
    try:
        read_scalar_records(path)
    except ValueError as error:
        raise UsageError(
            f"{flag} {directory}: {error}: repair or remove the file (a resumed run keeps the "
            f"records up to iteration {iteration} and appends to them)"
            if iteration
            else f"{flag} {directory}: {error}: repair or remove the file (the run appends to it)"
        ) from error


def _require_writable_directory(path: str, flag: str) -> None:
    """``path`` is a writable directory, or can be created as one."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not a writable directory")


def _split_weights(split: str) -> list[float]:
    """The three weights of ``--split`` (missing ones are 0)."""
    parts = [part.strip() for part in split.split(",")]
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        weights = []
    if (
        not 1 <= len(weights) <= 3
        or not all(0 <= w < math.inf for w in weights)
        or not any(weights)
    ):
        raise UsageError(
            f"--split {split!r} is not 1 to 3 comma-separated non-negative weights with a "
            "positive sum, e.g. '969, 30, 1'"
        )
    return weights + [0.0] * (3 - len(weights))
