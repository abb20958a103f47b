"""The CPU layer: megatron-core 0.16.1 on the CPU with the gloo backend, where it assumes a GPU.

megatron-core's tensor, pipeline and data parallel code, its optimizer and its schedules call
CUDA-only functions even when every tensor lives on the CPU. ``enable_cpu_megatron()`` replaces
exactly those, for the whole process and for the rest of its life (nothing is undone), and only
when ``torch.cuda.is_available()`` is False: with CUDA it changes nothing. It is enabled in one
place, ``training.distributed.initialize_distributed``, which the trainer, the tools and the
tests set up their process groups with, and it logs a warning the first time it is enabled in a
process. ``tools/benchmark.py`` enables it without the torch function mode (item 11), whose
per-op cost it would otherwise time.

What is replaced, and why (in the order ``enable_cpu_megatron`` does it):

1. ``torch.cuda.current_device`` -> the CPU device: megatron allocates buffers with
   ``device=torch.cuda.current_device()`` (p2p shape and activation buffers, sequence-parallel
   gathers, DDP gradient buffers, optimizer and timer scratch tensors).
2. ``torch.cuda.synchronize`` -> a no-op: p2p communication, distributed-checkpoint
   preloading, timers and DDP call it; CPU ops and waited-on gloo work are already complete.
3. ``torch.cuda.Stream`` and ``torch.cuda.current_stream`` -> a do-nothing stream: the MoE
   all-to-all token dispatcher copies the split sizes to the host on a side stream.
4. ``moe.token_dispatcher.maybe_move_tensor_to_cpu`` -> one that also converts CPU tensors to
   numpy: the dispatcher turns the split sizes into the lists ``all_to_all_single`` needs only
   when they start on a GPU.
5. ``torch.cuda.manual_seed`` and ``torch.cuda.get_rng_state`` -> the CPU default generator:
   ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add()`` seed and read the
   per-TP-rank "device" RNG streams.
6. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` (private) -> the
   CPU generator's: ``CudaRNGStatesTracker.fork()`` swaps the "device" RNG state through them.
   On the CPU the device generator *is* the CPU generator, so forking it keeps megatron's
   semantics (a distinct model-parallel stream per TP rank, a default stream shared by the
   ranks of a TP group).
7. A filter on the ``megatron.core.tensor_parallel.random`` logger that drops ``fork()``'s
   warning that the CPU RNG moved inside it, which on the CPU is the point of forking.
8. ``WrappedTorchNorm.__new__`` (the local spec's norm without the CUDA-only Apex) -> one that
   accepts ``sequence_parallel``: megatron-core refuses it only because nothing would mark the
   norm's weights for the TP all-reduce of ``finalize_model_grads``; this builds the same torch
   norm and marks them.
9. ``moe.moe_utils.te_general_gemm`` -> None when Transformer Engine (CUDA-only) is absent: the
   MoE router's gating GEMM tests ``te_general_gemm is not None``, a name bound only with TE.
10. ``tensor_parallel.random.CheckpointFunction.backward`` and
    ``CheckpointWithoutOutput._recompute`` -> the same under the torch function mode of item 11:
    activation recompute re-runs forward code inside autograd's backward, where no mode is
    active.
11. A torch function mode, entered and never exited (``function_mode=True``, the default), that
    - sends ``device="cuda"`` arguments of tensor factories and ``Tensor.cuda()`` /
      ``.to("cuda")`` to the CPU: several megatron functions hard-code ``device="cuda"`` (the
      token counters of the pipeline schedules, the optimizer's scale tensors, the default
      causal attention mask);
    - answers ``Tensor.type()`` for CPU tensors with the CUDA type name, only when the caller is
      megatron-core: the distributed optimizer and gradient clipping dispatch on
      ``param.type() == "torch.cuda.FloatTensor"`` and reject anything else.
    Torch function modes are thread-local: the mode covers the thread that first enabled it
    (the one that runs megatron), not Python threads started elsewhere.

Megatron-LM's trainer (``megatron.training``, from megatron-core >= 0.17 or a Megatron-LM
checkout) needs more, which ``enable_cpu_megatron_training()`` adds (enabling the above first),
again only without CUDA; the trainer's entry point (``megatron_lm.pretrain_gpt``) enables it:

* ``initialize_megatron`` asserts CUDA unless called with ``allow_no_cuda=True``; its
  ``pretrain`` calls it without, so ``pretrain``'s reference to it passes that flag.
* ``_initialize_distributed`` sets up megatron's parallel state, and ``_set_random_seed`` the
  model-parallel RNG streams, only when ``torch.cuda.device_count() > 0``: both run seeing one
  device, whose ``torch.cuda.set_device`` does nothing (the CPU is the device).
* ``validate_args`` reads the GPU architecture (``get_device_arch_version``) for tensor or context
  parallelism; on a CPU it answers 0, so Megatron-LM applies its pre-Blackwell rules (which ask
  for ``CUDA_DEVICE_MAX_CONNECTIONS=1``, as its example scripts set).
* Megatron-LM up to 0.16 compiles its legacy fused CUDA kernels at start-up
  (``megatron.legacy.fused_kernels.load``, which needs nvcc); there are none to load on a CPU.
* On a CPU the "device" random numbers are the CPU generator's, and a data loader draws its
  base seed from that generator when its iterator starts. Megatron-LM starts its iterators
  after restoring a checkpoint's random states, so a resumed run would drop out other units
  than the uninterrupted one (on a GPU dropout draws from the CUDA generator, which loaders
  leave alone): ``build_pretraining_data_loader``'s loaders get a generator of their own.

The rest is flags of Megatron-LM's own, for what a CPU lacks: ``--distributed-backend gloo``,
``--transformer-impl local``, ``--no-gradient-accumulation-fusion``, ``--no-persist-layer-norm``
and ``--no-masked-softmax-fusion`` (no Apex, Transformer Engine or compiled Megatron kernels).
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_megatron", "enable_cpu_megatron_training"]

_CPU = torch.device("cpu")
_log = logging.getLogger(__name__)
_patched = False  # items 1 to 10
_mode_entered = False  # item 11
_training_patched = False  # Megatron-LM's trainer


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
    """Enable the CPU layer (the module docstring lists what it replaces) for this process;
    idempotent, and a no-op with CUDA. Logs a warning the first time it patches.

    ``function_mode=False`` leaves out the torch function mode (item 11): a single-process
    benchmark that passes its own attention mask and uses no schedule or optimizer does not
    need it, and should not time its per-op cost.
    """
    global _patched, _mode_entered
    if torch.cuda.is_available():
        return
    if not _patched:
        _patch_cuda_assumptions()
        _patched = True
        _log.warning(
            "no CUDA device: megatron-core runs on the CPU through %s, which replaces parts of "
            "torch.cuda and megatron-core for the rest of this process (its docstring lists "
            "them)",
            __name__,
        )
    if function_mode and not _mode_entered:
        # Item 11: schedules/optimizer/causal mask hard-code device="cuda"; the distributed
        # optimizer checks param.type() == "torch.cuda.FloatTensor".
        _CudaToCpuMode().__enter__()
        _mode_entered = True


def _patch_cuda_assumptions() -> None:
    """Items 1 to 10 of the module docstring."""
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    # 1. p2p_communication, mappings, DDP buffers, optimizer, timers allocate on current_device().
    torch.cuda.current_device = lambda: _CPU
    # 2. p2p_communication._communicate and filesystem_async.preload_tensors wait on the GPU.
    torch.cuda.synchronize = lambda device=None: None
    # 3. MoEAlltoAllTokenDispatcher copies token counts to the host on a side stream...
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    # 4. ...and converts the all-to-all split sizes to numpy only for CUDA tensors.
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host
    # 5. model_parallel_cuda_manual_seed() and CudaRNGStatesTracker.add() seed/read the device RNG.
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.get_rng_state = _get_cpu_rng_state
    # 6. CudaRNGStatesTracker.fork() swaps "device" RNG states through these private helpers.
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # 7. fork() warns whenever the CPU RNG moves inside it, which on CPU is the point of forking.
    logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())
    # 8. get_gpt_layer_local_spec() without Apex uses WrappedTorchNorm, which rejects SP.
    WrappedTorchNorm.__new__ = _marking_sequence_parallel(WrappedTorchNorm.__new__)
    # 9. RouterGatingLinearFunction tests `te_general_gemm is not None`, bound only with TE.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # 10. Activation recompute re-runs forward code inside autograd's backward, where no torch
    # function mode is active.
    mcore_random.CheckpointFunction.backward = staticmethod(
        _under_cpu_mode(mcore_random.CheckpointFunction.backward)
    )
    mcore_random.CheckpointWithoutOutput._recompute = _under_cpu_mode(
        mcore_random.CheckpointWithoutOutput._recompute
    )


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
    """``enable_cpu_megatron()`` plus what Megatron-LM's trainer needs on a CPU (see the module
    docstring); idempotent, and a no-op with CUDA. Logs a warning the first time it patches."""
    global _training_patched
    if torch.cuda.is_available() or _training_patched:
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
    _training_patched = True
    _log.warning(
        "no CUDA device: Megatron-LM's trainer runs on the CPU through %s, which also replaces "
        "parts of megatron.training (its docstring lists them)",
        __name__,
    )
