"""Manifold-Constrained Hyper-Connections, mHC (Xie et al., 2512.24880).

Per token, with x the flattened state (1 x nC) and r = ||x||_2 / sqrt(nC):

    [t_pre, t_post, t_res] = [a_pre, a_post, a_res] * (x phi) / r + b
    H_pre = sigmoid(t_pre),  H_post = 2 sigmoid(t_post),  H_res = Sinkhorn(t_res as n x n)
    h0 = H_pre X,   X' = H_res X + H_post^T F(h0)

Dividing by r after the matmul is RMSNorm before it (a norm weight would fold into phi). One
projection phi [nC, n^2 + 2n] serves the three coefficient groups; the scalar gates a_* and
the bias b complete them. With P = ``num_proposals`` > 1 there are P independent projections,
gates and biases; each proposal is constrained on its own and the P results are averaged (a
mean of doubly stochastic matrices is doubly stochastic).

Initialisation. The paper fixes only the gates (0.01). We add what makes the model at init
exactly the Pre-Norm residual: phi = 0 (the gates still learn it: its gradient is
proportional to them), b_pre = logit(1/n) so H_pre sums to 1 and h0 = x, b_post = 0 so
H_post = 1, and b_res = c I with c = ``h_res_bias_init``. Any c is residual-equivalent for
identical streams (Sinkhorn rows sum to 1); c sets how strongly H_res keeps streams apart once
they differ: its diagonal starts at e^c / (e^c + n - 1), 0.95 for n = 4 and c = 4 (the
default), while c = 0 averages all streams at every sublayer (H_res = 1/n, the zero-bias
choice). Proposal p starts with gates 0.01 / (p + 1): all proposals give the same
coefficients at init, but their dynamic parts learn at different rates, which breaks the
symmetry that identical copies would otherwise keep forever.

mHC-lite (Yang and Gao, 2601.05732; ``h_res_parameterization="permutations"``): t_res holds n!
logits u instead of n^2, from the same normalised projection, gate a_res and bias, and
H_res = sum_k softmax(u)_k P_k over the n! permutation matrices (``permutations``): exactly
doubly stochastic at any parameter values, no Sinkhorn iterations. H_pre and H_post as above.
Its bias puts c on the identity permutation (0 on the others): the diagonal of H_res starts
at ((n-1)! - 1 + e^c) / (n! - 1 + e^c), 0.77 for n = 4 and c = 4; residual-exact at init for
any c, as above.
"""

import math

import torch
from torch import Tensor, nn

from .backends import TRITON, Backend
from .hyper_connection import HyperConnectionBase
from .options import MHC, MHC_LITE, variant_name
from .permutations import MAX_STREAMS, num_permutations, permutation_mixture
from .projection import Projection, rms_projection
from .sinkhorn import sinkhorn_knopp_tokens_last
from .streams import Mixing

__all__ = ["ManifoldHyperConnection", "mhc_coefficients", "mhc_mixing"]


def mhc_coefficients(
    projection: Projection | None,
    bias: Tensor,
    gates: Tensor | None = None,
    sinkhorn_iters: int = 20,
    log_domain_sinkhorn: bool = False,
    h_res_parameterization: str = "sinkhorn",
) -> Mixing:
    """H_pre, H_post, H_res from the token's ``Projection`` (None for static mHC).

    Args:
        projection: x phi and 1 / r per token, [..., 1, P * W] and [..., 1, 1].
        bias: b, [P, W] laid out as [pre (n) | post (n) | res (R)]: R = n*n H_res logits
            (row-major) for ``"sinkhorn"``, R = n! permutation logits for ``"permutations"``.
        gates: [P, 3] = (a_pre, a_post, a_res) per proposal; None for the static variant.
    """
    num_proposals, width = bias.shape
    n = num_streams(width, h_res_parameterization)
    t = bias
    if projection is not None:
        # Every logit of every proposal in one pass, each gate gathered onto its group.
        proj = projection.proj.view(*projection.proj.shape[:-2], num_proposals, width)
        gate = gates[:, _gate_groups(n, width, gates.device)]
        t = torch.addcmul(bias, gate, proj * projection.inv_rms)
    t_pre_post, t_res = t.split([2 * n, width - 2 * n], dim=-1)
    h_pre, h_post = torch.sigmoid(t_pre_post).mean(dim=-2).split(n, dim=-1)
    if h_res_parameterization == "permutations":
        h_res = permutation_mixture(t_res, n).mean(dim=-3)
    else:
        h_res = _sinkhorn_mean(t_res, n, sinkhorn_iters, log_domain_sinkhorn)
    return Mixing(h_pre=h_pre.unsqueeze(-2), h_post=2.0 * h_post, h_res=h_res)


_GATE_GROUPS: dict[tuple[int, int, torch.device], Tensor] = {}


def _gate_groups(n: int, width: int, device: torch.device) -> Tensor:
    """Which gate, 0 (a_pre), 1 (a_post) or 2 (a_res), scales each of the W logits; built once
    per device (a dict, not functools.cache, which torch.compile warns about)."""
    key = (n, width, device)
    if key not in _GATE_GROUPS:
        groups = [0] * n + [1] * n + [2] * (width - 2 * n)
        _GATE_GROUPS[key] = torch.tensor(groups, device=device)
    return _GATE_GROUPS[key]


def _sinkhorn_mean(t_res: Tensor, n: int, num_iters: int, log_domain: bool) -> Tensor:
    """mean_p Sinkhorn(t_res[..., p, :] as n x n) for t_res [..., P, n*n], computed with the
    tokens last (see ``sinkhorn``)."""
    lead, num_proposals = t_res.shape[:-2], t_res.shape[-2]
    logits = t_res.reshape(-1, num_proposals, n, n).permute(1, 2, 3, 0).contiguous()
    h_res = sinkhorn_knopp_tokens_last(logits, num_iters, log_domain)
    # The mean over proposals writes the tokens first again, contiguous (a strided H_res
    # would make the stream matmuls slow).
    return h_res.permute(3, 1, 2, 0).mean(dim=-1).view(*lead, n, n)


def coefficient_width(n: int, h_res_parameterization: str = "sinkhorn") -> int:
    """W, the logits per proposal: n for H_pre, n for H_post, and n*n (Sinkhorn) or n!
    (permutations) for H_res."""
    if h_res_parameterization == "permutations":
        return 2 * n + num_permutations(n)
    return n * n + 2 * n


def num_streams(width: int, h_res_parameterization: str = "sinkhorn") -> int:
    """n from the logits per proposal W (``coefficient_width``'s inverse)."""
    if h_res_parameterization == "permutations":
        return next(n for n in range(1, MAX_STREAMS + 1) if 2 * n + num_permutations(n) == width)
    return math.isqrt(width + 1) - 1  # W = (n + 1)^2 - 1


def mhc_mixing(
    state: Tensor,
    bias: Tensor,
    gates: Tensor | None = None,
    dynamic_proj: Tensor | None = None,
    sinkhorn_iters: int = 20,
    log_domain_sinkhorn: bool = False,
    eps: float = 1e-5,
    h_res_parameterization: str = "sinkhorn",
) -> Mixing:
    """The mHC coefficients of ``state`` [..., n, C], as H_pre, H_post, H_res.

    Args:
        dynamic_proj: phi, [nC, P * W]; None for the static variant (t = b).
        The others: as in ``mhc_coefficients``.
    """
    projection = None
    if dynamic_proj is not None:
        projection = rms_projection(state.flatten(-2).unsqueeze(-2), dynamic_proj, eps)
    return mhc_coefficients(
        projection, bias, gates, sinkhorn_iters, log_domain_sinkhorn, h_res_parameterization
    )


class ManifoldHyperConnection(HyperConnectionBase):
    """mHC around one branch: the interface of ``HyperConnection``, constrained coefficients.

    Args:
        hidden_size: C.
        num_residual_streams: n >= 2.
        dynamic: with False, the coefficients are the constrained static biases only.
        sinkhorn_iters: Sinkhorn-Knopp iterations (>= 1).
        log_domain_sinkhorn: log-domain Sinkhorn (stable for large logits).
        num_proposals: P >= 1 averaged projections.
        h_res_bias_init: c in b_res = c I (see the module docstring).
        dropout, eps: as in ``HyperConnection``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_residual_streams: int = 4,
        *,
        dynamic: bool = True,
        sinkhorn_iters: int = 20,
        log_domain_sinkhorn: bool = False,
        num_proposals: int = 1,
        h_res_bias_init: float = 4.0,
        h_res_parameterization: str = "sinkhorn",
        dropout: float = 0.0,
        eps: float = 1e-5,
        layer_index: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if num_residual_streams < 2:
            raise ValueError(f"mHC needs num_residual_streams >= 2, got {num_residual_streams}")
        if h_res_parameterization not in ("sinkhorn", "permutations"):
            raise ValueError(
                f"h_res_parameterization must be 'sinkhorn' or 'permutations', got "
                f"{h_res_parameterization!r}"
            )
        if h_res_parameterization == "permutations" and num_residual_streams > MAX_STREAMS:
            raise ValueError(
                f"h_res_parameterization='permutations' takes up to {MAX_STREAMS} streams "
                f"(n! logits per token), got num_residual_streams={num_residual_streams}"
            )
        if sinkhorn_iters < 1 or num_proposals < 1:
            raise ValueError(
                f"sinkhorn_iters and num_proposals must be >= 1, got {sinkhorn_iters} "
                f"and {num_proposals}"
            )
        n = num_residual_streams
        super().__init__(num_rows=n, row_size=hidden_size, dropout=dropout, layer_index=layer_index)
        self.hidden_size = hidden_size
        self.num_residual_streams = n
        self.sinkhorn_iters = sinkhorn_iters
        self.log_domain_sinkhorn = log_domain_sinkhorn
        self.num_proposals = num_proposals
        self.h_res_bias_init = h_res_bias_init
        self.h_res_parameterization = h_res_parameterization
        self.eps = eps

        width = coefficient_width(n, h_res_parameterization)
        factory = {"device": device, "dtype": torch.float32}
        self.bias = nn.Parameter(torch.empty(num_proposals, width, **factory))
        if dynamic:
            self.gates = nn.Parameter(torch.empty(num_proposals, 3, **factory))
            self.dynamic_proj = nn.Parameter(
                torch.empty(n * hidden_size, num_proposals * width, **factory)
            )
        else:  # t = b: the constrained static coefficients
            self.register_parameter("gates", None)
            self.register_parameter("dynamic_proj", None)
        self.reset_parameters()
        self.choose_backend()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Residual-equivalent initialisation; see the module docstring."""
        n = self.num_residual_streams
        b_pre = torch.full((n,), math.log(1.0 / (n - 1)))  # logit(1/n)
        b_post = torch.zeros(n)
        if self.h_res_parameterization == "permutations":  # c on the identity permutation
            b_res = torch.zeros(num_permutations(n))
            b_res[0] = self.h_res_bias_init
        else:
            b_res = self.h_res_bias_init * torch.eye(n).flatten()
        self.bias.copy_(torch.cat([b_pre, b_post, b_res]).expand_as(self.bias))
        if self.dynamic_proj is not None:
            proposal = torch.arange(self.num_proposals, dtype=torch.float32)
            self.gates.copy_((0.01 / (proposal + 1)).unsqueeze(-1).expand_as(self.gates))
            self.dynamic_proj.zero_()

    def projection_inputs(self, rows: Tensor) -> Tensor:
        return rows.flatten(-2).unsqueeze(-2)  # the whole token, n*C values

    def backend_options(self) -> dict:
        return {
            **super().backend_options(),
            "manifold": True,
            "log_domain_sinkhorn": self.log_domain_sinkhorn,
            "h_res_parameterization": self.h_res_parameterization,
        }

    def coefficients(
        self, projection: Projection | None, dtype: torch.dtype, backend: Backend
    ) -> Mixing:
        gates = None if self.gates is None else self.gates.to(dtype)
        bias = self.bias.to(dtype)
        if backend.coefficients == TRITON:
            proj = inv_rms = None
            if projection is not None:  # [T, 1, P*W] and [T, 1, 1] -> [T, P, W] and [T]
                proj = projection.proj.squeeze(-2).unflatten(-1, bias.shape)
                inv_rms = projection.inv_rms.flatten(-3)
            n = self.num_residual_streams
            if self.h_res_parameterization == "permutations":
                return Mixing(*backend.ops.mhc_lite_coefficients(proj, inv_rms, gates, bias, n))
            return Mixing(
                *backend.ops.mhc_coefficients(proj, inv_rms, gates, bias, n, self.sinkhorn_iters)
            )
        return self.coefficient_function(mhc_coefficients, backend)(
            projection,
            bias,
            gates,
            sinkhorn_iters=self.sinkhorn_iters,
            log_domain_sinkhorn=self.log_domain_sinkhorn,
            h_res_parameterization=self.h_res_parameterization,
        )

    def extra_repr(self) -> str:
        kind = MHC_LITE if self.h_res_parameterization == "permutations" else MHC
        return (
            f"{variant_name(kind, self.dynamic_proj is not None)}, hidden_size={self.hidden_size}, "
            f"streams={self.num_residual_streams}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"log_domain={self.log_domain_sinkhorn}, proposals={self.num_proposals}"
        )
