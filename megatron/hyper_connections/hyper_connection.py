"""Hyper-Connections (Zhu et al., 2409.19606) and Frac-Connections (Zhu et al., 2503.14125).

One ``HyperConnection`` replaces the residual connection around one branch F (attention or
MLP, with its own pre-norm inside F). The residual state of a token is N rows of D values
(see ``streams``). Per row j, from that row's own RMS-normalised vector x_j:

    A_m(X)[j] = s_a * tanh(x_j W_m) + A_m[j]          (k values: the row's share of the input)
    A_r(X)[j] = s_a * tanh(x_j W_r) + A_r[j]          (N values: where row j goes)
    B(X)[j]   = s_b * tanh(x_j W_b) + B[j]            (1 value: row j's share of the output)

    h0 = A_m^T X,   y = F(h0),   X' = A_r^T X + B^T y

i.e. H_pre = A_m^T, H_post = B, H_res = A_r^T in the destination-row convention of
``streams``. Static HC (SHC) drops the dynamic part (W = 0, fixed); DHC without tanh drops the
tanh. Hyper-Connections: N = n streams of D = C values, k = 1. Frac-Connections: the C-vector
is split into N = m fractions of D = C / m values and the branch reads all of them, k = m
(Y = A_m, A = A_r, B as above).

Initialisation (exactly the Pre-Norm residual x + F(x) for identical streams):
W = 0, s_a = s_b = 0.01, A_r = I, B = 1, and A_m = one-hot e_(l mod n) for HC with l the
sublayer index (attention and MLP sublayers counted separately, as the paper does), A_m = I
for Frac-Connections. The gradient of W is proportional to s_a (or s_b), so W learns
although it starts at zero.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .autograd import Ops, SavedState, StateChain, TorchOps
from .backends import COMPILED, PYTORCH, Backend, log_once, select_backend
from .metrics import log_amax
from .options import HC, variant_name
from .projection import Projection, rms_projection
from .streams import Mixing, coefficient_dtype

__all__ = [
    "DepthInputs",
    "HyperConnection",
    "HyperConnectionBase",
    "hc_coefficients",
    "hc_mixing",
]


class DepthInputs(NamedTuple):
    """What the width connection of a sublayer hands to the depth connection of the same
    sublayer: the state and its coefficients, and how they were computed."""

    rows: Tensor
    """X, the state viewed as [T, N, D] (tokens flattened)."""
    h_post: Tensor
    h_res: Tensor
    saved: SavedState | None
    """How X is kept for backward (lean and fused backends), or None (pytorch backend)."""
    backend: Backend
    """The backend the width connection ran on, which the depth connection runs on too."""


def hc_coefficients(
    projection: Projection | None,
    static_pre: Tensor,
    static_res: Tensor,
    static_post: Tensor,
    scale_pre_res: Tensor | None = None,
    scale_post: Tensor | None = None,
    use_tanh: bool = True,
) -> Mixing:
    """H_pre, H_post, H_res from the rows' ``Projection`` (None for static HC).

    Args:
        projection: x_j [W_m | W_r | W_b] and 1 / RMS(x_j) per row, [..., N, k + N + 1].
        static_pre: A_m [N, k]. static_res: A_r [N, N]. static_post: B [N].
        scale_pre_res: s_a, shared by A_m and A_r. scale_post: s_b.
    """
    a_pre, a_res, b = static_pre, static_res, static_post
    if projection is not None:
        k, n = static_pre.shape[-1], static_res.shape[-1]
        d = projection.proj * projection.inv_rms
        if use_tanh:
            d = torch.tanh(d)
        d_pre, d_res, d_post = d.split([k, n, 1], dim=-1)
        a_pre = torch.addcmul(a_pre, scale_pre_res, d_pre)
        a_res = torch.addcmul(a_res, scale_pre_res, d_res)
        b = torch.addcmul(b, scale_post, d_post.squeeze(-1))
    return Mixing(h_pre=a_pre.transpose(-1, -2), h_post=b, h_res=a_res.transpose(-1, -2))


def hc_mixing(
    state: Tensor,
    static_pre: Tensor,
    static_res: Tensor,
    static_post: Tensor,
    dynamic_proj: Tensor | None = None,
    scale_pre_res: Tensor | None = None,
    scale_post: Tensor | None = None,
    use_tanh: bool = True,
    eps: float = 1e-5,
) -> Mixing:
    """The HC coefficients of ``state`` [..., N, D], as H_pre, H_post, H_res.

    Args:
        dynamic_proj: [W_m | W_r | W_b], [D, k + N + 1]; None for static HC.
        The others: as in ``hc_coefficients``.
    """
    projection = None if dynamic_proj is None else rms_projection(state, dynamic_proj, eps)
    return hc_coefficients(
        projection, static_pre, static_res, static_post, scale_pre_res, scale_post, use_tanh
    )


@functools.cache
def compiled(function: Callable[..., Mixing]) -> Callable[..., Mixing]:
    """One compiled version of a pure coefficient function, shared by every module (compiling
    a module's method would compile once per module)."""
    return torch.compile(function)


class HyperConnectionBase(nn.Module):
    """What every variant shares: the two connections around a branch, and monitoring.

    Subclasses own the parameters (``dynamic_proj`` is the projection weight, or None), define
    ``projection_inputs`` and ``coefficients``, and end their ``__init__`` with
    ``choose_backend()``; the state is a flat ``[..., N*D]``.
    """

    def __init__(self, num_rows: int, row_size: int, dropout: float, layer_index: int) -> None:
        super().__init__()
        self.num_rows = num_rows
        self.row_size = row_size
        self.dropout = dropout
        self.layer_index = layer_index
        self._last_h_res: Tensor | None = None
        # Set by ``use_state_chain`` for the mHC paper's recomputation of the states.
        self.state_chain: StateChain | None = None
        self.chain_position = 0
        # What was asked for; ``backend`` is what runs (see ``backends``).
        self._compile_coefficients = False
        self._fused_kernels = False
        self.backend: Backend | None = None

    def backend_options(self) -> dict:
        """This module's arguments of ``backends.select_backend``."""
        return {
            "fused_kernels": self._fused_kernels,
            "compile_coefficients": self._compile_coefficients,
            "stream_dropout": self.dropout,
        }

    def choose_backend(self) -> None:
        """(Re)choose ``backend`` from ``backend_options()``; a fallback is logged once."""
        self.backend = select_backend(**self.backend_options())
        if self.backend.fallback:
            log_once(f"{type(self).__name__}: {self.backend!r}")
        if self.state_chain is not None:
            self.use_state_chain(self.state_chain, self.chain_position)

    def use_state_chain(self, chain: StateChain | None, position: int) -> None:
        """Keep this sublayer's state for backward only at block starts of ``chain``, where
        ``position`` is this sublayer's index among those sharing the chain."""
        if chain is not None and self.backend.name == PYTORCH:
            raise ValueError(
                f"a state chain needs the lean or fused backend, got the {self.backend!r}"
            )
        self.state_chain, self.chain_position = chain, position

    def compile_coefficients(self) -> None:
        """Run the coefficient computation through ``torch.compile``: its small per-token ops
        (some 20, about 100 per pass of mHC's Sinkhorn) compile into a few fused kernels,
        forward and backward."""
        self._compile_coefficients = True
        self.choose_backend()

    def use_fused_kernels(self) -> None:
        """Run the connections on the Triton kernels of ``kernels`` (the fused backend), where
        ``backends.select_backend`` allows it."""
        self._fused_kernels = True
        self.choose_backend()

    def coefficient_function(
        self, function: Callable[..., Mixing], backend: Backend
    ) -> Callable[..., Mixing]:
        """``function`` (a pure coefficient function), compiled if ``backend`` says so."""
        return compiled(function) if backend.coefficients == COMPILED else function

    def mixing(self, rows: Tensor, backend: Backend | None = None) -> Mixing:
        """H_pre, H_post, H_res (fp32) for the state viewed as rows [..., N, D], with plain
        autograd through the projection; the coefficients as ``backend`` (default: this
        module's) computes them."""
        dtype = coefficient_dtype(rows)
        backend = backend or self.backend
        return self.coefficients(self.project(rows, dtype, TorchOps), dtype, backend)

    def project(self, rows: Tensor, dtype: torch.dtype, ops: Ops) -> Projection | None:
        """The dynamic projection of the state (see ``projection``) with ``ops``, in ``dtype``;
        None when static."""
        if self.dynamic_proj is None:
            return None
        return ops.project(self.projection_inputs(rows), self.dynamic_proj.to(dtype), self.eps)

    def projection_inputs(self, rows: Tensor) -> Tensor:
        """The vectors that are RMS-normalised and projected, [..., R, K], from [..., N, D]."""
        raise NotImplementedError

    def coefficients(
        self, projection: Projection | None, dtype: torch.dtype, backend: Backend
    ) -> Mixing:
        """H_pre, H_post, H_res in ``dtype`` from the state's projection, as ``backend``
        computes them."""
        raise NotImplementedError

    def width_connection(self, state: Tensor) -> tuple[Tensor, DepthInputs]:
        """Branch input h0 = H_pre X [..., k*D], and what ``depth_connection`` needs."""
        # Tokens flattened to one batch dimension: the stream matmuls become plain bmm calls
        # (a 4-D matmul is several times slower on CPU).
        rows = state.reshape(-1, self.num_rows, self.row_size)
        backend = self.backend.for_tensors(rows, *self.parameters())
        branch_input, h_post, h_res, saved = backend.width(self, rows)
        # Kept (detached, no copy) for monitoring; read only when metrics are asked for.
        per_token = h_res.dim() == 3
        self._last_h_res = (
            h_res.detach().view(*state.shape[:-1], *h_res.shape[1:])
            if per_token
            else h_res.detach()
        )
        branch_input = branch_input.view(*state.shape[:-1], -1)
        return branch_input, DepthInputs(rows, h_post, h_res, saved, backend)

    def depth_connection(
        self,
        branch_output: Tensor,
        depth_inputs: DepthInputs,
        bias: Tensor | None = None,
        hidden_dropout: float = 0.0,
        seed: int | None = None,
    ) -> Tensor:
        """New state X' = H_res X + H_post^T y, [..., N*D] in the state's dtype, with
        y = dropout(branch_output + bias): the residual layer's bias-dropout-add merged in,
        ``hidden_dropout`` applied in training only.

        ``seed`` seeds the fused backend's dropout mask (drawn from torch's CPU generator when
        None); the other backends use torch's dropout.
        """
        lead = branch_output.shape[:-1]
        out = branch_output.reshape(depth_inputs.rows.shape[0], -1)
        hidden_dropout = hidden_dropout if self.training else 0.0
        backend = depth_inputs.backend
        return backend.depth(self, depth_inputs, out, bias, hidden_dropout, seed).view(*lead, -1)

    def forward(self, state: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        branch_input, depth_inputs = self.width_connection(state)
        return self.depth_connection(branch(branch_input), depth_inputs)

    def last_h_res(self) -> Tensor | None:
        """H_res of the last forward pass ([..., N, N], detached), or None before the first."""
        return self._last_h_res

    def get_log_amax(self) -> float | None:
        """log of the largest singular value of the token-averaged H_res of the last forward.

        Synchronises with the device, so call it at logging intervals, not every step.
        """
        h_res = self._last_h_res
        if h_res is None:
            return None
        return float(log_amax(h_res.reshape(-1, *h_res.shape[-2:]).mean(dim=0)))


class HyperConnection(HyperConnectionBase):
    """The width and depth connections around one branch, for any PyTorch model.

    The state is a flat ``[..., n*C]`` tensor (``streams.expand_streams`` makes it from
    ``[..., C]``; ``streams.reduce_streams`` turns it back). Typical use::

        hc = HyperConnection(hidden_size=C, num_residual_streams=4, layer_index=i)
        branch_input, depth_inputs = hc.width_connection(state)   # [..., C]
        state = hc.depth_connection(branch(branch_input), depth_inputs)
        # or, equivalently: state = hc(state, branch)

    Args:
        hidden_size: C.
        num_residual_streams: n >= 1 (1 with ``num_fracs`` = 1 is the plain residual).
        layer_index: index l of this sublayer in the network (attention and MLP counted
            separately); selects the stream A_m initially reads, e_(l mod n).
        dynamic: DHC (True) or SHC (False).
        use_tanh: tanh on the dynamic part (the paper's default) or not (its ablation).
        num_fracs: m > 1 gives Frac-Connections (requires n = 1 and m dividing C).
        dropout: dropout on each stream's share of the branch output (see ``streams``); a
            module with dropout > 0 runs on the pytorch backend (see ``backends``).
        eps: epsilon of the RMS normalisation of the dynamic part.
    """

    def __init__(
        self,
        hidden_size: int,
        num_residual_streams: int = 4,
        *,
        layer_index: int = 0,
        dynamic: bool = True,
        use_tanh: bool = True,
        num_fracs: int = 1,
        dropout: float = 0.0,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
    ) -> None:
        if num_residual_streams < 1 or num_fracs < 1:
            raise ValueError(
                f"num_residual_streams and num_fracs must be >= 1, got "
                f"{num_residual_streams} and {num_fracs}"
            )
        if num_fracs > 1 and (num_residual_streams > 1 or hidden_size % num_fracs):
            raise ValueError(
                f"num_fracs={num_fracs} needs num_residual_streams=1 and a hidden size "
                f"divisible by it, got {num_residual_streams} and {hidden_size}"
            )
        super().__init__(
            num_rows=num_residual_streams * num_fracs,
            row_size=hidden_size // num_fracs,
            dropout=dropout,
            layer_index=layer_index,
        )
        self.hidden_size = hidden_size
        self.num_residual_streams = num_residual_streams
        self.num_fracs = num_fracs
        self.use_tanh = use_tanh
        self.eps = eps

        n, k = self.num_rows, num_fracs
        factory = {"device": device, "dtype": torch.float32}
        self.static_pre = nn.Parameter(torch.empty(n, k, **factory))
        self.static_res = nn.Parameter(torch.empty(n, n, **factory))
        self.static_post = nn.Parameter(torch.empty(n, **factory))
        if dynamic:
            self.dynamic_proj = nn.Parameter(torch.empty(self.row_size, k + n + 1, **factory))
            self.scale_pre_res = nn.Parameter(torch.empty(1, **factory))
            self.scale_post = nn.Parameter(torch.empty(1, **factory))
        else:
            self.register_parameter("dynamic_proj", None)
            self.register_parameter("scale_pre_res", None)
            self.register_parameter("scale_post", None)
        self.reset_parameters()
        self.choose_backend()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation; see the module docstring."""
        n, k = self.num_rows, self.num_fracs
        if k == 1:
            self.static_pre.zero_()
            self.static_pre[self.layer_index % n, 0] = 1.0
        else:
            self.static_pre.copy_(torch.eye(n))
        self.static_res.copy_(torch.eye(n))
        self.static_post.fill_(1.0)
        if self.dynamic_proj is not None:
            self.dynamic_proj.zero_()
            self.scale_pre_res.fill_(0.01)
            self.scale_post.fill_(0.01)

    def projection_inputs(self, rows: Tensor) -> Tensor:
        return rows  # every row is normalised and projected on its own

    def coefficients(
        self, projection: Projection | None, dtype: torch.dtype, backend: Backend
    ) -> Mixing:
        def f(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return self.coefficient_function(hc_coefficients, backend)(
            projection,
            f(self.static_pre),
            f(self.static_res),
            f(self.static_post),
            f(self.scale_pre_res),
            f(self.scale_post),
            use_tanh=self.use_tanh,
        )

    def extra_repr(self) -> str:
        variant = variant_name(HC, self.dynamic_proj is not None, self.num_fracs)
        return (
            f"{variant}, hidden_size={self.hidden_size}, streams={self.num_residual_streams}, "
            f"fracs={self.num_fracs}, tanh={self.use_tanh}, layer_index={self.layer_index}"
        )
