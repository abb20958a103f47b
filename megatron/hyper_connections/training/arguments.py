"""Command-line arguments of ``pretrain``, with Megatron-LM's flag names, checked up front.

``parse_args(argv)`` parses the flags and checks everything that can be checked before a
process group or a model exists: conflicting or out-of-range values, the parallel layout
against torchrun's ``WORLD_SIZE``, the data and tokenizer files, the tokenizer against the
largest token id in the data, the checkpoint to resume from, the output directories, and the
model configuration itself (built through the package's ``TransformerConfig``, so that its own
validation applies). A problem ends the program with argparse's usage error (exit status 2)
that names the flags, the values and what is allowed; ``check_args`` raises the same message as
``UsageError`` for programmatic use.

Derived values are set on the namespace, as Megatron-LM does: ``world_size``,
``data_parallel_size``, ``global_batch_size`` (default: one micro-batch per data-parallel
rank), ``num_microbatches``, ``virtual_pipeline_model_parallel_size``, ``ffn_hidden_size``,
``max_position_embeddings``, ``lr_decay_iters`` and ``padded_vocab_size``.

Defaults are Megatron-LM's where it has one. Where Megatron-LM requires a value (model shape,
learning rate, iterations, tokenizer, data) the default is a small model that trains on a CPU
on the ``embedded`` corpus (the Python standard library's sources), so a demo needs no flag
beyond the variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..options import add_hyper_connection_arguments, flag_of, hyper_connection_kwargs

__all__ = [
    "EMBEDDED",
    "TRACKER_FILE",
    "UsageError",
    "args_as_dict",
    "build_parser",
    "check_args",
    "checkpoint_iteration",
    "checkpoint_path",
    "embedded_cache_dir",
    "optimizer_config",
    "parse_args",
    "tokenizer_from_args",
    "transformer_config",
]

EMBEDDED = "embedded"
"""The ``--data-path`` word for the embedded corpus, tokenized once into the data cache."""

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's name for the file in a checkpoint directory that holds the last iteration."""

PROG = "megatron-hc-pretrain"


class UsageError(ValueError):
    """A flag value that cannot work; the message names the flags, values and what is allowed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pretrain a GPT with hyper-connections (HC, mHC) on megatron-core.",
        allow_abbrev=False,  # an abbreviated flag would silently pick one of several
    )
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=_positive_int, default=4)
    g.add_argument("--hidden-size", type=_positive_int, default=256)
    g.add_argument(
        "--ffn-hidden-size", type=_positive_int, help="default: 4 x hidden size (SwiGLU: 8/3 x)"
    )
    g.add_argument("--num-attention-heads", type=_positive_int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=_positive_int, help="with --group-query-attention")
    g.add_argument("--seq-length", type=_positive_int, default=256)
    g.add_argument("--max-position-embeddings", type=_positive_int, help="default: --seq-length")
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope"],
        default="learned_absolute",
    )
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=_non_negative_float, default=0.02)
    g.add_argument("--hidden-dropout", type=_probability, default=0.1)
    g.add_argument("--attention-dropout", type=_probability, default=0.1)
    g.add_argument("--make-vocab-size-divisible-by", type=_positive_int, default=128)
    g.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default="local",
        help="transformer_engine needs Transformer Engine and a GPU",
    )

    g = add_hyper_connection_arguments(parser)
    g.add_argument(
        "--log-mhc-amax",
        action="store_true",
        help="also log each sublayer's log_amax (log of the largest singular value of H_res)",
    )

    g = parser.add_argument_group("batch and learning rate")
    g.add_argument("--micro-batch-size", type=_positive_int, default=4)
    g.add_argument(
        "--global-batch-size", type=_positive_int, help="default: micro batch x data parallel"
    )
    g.add_argument("--train-iters", type=_positive_int, default=500)
    g.add_argument("--lr", type=_non_negative_float, default=1e-3)
    g.add_argument("--min-lr", type=_non_negative_float, default=0.0)
    g.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
        default="linear",
    )
    g.add_argument("--lr-warmup-iters", type=_non_negative_int, default=0)
    g.add_argument("--lr-decay-iters", type=_positive_int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.01)
    g.add_argument("--clip-grad", type=_non_negative_float, default=1.0, help="0: no clipping")
    g.add_argument("--adam-beta1", type=_probability, default=0.9)
    g.add_argument("--adam-beta2", type=_probability, default=0.999)
    g.add_argument("--adam-eps", type=_positive_float, default=1e-8)

    g = parser.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive_int)
    g.add_argument("--context-parallel-size", type=_positive_int, default=1)
    g.add_argument("--expert-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")

    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=_positive_int)
    g.add_argument("--recompute-modules", nargs="+", help="selective: default core_attn")

    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=_positive_int)
    g.add_argument("--moe-router-topk", type=_positive_int, help="default: 2")
    g.add_argument(
        "--moe-token-dispatcher-type", choices=["allgather", "alltoall"], help="default: allgather"
    )
    g.add_argument("--moe-aux-loss-coeff", type=_non_negative_float, help="default: 0")

    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=[EMBEDDED],
        help="prefixes of .bin/.idx files, each optionally after its weight: [w1] p1 [w2] p2 ...; "
        f"'{EMBEDDED}' (the default) is the Python standard library's sources",
    )
    g.add_argument("--split", default="969, 30, 1", help="train, validation, test weights")
    g.add_argument(
        "--tokenizer-type",
        choices=["ByteTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"],
        default="ByteTokenizer",
    )
    g.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    g.add_argument(
        "--tokenizer-model", help="HuggingFaceTokenizer: a tokenizer.json or a directory with one"
    )
    g.add_argument(
        "--data-cache-path",
        help="where the sample indices and the tokenized embedded corpus are cached "
        "(default: beside each data prefix; the embedded corpus: ~/.cache/megatron-hc)",
    )
    g.add_argument("--num-workers", type=_non_negative_int, default=2, help="data loader workers")
    g.add_argument("--seed", type=_non_negative_int, default=1234)

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint directory to write")
    g.add_argument("--load", help="checkpoint directory to resume from (none there: start anew)")
    g.add_argument("--save-interval", type=_positive_int, help="iterations between checkpoints")
    g.add_argument("--no-load-optim", action="store_true", help="resume the model weights only")

    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=_positive_int, default=100)
    g.add_argument("--eval-interval", type=_positive_int, default=1000)
    g.add_argument("--eval-iters", type=_non_negative_int, default=100, help="0: no validation")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    switches = (argparse._StoreTrueAction, argparse._StoreFalseAction)
    for action in parser._actions:  # --help shows every default there is
        if action.default not in (None, argparse.SUPPRESS) and not isinstance(action, switches):
            action.help = (
                f"{action.help}; default: %(default)s" if action.help else ("default: %(default)s")
            )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked flags with the derived values set; exits with a usage error (status
    2) naming the problem, before anything has started, if they cannot work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except UsageError as error:
        parser.error(str(error))
    return args


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


def _check_optional_features(args: argparse.Namespace) -> None:
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
        check_data_prefixes(files)
    except FileNotFoundError as error:
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
    if args.load is not None:
        _check_resume(args)


def _check_resume(args: argparse.Namespace) -> None:
    """A checkpoint in ``--load`` has a readable tracker and the run's padded vocabulary: a
    larger one would load (megatron-core lets the vocabulary dimension differ) with new random
    rows in the output layer that raise the loss."""
    iteration = checkpoint_iteration(args.load)
    if iteration is None:
        return
    state_file = checkpoint_path(args.load, iteration) / "train_state.pt"
    saved = torch.load(state_file, weights_only=True)["args"]
    if saved["padded_vocab_size"] != args.padded_vocab_size:
        raise UsageError(
            f"--load {args.load}: the checkpoint pads the vocabulary to "
            f"{saved['padded_vocab_size']} ids, this run to {args.padded_vocab_size} "
            f"(--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} x "
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}): choose "
            "--make-vocab-size-divisible-by so that they agree"
        )


def _require_writable_directory(path: str, flag: str) -> None:
    """``path`` is a writable directory, or can be created as one."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not a writable directory")


# --------------------------------------------------------------------------------------------
# What the checks and the training loop share


def embedded_cache_dir(args: argparse.Namespace) -> Path:
    """Where the tokenized embedded corpus is kept: ``--data-cache-path``, else
    ``~/.cache/megatron-hc``."""
    return Path(args.data_cache_path or Path.home() / ".cache" / "megatron-hc")


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
    if not (checkpoint_path(checkpoint_dir, iteration) / "train_state.pt").is_file():
        raise UsageError(
            f"--load {checkpoint_dir}: {TRACKER_FILE} names iteration {iteration}, but "
            f"{checkpoint_path(checkpoint_dir, iteration)} is not a complete checkpoint"
        )
    return iteration


def args_as_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The flags and derived values that are plain values (for checkpoints and run records)."""
    plain = (bool, int, float, str, list, type(None))
    return {name: value for name, value in vars(args).items() if isinstance(value, plain)}


def tokenizer_from_args(args: argparse.Namespace) -> Any:
    """The data package's tokenizer for ``--tokenizer-type`` and its files."""
    from megatron.hyper_connections.data.tokenizers import build_tokenizer

    model = args.tokenizer_model
    if model is not None:
        # The data package's messages call this file --tokenizer-file; name our flag first.
        path = Path(model) / "tokenizer.json" if Path(model).is_dir() else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer-model: no such file: {path}")
    return build_tokenizer(
        args.tokenizer_type,
        vocab_file=args.vocab_file,
        merges_file=args.merge_file,
        tokenizer_file=model,
    )


def transformer_config(args: argparse.Namespace) -> Any:
    """The package's ``TransformerConfig`` for ``args`` (after ``check_args``); its
    ``ValueError`` becomes an ``UsageError`` that also names the flags involved."""
    from megatron.hyper_connections import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    options: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=args.swiglu,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        # On a CPU every rank builds the full weights from the same seed and keeps its shard,
        # so the initial model does not depend on the parallel layout.
        use_cpu_initialization=not torch.cuda.is_available(),
        # Megatron-LM's setting: free a stage's output once sent (it keeps its grad_fn).
        deallocate_pipeline_outputs=True,
    )
    if args.swiglu:
        options["activation_func"] = torch.nn.functional.silu
    if args.recompute_modules is not None:
        options["recompute_modules"] = args.recompute_modules
    if args.virtual_pipeline_model_parallel_size:
        # Megatron-LM's p2p setting for the interleaved schedule (batched p2p pairs messages
        # wrongly when the previous and next stage are one rank).
        options.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if args.num_experts is not None:
        options["num_moe_experts"] = args.num_experts
        for flag in ("moe_router_topk", "moe_token_dispatcher_type", "moe_aux_loss_coeff"):
            if getattr(args, flag) is not None:
                options[flag] = getattr(args, flag)
    # Every HC flag has its field's default, so the config refuses one given without
    # --use-hyper-connections (or an mHC one without mHC) as it would the field.
    options.update(hyper_connection_kwargs(args))

    try:
        return TransformerConfig(**options)
    except (ValueError, AssertionError) as error:
        flags = _flags_named_in(str(error))
        raise UsageError(f"invalid model configuration: {error}{flags}") from error


def optimizer_config(args: argparse.Namespace) -> Any:
    """megatron-core's ``OptimizerConfig`` (Adam) for ``args``."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


# Config fields set by a flag of another name.
_FLAG_OF_FIELD = {
    "num_moe_experts": "--num-experts",
    "add_bias_linear": "--disable-bias-linear",
    "gated_linear_unit": "--swiglu",
    "virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage",
}


def _flags_named_in(message: str) -> str:
    """' (flags: --a, --b)' for the config fields that ``message`` names and a flag sets."""
    known = {option for action in build_parser()._actions for option in action.option_strings}
    flags = []
    for field in dict.fromkeys(re.findall(r"[a-z][a-z0-9_]*", message)):
        flag = _FLAG_OF_FIELD.get(field) or flag_of(field)
        if "_" in field and flag in known:
            flags.append(flag)
    return f" (flags: {', '.join(flags)})" if flags else ""


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


# --------------------------------------------------------------------------------------------
# argparse types: the message names the value; argparse adds the flag


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _probability(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1)")
    return value


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
