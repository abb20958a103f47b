"""Let megatron-core 0.16.1 run on CPU with the gloo backend (for multi-process tests).

megatron-core assumes a CUDA device in a handful of places that its tensor, pipeline and data
parallel code paths go through even when every tensor lives on the CPU. `enable_cpu_megatron()`
patches exactly those places, process-wide, and only when `torch.cuda.is_available()` is False:
with CUDA it does nothing, so code that calls it runs unchanged on GPUs.

What is replaced, and why:

* `torch.cuda.current_device` -> the CPU device: megatron allocates buffers with
  `device=torch.cuda.current_device()` (p2p shape/activation buffers, sequence-parallel
  gathers, DDP grad buffers, optimizer and timer scratch tensors).
* `torch.cuda.synchronize` -> no-op: p2p communication, distributed-checkpoint preloading,
  timers and DDP call it; CPU ops and waited-on gloo work are already complete.
* `torch.cuda.Stream` / `torch.cuda.current_stream` -> a do-nothing stand-in, and the MoE
  all-to-all token dispatcher's `maybe_move_tensor_to_cpu` -> one that also converts CPU tensors
  to numpy: the dispatcher copies the all-to-all split sizes to the host on a side stream, and
  only turns them into the lists `all_to_all_single` needs when they start on a GPU.
* `torch.cuda.manual_seed` / `torch.cuda.get_rng_state` and megatron's private
  `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> the CPU default
  generator: `model_parallel_cuda_manual_seed` and `CudaRNGStatesTracker.add()/fork()` keep the
  per-TP-rank "device" RNG streams. On CPU the device generator *is* the CPU generator, so forking
  it keeps megatron's semantics (a distinct model-parallel stream per TP rank, a default stream
  shared by the ranks of a TP group); `fork()`'s warning that the CPU RNG moved is silenced.
* `moe_utils.te_general_gemm` -> None when Transformer Engine (CUDA-only) is absent: the MoE
  router's gating GEMM tests `te_general_gemm is not None`, a name that is only bound with TE.
* `WrappedTorchNorm` (the local spec's norm when the CUDA-only Apex is absent) refuses
  `sequence_parallel` only because nothing would mark its weights for the TP all-reduce of
  `finalize_model_grads`; on CPU it builds the same torch norm and marks them.
* A torch function mode, active for the rest of the process (and, since autograd runs
  backward with no mode active, re-entered in megatron's recompute backward), that
  - sends `device="cuda"` arguments of tensor factories and `Tensor.cuda()` / `.to("cuda")` to
    the CPU: several megatron functions hard-code `device="cuda"` (the token counters of the
    pipeline schedules, the optimizer's scale tensors, the default causal attention mask);
  - answers `Tensor.type()` for CPU tensors with the CUDA type name, only when the caller is
    megatron-core: the distributed optimizer and grad clipping dispatch on
    `param.type() == "torch.cuda.FloatTensor"` and reject anything else.
  Torch function modes are thread-local: the mode covers the thread that first enabled it (the
  one that runs megatron), not Python threads started elsewhere.

`initialize_distributed()` uses gloo on CPU and NCCL with CUDA.

Megatron-LM's trainer (``megatron.training``, from megatron-core >= 0.17 or a Megatron-LM
checkout) needs five things more, which `enable_cpu_megatron_training()` adds, again only
without CUDA:

* `initialize_megatron` asserts CUDA unless called with ``allow_no_cuda=True``; its
  `pretrain` calls it without, so `pretrain`'s reference to it passes that flag.
* `_initialize_distributed` sets up megatron's parallel state, and `_set_random_seed` the
  model-parallel RNG streams, only when `torch.cuda.device_count() > 0`: both run seeing one
  device, whose `torch.cuda.set_device` does nothing (the CPU is the device).
* `validate_args` reads the GPU architecture (`get_device_arch_version`) for tensor or context
  parallelism; on a CPU it answers 0, so Megatron-LM applies its pre-Blackwell rules (which ask
  for ``CUDA_DEVICE_MAX_CONNECTIONS=1``, as its example scripts set).
* Megatron-LM up to 0.16 compiles its legacy fused CUDA kernels at start-up
  (`megatron.legacy.fused_kernels.load`, which needs nvcc); there are none to load on a CPU.
* On a CPU the "device" random numbers are the CPU generator's, and a data loader draws its
  base seed from that generator when its iterator starts. Megatron-LM starts its iterators
  after restoring a checkpoint's random states, so a resumed run would drop out other units
  than the uninterrupted one (on a GPU dropout draws from the CUDA generator, which loaders
  leave alone): `build_pretraining_data_loader`'s loaders get a generator of their own.

The rest is flags of Megatron-LM's own, for what a CPU lacks: ``--distributed-backend gloo``,
``--transformer-impl local``, ``--no-gradient-accumulation-fusion``, ``--no-persist-layer-norm``
and ``--no-masked-softmax-fusion`` (no Apex, Transformer Engine or compiled Megatron kernels).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = [
    "destroy_distributed",
    "enable_cpu_megatron",
    "enable_cpu_megatron_training",
    "initialize_distributed",
]

_CPU = torch.device("cpu")
_enabled = False
_mode_entered = False
_training_enabled = False


def _is_cuda(device: Any) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def _called_from_megatron_core(depth: int) -> bool:
    module = sys._getframe(depth).f_globals.get("__name__", "")
    return module.startswith("megatron.core")


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placement requests to the CPU and keeps megatron's CUDA type checks happy."""

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and args[0].device.type == "cpu"
            and _called_from_megatron_core(depth=2)
        ):
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


def _get_cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


class _CpuStream:
    """Stands in for a CUDA stream and its events: CPU work is already ordered and complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuStream:
        return self

    def synchronize(self) -> None:
        pass


def _to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _marking_sequence_parallel(torch_norm_new: Callable[..., Any]) -> Callable[..., Any]:
    def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return torch_norm_new(cls, config, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = torch_norm_new(cls, plain, *args, **kwargs)
        # Each TP rank normalises a slice of the sequence: finalize_model_grads sums these grads.
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return new


def _under_cpu_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapped


def enable_cpu_megatron(*, function_mode: bool = True) -> None:
    """Patch megatron-core's CUDA assumptions for CPU use; idempotent, a no-op with CUDA.

    ``function_mode=False`` leaves out the torch function mode: a single-process benchmark
    that passes its own attention mask and uses no schedule or optimizer does not need it,
    and should not time its per-op cost.
    """
    global _enabled, _mode_entered
    if torch.cuda.is_available():
        return
    if function_mode and not _mode_entered:
        # schedules/optimizer/causal mask hard-code device="cuda"; DistributedOptimizer checks
        # param.type() == "torch.cuda.FloatTensor".
        _CudaToCpuMode().__enter__()
        _mode_entered = True
    if _enabled:
        return
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    # p2p_communication, mappings, DDP buffers, optimizer, timers allocate on current_device().
    torch.cuda.current_device = lambda: _CPU
    # p2p_communication._communicate and filesystem_async.preload_tensors wait on the GPU.
    torch.cuda.synchronize = lambda device=None: None
    # MoEAlltoAllTokenDispatcher copies token counts to the host on a side stream...
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    # ...and converts the all-to-all split sizes to numpy only for CUDA tensors.
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host
    # model_parallel_cuda_manual_seed() and CudaRNGStatesTracker.add() seed/read the device RNG.
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.get_rng_state = _get_cpu_rng_state
    # CudaRNGStatesTracker.fork() swaps "device" RNG states through these private helpers.
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # fork() warns whenever the CPU RNG moves inside it, which on CPU is the point of forking.
    logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())
    # get_gpt_layer_local_spec() without Apex uses WrappedTorchNorm, which rejects SP.
    WrappedTorchNorm.__new__ = _marking_sequence_parallel(WrappedTorchNorm.__new__)
    # RouterGatingLinearFunction tests `te_general_gemm is not None`, a name bound only with TE.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # Activation recompute re-runs forward code inside autograd's backward, where no torch
    # function mode is active.
    mcore_random.CheckpointFunction.backward = staticmethod(
        _under_cpu_mode(mcore_random.CheckpointFunction.backward)
    )
    mcore_random.CheckpointWithoutOutput._recompute = _under_cpu_mode(
        mcore_random.CheckpointWithoutOutput._recompute
    )
    _enabled = True


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    seed: int = 1234,
    function_mode: bool = True,
) -> None:
    """Set up torch.distributed (from torchrun env vars), megatron's parallel state and RNG;
    ``function_mode`` as in ``enable_cpu_megatron``."""
    from megatron.core import parallel_state, tensor_parallel

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        enable_cpu_megatron(function_mode=function_mode)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if not on_cpu:
            torch.cuda.set_device(
                int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
            )
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=rank, world_size=world_size
        )
    parallel_state.initialize_model_parallel(
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
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Megatron-LM's trainer (megatron.training)


def _allowing_no_cuda(initialize_megatron: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(initialize_megatron)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        return initialize_megatron(*args, **{**kwargs, "allow_no_cuda": True})

    return initialize


def _seeing_one_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        device_count, set_device = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda device: None
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = device_count, set_device

    return wrapped


def _with_own_generator(build_loader: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(build_loader)
    def build(*args: Any, **kwargs: Any) -> Any:
        loader = build_loader(*args, **kwargs)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator()
        return loader

    return build


def enable_cpu_megatron_training() -> None:
    """`enable_cpu_megatron()` plus what Megatron-LM's trainer needs on a CPU (see the module
    docstring); idempotent, a no-op with CUDA."""
    global _training_enabled
    if torch.cuda.is_available() or _training_enabled:
        return
    enable_cpu_megatron()
    from megatron.training import arguments, initialize, training

    training.initialize_megatron = _allowing_no_cuda(initialize.initialize_megatron)
    initialize._initialize_distributed = _seeing_one_device(initialize._initialize_distributed)
    initialize._set_random_seed = _seeing_one_device(initialize._set_random_seed)
    arguments.get_device_arch_version = lambda: 0
    training.build_pretraining_data_loader = _with_own_generator(
        training.build_pretraining_data_loader
    )
    try:  # Megatron-LM checkouts up to 0.16
        from megatron.legacy import fused_kernels
    except ImportError:
        pass
    else:
        fused_kernels.load = lambda args: None
    _training_enabled = True
