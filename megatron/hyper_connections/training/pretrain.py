"""Pretrain a GPT with hyper-connections (HC, mHC) on megatron-core, from one process to many.

    python -m megatron.hyper_connections.training.pretrain --use-hyper-connections \\
        --num-residual-streams 4 --use-manifold-hyper-connections          # a CPU demo
    torchrun --nproc-per-node 8 -m megatron.hyper_connections.training.pretrain [flags]

(``megatron-hc-pretrain`` is the same as a console script.) The flags are Megatron-LM's; see
``arguments``. Every piece is megatron-core's: its parallel state, ``GPTDataset`` (through the
package's data module), the package's ``GPTModel`` on megatron-core's layer specs,
``DistributedDataParallel``, ``get_megatron_optimizer`` (with no weight decay on the
connection parameters of HC), ``OptimizerParamScheduler``, the pipeline schedules and
``finalize_model_grads``. ``pretrain`` reads top to bottom: set-up, data, model, optimizer,
resume, then the loop (train step, logging, validation, checkpoint); the helpers follow in the
same order.

Checkpoints (Megatron-LM's names where it has them)::

    <save>/latest_checkpointed_iteration.txt   iteration of the last complete checkpoint
    <save>/iter_0000100/model/                 the package's save_checkpoint (any TP/PP layout)
    <save>/iter_0000100/optimizer/             the optimizer's sharded state (dist_checkpointing)
    <save>/iter_0000100/train_state.pt         iteration, consumed samples, LR schedule, flags
    <save>/iter_0000100/rng/rank_00000.pt      each rank's random number generator states

A checkpoint is written under a temporary name, renamed once every rank has written its part,
and only then named in the tracker file, so a run killed at any moment leaves the previous
checkpoint intact as the latest. Nothing is written to the checkpoint or log directories
before every flag has been checked and the run has set up and loaded its checkpoint. A resumed
run continues the data where it stopped and restores the random states, so its losses are
those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_batch_on_this_cp_rank, unwrap_model
from torch import Tensor

from ..checkpointing import load_checkpoint, save_checkpoint
from ..cpu_compat import initialize_distributed
from ..data.corpus import DEFAULT_MAX_BYTES, stdlib_documents
from ..data.datasets import build_gpt_datasets, parse_data_path
from ..gpt_model import GPTModel
from ..optimizer import hyper_connection_config_overrides
from ..options import hyper_connection_variant
from .arguments import (
    EMBEDDED,
    TRACKER_FILE,
    args_as_dict,
    checkpoint_iteration,
    checkpoint_path,
    embedded_cache_dir,
    optimizer_config,
    parse_args,
    tokenizer_from_args,
    transformer_config,
)
from .monitoring import TrainingMonitor

__all__ = ["TrainState", "main", "pretrain"]

# megatron-core's distributed-optimizer checkpoint format (Megatron-LM's default): every rank
# writes its own shard in parallel.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``megatron-hc-pretrain``): check the flags, then train."""
    pretrain(parse_args(argv))


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    iteration: int = 0
    consumed_train_samples: int = 0


def pretrain(args: argparse.Namespace) -> None:
    """Train as ``args`` (from ``parse_args``) say. Run on every rank."""
    # Set-up: torch.distributed (gloo on CPU, NCCL on GPU) and megatron's parallel state.
    with megatron_parallel_state(args):
        # Data: megatron-core GPT datasets; each data-parallel rank reads its own micro-batches.
        tokenizer = tokenizer_from_args(args)
        train_data, valid_data = train_and_valid_datasets(args, tokenizer)

        # Model: this rank's chunks (one per virtual pipeline stage), wrapped in megatron's DDP.
        config = transformer_config(args)
        model = model_chunks(args, config)

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
        if args.load is not None and checkpoint_iteration(args.load) is not None:
            state = load_training_checkpoint(args, model, optimizer, scheduler)

        train_batches = micro_batches(args, train_data, state.consumed_train_samples, len(model))
        forward_backward = get_forward_backward_func()
        loss_since_log = torch.zeros(2, device=_device())  # [sum of token losses, tokens]
        with contextlib.closing(TrainingMonitor(args, state.iteration)) as monitor:
            monitor.print(describe_run(args, state))
            while state.iteration < args.train_iters:
                started = time.perf_counter()
                loss, grad_norm, updated = train_step(
                    args, model, optimizer, forward_backward, train_batches
                )
                if updated:  # an fp16 step skipped for overflow does not advance the schedule
                    scheduler.step(increment=1)
                state.iteration += 1
                state.consumed_train_samples += args.global_batch_size
                loss_since_log += loss
                monitor.record_step(grad_norm, updated, time.perf_counter() - started)

                # Logging, validation and checkpoints at their intervals and at the end.
                last = state.iteration == args.train_iters
                if state.iteration % args.log_interval == 0 or last:
                    monitor.log_training(
                        state.iteration,
                        data_parallel_mean(loss_since_log),
                        optimizer.param_groups[0]["lr"],
                        model,
                        optimizer.get_loss_scale().item() if args.fp16 else None,
                    )
                    loss_since_log.zero_()
                if args.eval_iters > 0 and (state.iteration % args.eval_interval == 0 or last):
                    validation_loss = evaluate(args, model, forward_backward, valid_data)
                    monitor.log_validation(state.iteration, validation_loss)
                if args.save is not None and (
                    (args.save_interval and state.iteration % args.save_interval == 0) or last
                ):
                    save_training_checkpoint(args, state, model, optimizer, scheduler)
            monitor.print_summary()


# --------------------------------------------------------------------------------------------
# Set-up


@contextlib.contextmanager
def megatron_parallel_state(args: argparse.Namespace) -> Iterator[None]:
    """torch.distributed (from torchrun's environment) and megatron's parallel state for the
    flags' layout and seed, torn down on exit; a process group set up by the caller stays."""
    started_here = not dist.is_initialized()
    if started_here and "MASTER_ADDR" not in os.environ:  # one process, not from torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    initialize_distributed(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        seed=args.seed,
    )
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started_here:
            dist.destroy_process_group()


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
# Model and optimizer


def model_chunks(args: argparse.Namespace, config: Any) -> list[DistributedDataParallel]:
    """This rank's model: one chunk per virtual pipeline stage (else the stage), each the
    package's ``GPTModel`` on megatron-core's layer spec, in fp16/bf16 if asked, in DDP."""
    if args.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=args.num_experts)
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=args.num_experts, normalization=args.normalization
        )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,  # Megatron-LM's choice: bf16 gradients reduce in fp32
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    vp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp) if vp else [None]:
        model = GPTModel(
            config,
            spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if args.fp16 or args.bf16:
            model = Float16Module(config, model)
        # Megatron-LM buckets only the first chunk's gradients for overlap; the others reduce
        # whole, when the schedule is done with them.
        chunks.append(
            DistributedDataParallel(
                config, ddp_config, model, disable_bucketing=vp_stage not in (None, 0)
            )
        )
    return chunks


def optimizer_and_scheduler(args: argparse.Namespace, model: list) -> tuple[Any, Any]:
    """megatron-core's Adam over ``model`` (no weight decay on HC's connection parameters)
    and its learning-rate schedule, stepped once per iteration."""
    config = optimizer_config(args)
    optimizer = get_megatron_optimizer(
        config, model, config_overrides=hyper_connection_config_overrides(config)
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------
# Training and validation steps


def train_step(
    args: argparse.Namespace,
    model: list,
    optimizer: Any,
    forward_backward: Callable,
    batches: Any,
) -> tuple[Tensor, float | None, bool]:
    """One optimizer step over a global batch. Returns its [loss sum, tokens] on this rank
    (zeros off the last pipeline stage), the gradient norm and whether the update was
    applied (fp16 skips it when the gradients overflow)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(args, forward_backward, model, batches, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    return _summed_loss(outputs), grad_norm, updated


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
# Checkpoints: the package's model checkpoint, plus what resuming needs


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
            staging / "train_state.pt",
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
    directory = checkpoint_path(args.load, checkpoint_iteration(args.load))
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
    saved = torch.load(directory / "train_state.pt", weights_only=True)
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


# --------------------------------------------------------------------------------------------


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_or_list(items: list) -> Any:
    return items[0] if len(items) == 1 else items


if __name__ == "__main__":
    main()
