"""The command line of ``pretrain``: Megatron-LM's flag names, their defaults and value types.

``build_parser()`` is the trainer's ``argparse`` parser; ``checks.parse_args`` parses with it
and checks the result through ``parse_and_check``, which reports a ``UsageError`` (a flag value
that cannot work, raised by the checks and by the checkpoint layout for a broken ``--load``) as
argparse's usage error. The value types (``positive_int``, ``probability``, ...) name the value
in their message, argparse adds the flag. ``tools/generate.py`` uses these for its options.

Defaults are Megatron-LM's where it has one. Where Megatron-LM requires a value (model shape,
learning rate, iterations, tokenizer, data) the default is a small model that trains on a CPU
on the ``embedded`` corpus (the Python standard library's sources), so a demo needs no flag
beyond the variant.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..options import add_hyper_connection_arguments

__all__ = [
    "EMBEDDED",
    "PROG",
    "UsageError",
    "args_as_dict",
    "build_parser",
    "embedded_cache_dir",
    "non_negative_float",
    "non_negative_int",
    "parse_and_check",
    "positive_float",
    "positive_int",
    "probability",
]

EMBEDDED = "embedded"
"""The ``--data-path`` word for the embedded corpus, tokenized once into the data cache."""

PROG = "megatron-hc-pretrain"


class UsageError(ValueError):
    """A flag value that cannot work; the message names the flags, values and what is allowed."""


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags in argument groups; ``--help`` shows every default."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pretrain a GPT with hyper-connections (HC, mHC) on megatron-core.",
        allow_abbrev=False,  # an abbreviated flag would silently pick one of several
    )
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=positive_int, default=4)
    g.add_argument("--hidden-size", type=positive_int, default=256)
    g.add_argument(
        "--ffn-hidden-size", type=positive_int, help="default: 4 x hidden size (SwiGLU: 8/3 x)"
    )
    g.add_argument("--num-attention-heads", type=positive_int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=positive_int, help="with --group-query-attention")
    g.add_argument("--seq-length", type=positive_int, default=256)
    g.add_argument("--max-position-embeddings", type=positive_int, help="default: --seq-length")
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope"],
        default="learned_absolute",
    )
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=non_negative_float, default=0.02)
    g.add_argument("--hidden-dropout", type=probability, default=0.1)
    g.add_argument("--attention-dropout", type=probability, default=0.1)
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128)
    g.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default="local",
        help="transformer_engine needs Transformer Engine and a GPU",
    )

    g = parser.add_argument_group("multi-token prediction")
    g.add_argument(
        "--mtp-num-layers",
        type=positive_int,
        help="MTP layers (megatron-core's residual MTP block on the reduced hidden state)",
    )
    g.add_argument(
        "--mtp-loss-scaling-factor",
        type=non_negative_float,
        help="weight of the MTP losses, averaged over the MTP layers; default: 0.1",
    )

    g = add_hyper_connection_arguments(parser)
    g.add_argument(
        "--log-mhc-amax",
        action="store_true",
        help="also log each sublayer's log_amax (log of the largest singular value of H_res)",
    )

    g = parser.add_argument_group("batch and learning rate")
    g.add_argument("--micro-batch-size", type=positive_int, default=4)
    g.add_argument(
        "--global-batch-size", type=positive_int, help="default: micro batch x data parallel"
    )
    g.add_argument("--train-iters", type=positive_int, default=500)
    g.add_argument("--lr", type=non_negative_float, default=1e-3)
    g.add_argument("--min-lr", type=non_negative_float, default=0.0)
    g.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
        default="linear",
    )
    g.add_argument("--lr-warmup-iters", type=non_negative_int, default=0)
    g.add_argument("--lr-decay-iters", type=positive_int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    g.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="0: no clipping")
    g.add_argument("--adam-beta1", type=probability, default=0.9)
    g.add_argument("--adam-beta2", type=probability, default=0.999)
    g.add_argument("--adam-eps", type=positive_float, default=1e-8)

    g = parser.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=positive_int)
    g.add_argument("--context-parallel-size", type=positive_int, default=1)
    g.add_argument("--expert-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")

    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=positive_int)
    g.add_argument("--recompute-modules", nargs="+", help="selective: default core_attn")

    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=positive_int)
    g.add_argument("--moe-router-topk", type=positive_int, help="default: 2")
    g.add_argument(
        "--moe-token-dispatcher-type", choices=["allgather", "alltoall"], help="default: allgather"
    )
    g.add_argument("--moe-aux-loss-coeff", type=non_negative_float, help="default: 0")

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
    g.add_argument("--num-workers", type=non_negative_int, default=2, help="data loader workers")
    g.add_argument("--seed", type=non_negative_int, default=1234)

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint directory to write")
    g.add_argument("--load", help="checkpoint directory to resume from (none there: start anew)")
    g.add_argument("--save-interval", type=positive_int, help="iterations between checkpoints")
    g.add_argument("--no-load-optim", action="store_true", help="resume the model weights only")
    g.add_argument(
        "--ckpt-step",
        type=positive_int,
        help="resume from this iteration's checkpoint in --load (default: the tracker's, the last "
        "complete one)",
    )
    g.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        action="store_true",
        dest="override_opt_param_scheduler",
        help="resuming: take the learning-rate schedule from this run's flags, not the checkpoint",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        action="store_true",
        dest="use_checkpoint_opt_param_scheduler",
        help="resuming: take the learning-rate schedule from the checkpoint, not this run's flags",
    )

    g = parser.add_argument_group("faults and exits")
    g.add_argument(
        "--check-for-nan-in-loss-and-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop, before the update, at a non-finite (NaN or inf) loss or gradient; default: on",
    )
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM: finish the current step, save a checkpoint (with --save) and exit 0",
    )
    g.add_argument(
        "--exit-duration-in-mins",
        type=positive_float,
        help="save (with --save) and exit 0 after the first step that ends past this many minutes",
    )
    g.add_argument(
        "--exit-interval",
        type=positive_int,
        help="save (with --save) and exit 0 after an iteration divisible by this",
    )
    g.add_argument(
        "--distributed-timeout-minutes",
        type=positive_float,
        default=10.0,
        help="a collective that waits longer for another rank fails and ends the job",
    )

    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=positive_int, default=100)
    g.add_argument("--eval-interval", type=positive_int, default=1000)
    g.add_argument("--eval-iters", type=non_negative_int, default=100, help="0: no validation")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    # (A BooleanOptionalAction's help says its default itself.)
    switches = (
        argparse._StoreTrueAction,
        argparse._StoreFalseAction,
        argparse.BooleanOptionalAction,
    )
    for action in parser._actions:  # --help shows every default there is
        if action.default not in (None, argparse.SUPPRESS) and not isinstance(action, switches):
            action.help = (
                f"{action.help}; default: %(default)s" if action.help else ("default: %(default)s")
            )
    return parser


def parse_and_check(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check: Callable[[argparse.Namespace], None],
) -> argparse.Namespace:
    """``argv`` parsed by ``parser`` and passed to ``check``; a ``UsageError`` from it ends the
    program as argparse's own errors do (the message after the usage, exit status 2)."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except UsageError as error:
        parser.error(str(error))
    return args


def embedded_cache_dir(args: argparse.Namespace) -> Path:
    """Where the tokenized embedded corpus is kept: ``--data-cache-path``, else
    ``~/.cache/megatron-hc``."""
    return Path(args.data_cache_path or Path.home() / ".cache" / "megatron-hc")


def args_as_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The flags and derived values that are plain values (for checkpoints and run records)."""
    plain = (bool, int, float, str, list, type(None))
    return {name: value for name, value in vars(args).items() if isinstance(value, plain)}


# --------------------------------------------------------------------------------------------
# argparse types: the message names the value; argparse adds the flag


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def probability(text: str) -> float:
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
