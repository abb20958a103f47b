"""Pretrain a GPT with hyper-connections (HC, mHC) on megatron-core, from one process to many.

    python -m megatron.hyper_connections.training.pretrain --use-hyper-connections \\
        --num-residual-streams 4 --use-manifold-hyper-connections          # a CPU demo
    torchrun --nproc-per-node 8 -m megatron.hyper_connections.training.pretrain [flags]

(``megatron-hc-pretrain`` is the same as a console script.) The flags are Megatron-LM's; see
``parser`` and ``checks``. Every piece is megatron-core's: its parallel state (``distributed``),
``GPTDataset`` (through the package's data module), the package's ``GPTModel`` on megatron-core's
layer specs, ``DistributedDataParallel``, ``get_megatron_optimizer`` (with no weight decay on
the connection parameters of HC), ``OptimizerParamScheduler`` (``factories``), the pipeline
schedules and ``finalize_model_grads``. ``pretrain`` reads top to bottom: set-up, data, model,
optimizer, resume, then the loop (train step, logging, validation, checkpoint); the helpers
follow in the same order.

Nothing is written to the checkpoint or log directories before every flag has been checked
and the run has set up and loaded its checkpoint (see ``checkpoints`` for their layout), and
then only by the one run that holds the lock of ``--save``. A run ends after ``--train-iters``
or earlier (``exits``): on a non-finite loss or gradient, before the update, with an error
(exit status 1); or, after saving a checkpoint, on SIGTERM (``--exit-signal-handler``), after
``--exit-duration-in-mins`` or at an ``--exit-interval`` (exit status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank
from torch import Tensor

from ..data.corpus import DEFAULT_MAX_BYTES, stdlib_documents
from ..data.datasets import build_gpt_datasets, parse_data_path
from ..options import hyper_connection_variant
from .checkpoints import (
    TrainState,
    load_training_checkpoint,
    locked_save_directory,
    resume_iteration,
    save_training_checkpoint,
)
from .checks import parse_args
from .distributed import megatron_parallel_state
from .exits import ExitConditions, NonFiniteError
from .factories import (
    distributed_data_parallel,
    model_chunks,
    optimizer_and_scheduler,
    tokenizer_from_args,
    transformer_config,
)
from .monitoring import TrainingMonitor
from .parser import EMBEDDED, PROG, UsageError, embedded_cache_dir

__all__ = ["TrainState", "main", "pretrain"]


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``megatron-hc-pretrain``): check the flags, then train. A run
    refused (another holds ``--save``) exits with status 2, one stopped at a non-finite value
    with status 1; rank 0 says why."""
    args = parse_args(argv)
    try:
        pretrain(args)
    except (UsageError, NonFiniteError) as error:
        if _global_rank() == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, UsageError) else 1)
    except RuntimeError as error:
        if "timed out" in str(error).lower():  # gloo's words; NCCL's watchdog aborts instead
            print(
                f"{PROG}: error: rank {_global_rank()}: a collective waited longer than "
                f"--distributed-timeout-minutes {args.distributed_timeout_minutes:g} for another "
                "rank (hung, stopped or gone); the job ends",
                file=sys.stderr,
                flush=True,
            )
        raise


def pretrain(args: argparse.Namespace) -> None:
    """Train as ``args`` (from ``parse_args``) say. Run on every rank."""
    # Set-up: the conditions that end the run early (a SIGTERM counts from here), the lock of
    # --save (rank 0), torch.distributed (gloo on CPU, NCCL on GPU) and megatron's parallel
    # state.
    with (
        ExitConditions(args) as exits,
        locked_save_directory(args.save if _global_rank() == 0 else None),
        megatron_parallel_state(args),
    ):
        # Data: megatron-core GPT datasets; each data-parallel rank reads its own micro-batches.
        tokenizer = tokenizer_from_args(args)
        train_data, valid_data = train_and_valid_datasets(args, tokenizer)

        # Model: this rank's chunks (one per virtual pipeline stage), wrapped in megatron's DDP.
        config = transformer_config(args)
        model = distributed_data_parallel(args, config, model_chunks(args, config))

        # Optimizer: Adam from megatron-core (distributed or not), its LR schedule, and the
        # functions megatron's schedules call to scale the loss and reduce the gradients.
        optimizer, scheduler = optimizer_and_scheduler(args, model)
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        if args.overlap_grad_reduce:
            config.no_sync_func = _one_or_list([chunk.no_sync for chunk in model])
            config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in model])

        # Resume: weights, optimizer, schedule, random states and the position in the data.
        state = TrainState()
        if resume_iteration(args) is not None:
            state = load_training_checkpoint(args, model, optimizer, scheduler)

        train_batches = micro_batches(args, train_data, state.consumed_train_samples, len(model))
        forward_backward = get_forward_backward_func()
        loss_since_log = torch.zeros(2, device=_device())  # [sum of token losses, tokens]
        with contextlib.closing(TrainingMonitor(args, state.iteration)) as monitor:
            monitor.print(describe_run(args, state))
            exit_reason = None
            while state.iteration < args.train_iters and exit_reason is None:
                started = time.perf_counter()
                loss, grad_norm, updated, exit_reason = train_step(
                    args,
                    model,
                    optimizer,
                    forward_backward,
                    train_batches,
                    exits,
                    state.iteration + 1,
                )
                if updated:  # an fp16 step skipped for overflow does not advance the schedule
                    scheduler.step(increment=1)
                state.iteration += 1
                state.consumed_train_samples += args.global_batch_size
                loss_since_log += loss
                monitor.record_step(grad_norm, updated, time.perf_counter() - started)

                # Logging, validation and checkpoints at their intervals and at the end (an
                # early exit logs and saves too).
                last = state.iteration == args.train_iters or exit_reason is not None
                if state.iteration % args.log_interval == 0 or last:
                    monitor.log_training(
                        state.iteration,
                        data_parallel_mean(loss_since_log),
                        optimizer.param_groups[0]["lr"],
                        model,
                        optimizer.get_loss_scale().item() if args.fp16 else None,
                    )
                    loss_since_log.zero_()
                if args.eval_iters > 0 and (
                    state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters
                ):
                    validation_loss = evaluate(args, model, forward_backward, valid_data)
                    monitor.log_validation(state.iteration, validation_loss)
                if args.save is not None and (
                    (args.save_interval and state.iteration % args.save_interval == 0) or last
                ):
                    save_finite_checkpoint(args, state, model, optimizer, scheduler, monitor)
            if exit_reason is not None:
                monitor.print(exit_reason)
            monitor.print_summary()


def save_finite_checkpoint(
    args: argparse.Namespace,
    state: TrainState,
    model: list,
    optimizer: Any,
    scheduler: Any,
    monitor: TrainingMonitor,
) -> None:
    """``save_training_checkpoint``; a model with non-finite parameters stops the run, or,
    with ``--no-check-for-nan-in-loss-and-grad``, is left unsaved with a warning."""
    try:
        save_training_checkpoint(args, state, model, optimizer, scheduler)
    except NonFiniteError as error:
        if args.check_for_nan_in_loss_and_grad:
            raise
        monitor.print(f"warning: {error} (--no-check-for-nan-in-loss-and-grad: training goes on)")


def describe_run(args: argparse.Namespace, state: TrainState) -> str:
    """One line: the model, the parallel layout, the batch and where training starts."""
    variant = hyper_connection_variant(args)  # the flags carry every config field's name
    if args.use_hyper_connections:
        frac = args.num_fracs > 1
        variant += f", m = {args.num_fracs}" if frac else f", n = {args.num_residual_streams}"
    if state.iteration:
        start = f"resuming at iteration {state.iteration}"
    else:
        start = "starting" if args.load is None else f"no checkpoint in {args.load}: starting"
    return (
        f"GPT {args.num_layers} layers x {args.hidden_size} hidden, {variant}; "
        f"TP {args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x "
        f"CP {args.context_parallel_size} x DP {args.data_parallel_size}; global batch "
        f"{args.global_batch_size} x {args.seq_length} tokens; {start} of {args.train_iters}"
    )


# --------------------------------------------------------------------------------------------
# Data


def train_and_valid_datasets(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any]:
    """megatron-core ``GPTDataset``s for ``--data-path`` and ``--split``, sized for the run:
    ``--train-iters`` global batches of training data, ``--eval-iters`` of validation data
    (``None`` without validation)."""
    data_path = [
        embedded_corpus_prefix(args, tokenizer) if item == EMBEDDED else item
        for item in args.data_path
    ]
    # The test split is not used, but megatron-core builds every split with a weight: one
    # epoch (cheap, and fine for a split without documents), or one sample of a weighted
    # blend, which has to be drawn to a size.
    prefixes, weights = parse_data_path(data_path)
    test_samples = 1 if weights is not None and len(prefixes) > 1 else None
    train, valid, _ = build_gpt_datasets(
        data_path,
        tokenizer=tokenizer,
        seq_length=args.seq_length,
        split=args.split,
        seed=args.seed,
        num_samples=(
            args.train_iters * args.global_batch_size,
            args.eval_iters * args.global_batch_size,
            test_samples,
        ),
        path_to_cache=args.data_cache_path,
        check_vocab=False,  # checked with the flags, before set-up
    )
    return train, (valid if args.eval_iters > 0 else None)


def embedded_corpus_prefix(args: argparse.Namespace, tokenizer: Any) -> str:
    """The data prefix of the embedded corpus (the standard library's sources) tokenized by
    ``tokenizer``, written once into the data cache by one process per machine."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    cache = embedded_cache_dir(args)
    # The corpus depends on the Python installation, the ids on the tokenizer.
    identity = [tokenizer.unique_identifiers, sys.version, DEFAULT_MAX_BYTES]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    prefix = cache / f"embedded-{digest}_text_document"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not prefix.with_suffix(".idx").exists():
        cache.mkdir(parents=True, exist_ok=True)
        staging = cache / f".{prefix.name}.{socket.gethostname()}.{os.getpid()}"
        builder = IndexedDatasetBuilder(
            f"{staging}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size)
        )
        for document in stdlib_documents():
            ids = [*tokenizer.tokenize(document.text), tokenizer.eod]
            builder.add_document(ids, [len(ids)])
        builder.finalize(f"{staging}.idx")
        # The .idx last: a prefix with an .idx is complete.
        os.replace(f"{staging}.bin", prefix.with_suffix(".bin"))
        os.replace(f"{staging}.idx", prefix.with_suffix(".idx"))
    dist.barrier()
    return str(prefix)


def micro_batches(
    args: argparse.Namespace, dataset: Any, first_sample: int, num_chunks: int
) -> Iterator[dict[str, Tensor]] | list[Iterator[dict[str, Tensor]]]:
    """This data-parallel rank's micro-batches of ``dataset`` from sample ``first_sample`` on,
    as megatron's schedules take them: one iterator, or one per virtual pipeline stage (each
    chunk draws the same sequence). Every ``micro_batch_size x data-parallel size``
    consecutive samples are one micro-batch of each data-parallel rank, in rank order."""

    def one_iterator() -> Iterator[dict[str, Tensor]]:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_MicroBatchIndices(
                first_sample,
                len(dataset),
                args.micro_batch_size,
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(),
            ),
            num_workers=args.num_workers,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating a loader must not draw from the global RNG, whose
            # state a resumed run restores.
            generator=torch.Generator(),
        )
        return iter(loader)

    iterators = [one_iterator() for _ in range(num_chunks)]
    return iterators[0] if num_chunks == 1 else iterators


class _MicroBatchIndices:
    """Sample indices of one data-parallel rank's micro-batches, in order (a batch sampler)."""

    def __init__(self, first: int, end: int, micro_batch_size: int, rank: int, size: int) -> None:
        self.first, self.end = first, end
        self.micro_batch_size, self.rank, self.size = micro_batch_size, rank, size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.size
        for start in range(self.first, self.end - step + 1, step):
            mine = start + self.rank * self.micro_batch_size
            yield list(range(mine, mine + self.micro_batch_size))

    def __len__(self) -> int:
        return (self.end - self.first) // (self.micro_batch_size * self.size)


def next_micro_batch(batches: Iterator[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The next micro-batch on this rank's device, cut to this rank's part of the sequence
    under context parallelism."""
    batch = {key: value.to(_device(), non_blocking=True) for key, value in next(batches).items()}
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch)
    return batch


# --------------------------------------------------------------------------------------------
# Training and validation steps


def train_step(
    args: argparse.Namespace,
    model: list,
    optimizer: Any,
    forward_backward: Callable,
    batches: Any,
    exits: ExitConditions,
    iteration: int,
) -> tuple[Tensor, float | None, bool, str | None]:
    """One optimizer step over a global batch, that of ``iteration``. Returns its [loss sum,
    tokens] on this rank (zeros off the last pipeline stage), the gradient norm, whether the
    update was applied (fp16 skips it when the gradients overflow) and why the run ends
    after it (None: it goes on). Raises ``NonFiniteError`` before the update for a
    non-finite loss or gradient (see ``exits``)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(args, forward_backward, model, batches, forward_only=False)
    loss = _summed_loss(outputs)
    exit_reason = exits.check_step(iteration, loss, model)
    updated, grad_norm, _ = optimizer.step()
    return loss, grad_norm, updated, exit_reason


def run_schedule(
    args: argparse.Namespace,
    forward_backward: Callable,
    model: list,
    batches: Iterator[dict[str, Tensor]],
    forward_only: bool,
) -> list:
    """One global batch through megatron-core's schedule; the per-microbatch loss outputs."""
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model,
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )


def forward_step(batches: Iterator[dict[str, Tensor]], model: torch.nn.Module) -> tuple:
    """megatron's forward-step function: the model's per-token losses and how to reduce them."""
    batch = next_micro_batch(batches)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token_loss, partial(masked_loss, batch["loss_mask"])


def masked_loss(loss_mask: Tensor, per_token_loss: Tensor) -> tuple[Tensor, Tensor, dict]:
    """megatron-core's three-value loss: the sum over unmasked tokens and their count (the
    schedule divides one by the other) and, for logging, both in a new tensor (the schedule
    divides the loss in place)."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}


def evaluate(
    args: argparse.Namespace, model: list, forward_backward: Callable, valid_data: Any
) -> float | None:
    """The mean validation loss (on the last pipeline stage) over the first ``--eval-iters``
    global batches of the validation set: the same batches every time, so evaluations compare
    across a run and its resumptions."""
    for chunk in model:
        chunk.eval()
    loss = torch.zeros(2, device=_device())
    batches = micro_batches(args, valid_data, 0, len(model))
    with torch.no_grad():
        for _ in range(args.eval_iters):
            loss += _summed_loss(
                run_schedule(args, forward_backward, model, batches, forward_only=True)
            )
    for chunk in model:
        chunk.train()
    return data_parallel_mean(loss)


def data_parallel_mean(loss: Tensor) -> float | None:
    """Loss sum / tokens over all data- and context-parallel ranks, on the last pipeline
    stage (a collective there); None elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = loss.clone()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1]).item()


def _summed_loss(outputs: list[dict[str, Tensor]]) -> Tensor:
    total = torch.zeros(2, device=_device())
    for output in outputs:
        total += output["lm loss"]
    return total


# --------------------------------------------------------------------------------------------


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def _global_rank() -> int:
    """This process's rank, also before the process group exists (torchrun's ``RANK``)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _one_or_list(items: list) -> Any:
    return items[0] if len(items) == 1 else items


if __name__ == "__main__":
    main()
