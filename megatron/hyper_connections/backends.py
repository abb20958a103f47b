"""One backend per hyper-connection module: how its width and depth connections run, and why.

``select_backend`` chooses, once for a module (when it is built, and again when
``compile_coefficients()`` or ``use_fused_kernels()`` is called), one of:

- ``pytorch``: plain autograd through ``streams``; every op saves what it reads. The one
  backend with per-stream dropout (``hyper_connections_dropout``), whose masks autograd keeps.
- ``lean``: the memory-lean autograd functions of ``autograd`` with PyTorch ops: 2 (n + 1)
  units of [s, b, C] saved per layer, and the mHC paper's state recomputation (``StateChain``).
- ``fused``: the same functions with the Triton kernels of ``kernels`` for every pass over the
  state, forward and backward (the RMS projection, the branch input, the merge with the
  bias-dropout-add), so the same memory and the same recomputation.

and how the coefficients (the small per-token graph after the projection) are computed:
``eager`` PyTorch, ``compiled`` with ``torch.compile``, or ``triton`` (mHC's fused kernel,
exp-domain Sinkhorn, or mHC-lite's). ``config_backend`` is the same choice for a megatron config.

Under ``torch.no_grad`` every backend runs its forward only. Where a configuration asks for
something its backend does not do, the module logs ``reason`` once. A fused module that meets
tensors the kernels cannot take (CPU tensors without Triton's interpreter, fp64) runs that call
on the backend it would have without fused kernels, and logs that once too.
"""

import functools
import logging
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import LeanDepthConnection, LeanWidthConnection, Ops, SavedState, TorchOps
from .kernels import availability
from .streams import BranchOutput, merge_branch_output

if TYPE_CHECKING:
    from .hyper_connection import DepthInputs, HyperConnectionBase

__all__ = [
    "COMPILED",
    "EAGER",
    "FUSED",
    "LEAN",
    "PYTORCH",
    "TRITON",
    "Backend",
    "config_backend",
    "select_backend",
]

logger = logging.getLogger(__name__)

PYTORCH, LEAN, FUSED = "pytorch", "lean", "fused"
EAGER, COMPILED, TRITON = "eager", "compiled", "triton"


@functools.cache
def log_once(message: str) -> None:
    """Log ``message`` the first time it comes up, once per process (not once per module)."""
    logger.warning(message)


class Backend:
    """How a module runs its connections: ``width`` and ``depth`` with one signature for all.

    Attributes:
        name: ``pytorch``, ``lean`` or ``fused``.
        coefficients: ``eager``, ``compiled`` or ``triton``.
        reason: why a configuration gets this backend.
        fallback: the configuration asked for something this backend does not do (``reason``
            says what); the module logs it.
    """

    name: ClassVar[str]
    ops: ClassVar[Ops] = TorchOps
    uses_dropout_seed: ClassVar[bool] = False
    """Whether ``depth`` takes a seed for the dropout mask (else it uses torch's dropout)."""

    def __init__(self, coefficients: str, reason: str, fallback: bool = False) -> None:
        self.coefficients = coefficients
        self.reason = reason
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"{self.name} backend, {self.coefficients} coefficients: {self.reason}"

    def for_tensors(self, *tensors: Tensor | None) -> "Backend":
        """The backend that runs a call on ``tensors``: this one, except for ``FusedBackend``."""
        return self

    def width(
        self, module: "HyperConnectionBase", rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, SavedState | None]:
        """(h0 [T, k*D], H_post, H_res, how X is kept for backward) for X = ``rows``."""
        raise NotImplementedError

    def depth(
        self,
        module: "HyperConnectionBase",
        inputs: "DepthInputs",
        out: Tensor,
        bias: Tensor | None,
        hidden_dropout: float,
        seed: int | None,
    ) -> Tensor:
        """X' [T, N*D] with y = dropout(out + bias); ``hidden_dropout`` applies now (0 outside
        training)."""
        raise NotImplementedError


def _bias_dropout(out: Tensor, bias: Tensor | None, hidden_dropout: float) -> Tensor:
    """y = dropout(out + bias) with torch's dropout, as megatron-core's own bias-dropout-add."""
    if bias is not None:
        out = out + bias
    if hidden_dropout > 0.0:
        out = F.dropout(out, p=hidden_dropout, training=True)
    return out


class PlainBackend(Backend):
    name = PYTORCH

    def width(self, module, rows):
        mixing = module.mixing(rows, self)
        return self.ops.branch_input(rows, mixing.h_pre), mixing.h_post, mixing.h_res, None

    def depth(self, module, inputs, out, bias, hidden_dropout, seed):
        y = _bias_dropout(out, bias, hidden_dropout)
        rows, compute = inputs.rows, inputs.h_res.dtype
        new_state = merge_branch_output(
            rows.to(compute),
            y.to(compute),
            inputs.h_post,
            inputs.h_res,
            dropout=module.dropout,
            training=module.training,
        )
        return new_state.to(rows.dtype)


class LeanBackend(Backend):
    name = LEAN

    def width(self, module, rows):
        chain = module.state_chain
        saved = SavedState(rows) if chain is None else chain.state_for(module.chain_position, rows)
        h0, h_post, h_res = LeanWidthConnection.apply(
            module, self, rows, saved, *module.parameters()
        )
        return h0, h_post, h_res, saved

    def depth(self, module, inputs, out, bias, hidden_dropout, seed):
        if hidden_dropout > 0.0:  # torch's dropout and RNG, in autograd (its mask is kept)
            out, bias = _bias_dropout(out, bias, hidden_dropout), None
        return self.merge(module, inputs, BranchOutput(out, bias))

    def merge(self, module, inputs, branch: BranchOutput) -> Tensor:
        """The depth connection's autograd function, and the recipe of its output for the
        module's state chain."""
        new_state = LeanDepthConnection.apply(
            self.ops, inputs.rows, branch, inputs.h_post, inputs.h_res, inputs.saved,
            branch.out, branch.bias,
        )  # fmt: skip
        if module.state_chain is not None:
            recipe = SavedState(previous=inputs.saved, merged=(self.ops, branch))
            module.state_chain.record_output(new_state, recipe)
        return new_state


class FusedBackend(LeanBackend):
    name = FUSED
    uses_dropout_seed = True

    def __init__(self, coefficients: str, reason: str, unfused: Backend, fallback: bool = False):
        super().__init__(coefficients, reason, fallback)
        self.unfused = unfused
        """What runs a call on tensors the kernels cannot take."""

    @functools.cached_property
    def ops(self) -> Ops:
        from .kernels.ops import TritonOps  # imports Triton, which selection made sure exists

        return TritonOps

    def for_tensors(self, *tensors):
        why = availability.unsupported_reason(*tensors)
        if why is None:
            return self
        log_once(
            f"hyper-connections: fused kernels asked for, but {why}; those calls run on the "
            f"{self.unfused.name} backend"
        )
        return self.unfused

    def depth(self, module, inputs, out, bias, hidden_dropout, seed):
        if seed is None:  # drawn only when a mask is needed, not to shift the RNG otherwise
            seed = int(torch.randint(2**31 - 1, ())) if hidden_dropout > 0.0 else 0
        return self.merge(module, inputs, BranchOutput(out, bias, hidden_dropout, seed))


def select_backend(
    *,
    fused_kernels: bool = False,
    compile_coefficients: bool = False,
    stream_dropout: float = 0.0,
    manifold: bool = False,
    log_domain_sinkhorn: bool = False,
    h_res_parameterization: str = "sinkhorn",
) -> Backend:
    """The backend of a module, and why.

    Args:
        fused_kernels: Triton kernels asked for (``use_fused_kernels()``).
        compile_coefficients: ``torch.compile`` asked for (``compile_coefficients()``).
        stream_dropout: the per-stream dropout probability (the module's ``dropout``).
        manifold: mHC (its coefficients have Triton kernels) rather than HC.
        log_domain_sinkhorn: mHC's log-domain Sinkhorn (the kernel's is exp-domain).
        h_res_parameterization: mHC's H_res, ``sinkhorn`` or ``permutations`` (mHC-lite).
    """
    torch_coefficients = COMPILED if compile_coefficients else EAGER
    if stream_dropout > 0.0:
        reason = (
            f"per-stream dropout {stream_dropout} (hyper_connections_dropout) draws masks that "
            f"autograd keeps: plain autograd"
        )
        if fused_kernels:
            reason += "; the fused kernels have no per-stream dropout and are not used"
        return PlainBackend(torch_coefficients, reason, fallback=fused_kernels)
    unfused = LeanBackend(torch_coefficients, "memory-lean autograd with PyTorch ops")
    if not fused_kernels:
        return unfused
    if not availability.HAVE_TRITON:
        reason = "fused kernels asked for, but Triton is not installed: memory-lean PyTorch"
        return LeanBackend(torch_coefficients, reason, fallback=True)
    state_kernels = "Triton kernels for the passes over the state"
    lite = h_res_parameterization == "permutations"  # no Sinkhorn, whatever its domain
    if manifold and (lite or not log_domain_sinkhorn):
        reason = f"{state_kernels} and for {'mHC-lite' if lite else 'mHC'}'s coefficients"
        if compile_coefficients:
            reason += "; torch.compile is not used: the kernel computes the coefficients"
        return FusedBackend(TRITON, reason, unfused, fallback=compile_coefficients)
    if manifold:
        reason = (
            f"{state_kernels}; mHC's coefficients in PyTorch: the kernel's Sinkhorn is "
            f"exp-domain, mhc_log_domain_sinkhorn=True asks for log"
        )
        return FusedBackend(torch_coefficients, reason, unfused, fallback=True)
    reason = f"{state_kernels}; HC's few coefficient ops in PyTorch"
    return FusedBackend(torch_coefficients, reason, unfused)


def config_backend(config) -> Backend:
    """The backend of the hyper-connections a megatron config (this package's
    ``TransformerConfig``) builds, and why: ``select_backend`` of its options."""
    return select_backend(
        fused_kernels=config.hyper_connections_fused_kernels,
        compile_coefficients=config.hyper_connections_compile,
        stream_dropout=config.hyper_connections_dropout,
        manifold=config.use_manifold_hyper_connections,
        log_domain_sinkhorn=config.mhc_log_domain_sinkhorn,
        h_res_parameterization=config.mhc_h_res_parameterization,
    )
