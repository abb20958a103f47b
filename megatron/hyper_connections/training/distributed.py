"""torch.distributed and megatron-core's parallel state for a run, on GPUs or on the CPU.

``initialize_distributed`` is the one place where a process joins its process group: NCCL on
this rank's GPU with CUDA, gloo without. Without CUDA it first enables the package's CPU layer
(``cpu_compat.enable_cpu_megatron``, which says in the log, once per process, that it did):
megatron-core assumes a GPU in places its parallel code goes through, and the layer redirects
those to the CPU. With CUDA the CPU layer is never enabled. The tests set up their process
groups through the same function.

``megatron_parallel_state(args)`` does it for the trainer's flags and tears it down again.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from ..cpu_compat import enable_cpu_megatron

__all__ = [
    "destroy_distributed",
    "free_port",
    "initialize_distributed",
    "megatron_parallel_state",
]


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    seed: int = 1234,
    function_mode: bool = True,
    timeout_minutes: float = 10.0,
) -> None:
    """Set up torch.distributed (from torchrun's environment; one process without it gets a
    local rendezvous), megatron's parallel state and its random seeds. Without CUDA, enable
    the CPU layer first (``function_mode`` as in ``cpu_compat.enable_cpu_megatron``).

    A collective of any of the process groups that waits ``timeout_minutes`` for another
    rank (a hung or stopped one) fails, and with it this rank, so that the job ends (gloo
    raises; NCCL's watchdog aborts the process)."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        enable_cpu_megatron(function_mode=function_mode)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:  # e.g. one process started without torchrun
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if not on_cpu:
            torch.cuda.set_device(
                int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
            )
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        distributed_timeout_minutes=timeout_minutes,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    # Same CPU seed on every rank, so use_cpu_initialization builds identical master weights.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def megatron_parallel_state(args: argparse.Namespace) -> Iterator[None]:
    """torch.distributed and megatron's parallel state for the flags' layout and seed, torn
    down on exit; a process group set up by the caller stays."""
    started_here = not dist.is_initialized()
    initialize_distributed(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    try:
        yield
    finally:
        if started_here:
            destroy_distributed()
        else:
            parallel_state.destroy_model_parallel()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
