"""Generate text with a model trained by the pretraining entry point (``megatron-hc-pretrain``).

    python tools/generate.py --load checkpoints/demo --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load checkpoints/demo --iteration 100 --prompt "import " \\
        --top-k 40 --temperature 0.8 --seed 1

loads the last complete checkpoint in ``--load`` (or iteration ``--iteration``), rebuilds the
model from the flags the run saved in ``iter_N/train_state.pt`` with the entry point's own
functions (tokenizer, ``TransformerConfig``, model), in one process with TP = PP = 1 whatever
layout the run trained with (the package's ``load_checkpoint`` reads any layout), and prints
the prompt followed by ``--max-new-tokens`` new tokens: greedy (``--greedy``, the default) or
sampled from the ``--top-k`` most likely tokens at ``--temperature`` with ``--seed``. Every
token re-runs the whole context (no KV cache), cut to the run's last ``--seq-length`` tokens.
Options and the checkpoint are checked before anything is built.

As a library: ``generate(model, tokenizer, prompt, max_new_tokens, top_k=None,
temperature=1.0, generator=None) -> str`` (``generate_ids`` works on token ids), and
``loaded_model(load_dir, iteration=None)``, a context manager that sets up the single process
and yields ``(model, tokenizer, train_args)``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron.hyper_connections.training.checkpoints import (
    TRACKER_FILE,
    checkpoint_iteration,
    checkpoint_path,
    complete_iterations,
    is_complete,
    saved_train_state,
)
from megatron.hyper_connections.training.parser import (
    UsageError,
    non_negative_int,
    parse_and_check,
    positive_float,
    positive_int,
)

__all__ = ["generate", "generate_ids", "loaded_model", "main", "saved_args"]

PROG = "tools/generate.py"

# Flags of the run replaced for one process: no parallelism, nothing that only training uses.
_SINGLE_PROCESS = dict(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None,
    context_parallel_size=1,
    expert_model_parallel_size=1,
    sequence_parallel=False,
    world_size=1,
    data_parallel_size=1,
    use_distributed_optimizer=False,
    overlap_grad_reduce=False,
    recompute_granularity=None,
    recompute_method=None,
    recompute_num_layers=None,
    recompute_modules=None,
)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: check the options and the checkpoint, load, generate, print."""
    options = parse_args(argv)
    with loaded_model(options.load, options.iteration) as (model, tokenizer, _):
        generator = None
        if options.top_k is not None:
            generator = torch.Generator().manual_seed(options.seed)
        text = generate(
            model,
            tokenizer,
            options.prompt,
            options.max_new_tokens,
            top_k=options.top_k,
            temperature=options.temperature,
            generator=generator,
        )
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with a checkpoint of megatron-hc-pretrain.",
        allow_abbrev=False,
    )
    parser.add_argument("--load", required=True, help="checkpoint directory of the run")
    parser.add_argument(
        "--iteration", type=non_negative_int, help="default: the last complete checkpoint"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=64)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="the most likely token (default)")
    mode.add_argument("--top-k", type=positive_int, help="sample from the K most likely tokens")
    parser.add_argument("--temperature", type=positive_float, help="with --top-k; default: 1.0")
    parser.add_argument("--seed", type=non_negative_int, help="with --top-k; default: 1234")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed options with the checkpoint's iteration resolved; a usage error (exit status 2)
    for bad options or a missing or incomplete checkpoint, before anything is built."""
    return parse_and_check(build_parser(), argv, check_options)


def check_options(options: argparse.Namespace) -> None:
    """Check ``options`` (raising ``UsageError``), resolve ``iteration`` and set defaults."""
    if options.top_k is None:
        for flag in ("temperature", "seed"):
            if getattr(options, flag) is not None:
                raise UsageError(
                    f"--{flag} {getattr(options, flag)}: only sampling (--top-k K) uses it; "
                    "greedy decoding has no randomness"
                )
    try:
        options.prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        # Python keeps undecodable bytes of the command line as lone surrogates.
        bad = options.prompt[error.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"--prompt is not valid UTF-8 text (byte {bad[0]:#04x} at character {error.start}): "
            "give the prompt in UTF-8"
        ) from None
    options.temperature = 1.0 if options.temperature is None else options.temperature
    options.seed = 1234 if options.seed is None else options.seed
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        raise UsageError(
            f"runs in one process (WORLD_SIZE is {world_size}): start it without torchrun"
        )
    options.iteration = resolve_iteration(options.load, options.iteration)


def resolve_iteration(load: str | os.PathLike, iteration: int | None = None) -> int:
    """The iteration to load from ``load``: ``iteration`` if given, else the last complete
    one; ``UsageError`` if ``load`` holds no such checkpoint."""
    directory = Path(load)
    if not directory.is_dir():
        raise UsageError(f"--load {load}: no such directory")
    if iteration is None:
        iteration = checkpoint_iteration(directory)  # UsageError for a broken tracker
        if iteration is None:
            raise UsageError(
                f"--load {load}: no checkpoint there (no {TRACKER_FILE}); "
                "is it the --save directory of a run?"
            )
    elif not is_complete(directory, iteration):
        found = complete_iterations(directory)
        raise UsageError(
            f"--iteration {iteration}: no complete checkpoint of it in {load} "
            f"(complete ones: {', '.join(map(str, found)) or 'none'})"
        )
    if not (checkpoint_path(directory, iteration) / "model").is_dir():
        raise UsageError(f"--load {load}: {checkpoint_path(directory, iteration)} has no model/")
    return iteration


def saved_args(load: str | os.PathLike, iteration: int) -> argparse.Namespace:
    """The run's flags from its checkpoint, changed for one process with TP = PP = 1; a flag
    added to the trainer after the run has its default."""
    from megatron.hyper_connections.training.parser import build_parser as trainer_parser

    defaults = vars(trainer_parser().parse_args([]))
    args = argparse.Namespace(**{**defaults, **saved_train_state(load, iteration)["args"]})
    for name, value in _SINGLE_PROCESS.items():
        setattr(args, name, value)
    if args.transformer_impl == "transformer_engine" and not torch.cuda.is_available():
        raise UsageError(
            f"--load {load}: the run used --transformer-impl transformer_engine, which needs a GPU"
        )
    return args


@contextlib.contextmanager
def loaded_model(
    load: str | os.PathLike, iteration: int | None = None
) -> Iterator[tuple[torch.nn.Module, Any, argparse.Namespace]]:
    """Set up one process (torch.distributed and megatron's parallel state, TP = PP = 1),
    rebuild the run's model and tokenizer and load the checkpoint's weights; yields
    ``(model, tokenizer, train_args)`` with the model in eval mode, tears down on exit."""
    from megatron.hyper_connections.checkpointing import load_checkpoint
    from megatron.hyper_connections.training.distributed import megatron_parallel_state
    from megatron.hyper_connections.training.factories import (
        model_chunks,
        tokenizer_from_args,
        transformer_config,
    )

    iteration = resolve_iteration(load, iteration)
    args = saved_args(load, iteration)
    tokenizer = tokenizer_from_args(args)
    with megatron_parallel_state(args):
        config = transformer_config(args)
        (model,) = model_chunks(args, config)  # not in DDP: nothing to reduce
        load_checkpoint(model, checkpoint_path(load, iteration) / "model")
        model.eval()
        # What generate() keeps the context to: the run's sequence length.
        model.generation_context_length = args.seq_length
        yield model, tokenizer, args


def generate(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> str:
    """``prompt`` followed by the text of ``max_new_tokens`` generated tokens: greedy without
    ``top_k``, else sampled from the ``top_k`` most likely tokens at ``temperature`` (with
    ``generator``, for reproducible samples). See ``generate_ids``."""
    prompt_ids = tokenizer.tokenize(prompt)
    ids = generate_ids(
        model,
        prompt_ids,
        max_new_tokens,
        top_k=top_k,
        temperature=temperature,
        generator=generator,
        vocab_size=tokenizer.vocab_size,
        start_id=tokenizer.eod,
    )
    return prompt + tokenizer.detokenize(ids[len(prompt_ids) :])


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    start_id: int | None = None,
    context_length: int | None = None,
) -> list[int]:
    """``prompt_ids`` followed by ``max_new_tokens`` generated ids.

    Each new id comes from a full forward pass over the last ``context_length`` ids (default:
    the run's sequence length set by ``loaded_model``, else the model's
    ``max_sequence_length``). Ids from ``vocab_size`` on (the padding of the output layer) are
    never chosen. An empty prompt starts from ``start_id`` (the end-of-document id), which is
    not part of the result. The model (one chunk, TP = PP = 1, possibly DDP- or
    Float16Module-wrapped) runs in eval mode and is put back in its mode afterwards.
    """
    from megatron.core.utils import unwrap_model

    if not isinstance(model, torch.nn.Module):
        (model,) = model  # one chunk: PP = 1 without virtual stages
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not prompt_ids and start_id is None and max_new_tokens > 0:
        raise ValueError("an empty prompt needs start_id (the tokenizer's end-of-document id)")
    inner = unwrap_model(model)
    if context_length is None:
        context_length = getattr(model, "generation_context_length", None)
    if context_length is None:
        context_length = inner.max_sequence_length
    device = next(model.parameters()).device
    ids = [int(i) for i in prompt_ids]
    start = [] if ids else [int(start_id)] if start_id is not None else []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = (start + ids)[-context_length:]
            tokens = torch.tensor([context], dtype=torch.long, device=device)
            positions = torch.arange(len(context), device=device).unsqueeze(0)
            logits = model(tokens, positions, None)[0, -1].float()  # [padded vocab]
            if vocab_size is not None:
                logits[vocab_size:] = float("-inf")
            if top_k is None:
                next_id = int(torch.argmax(logits))
            else:
                values, indices = torch.topk(logits, min(top_k, vocab_size or logits.numel()))
                probs = torch.softmax(values / temperature, dim=-1).cpu()
                choice = torch.multinomial(probs, 1, generator=generator)
                next_id = int(indices[int(choice)])
            ids.append(next_id)
    finally:
        model.train(was_training)
    return ids


if __name__ == "__main__":
    main()
