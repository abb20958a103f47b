"""Fused mHC coefficients: H_pre, H_post, H_res from the projection, one autograd function.

Per token and proposal p, with x phi and inv_rms from the RMS projection, the gates a and the
bias b (``manifold_hyper_connection``): t = a * (x phi) * inv_rms + b, H_pre = mean_p
sigmoid(t_pre), H_post = mean_p 2 sigmoid(t_post), H_res = mean_p Sinkhorn(t_res), with
exp-domain Sinkhorn-Knopp exactly as ``sinkhorn_knopp(..., log_domain=False)``; the backward
differentiates its unrolled iterations. One program handles a block of tokens, every matrix in
registers; gate and bias gradients are per-program partials summed with torch (deterministic,
unlike atomics).

``fused_mhc_coefficients`` is an autograd function: the lean backward rebuilds the
coefficients with it and backpropagates through it like through ``mhc_coefficients``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .availability import check
from .triton_utils import gated_logits, load_tile, next_pow2, sigmoid_group_backward, store_tile

__all__ = ["fused_mhc_coefficients"]


@triton.jit
def _sinkhorn_round(m, mask):
    """One column-then-row normalisation of m [BT, BN, BN] (zeros outside ``mask``)."""
    tiny = 1.1754943508222875e-38  # float32 tiny, the floor of ``sinkhorn_knopp``
    m = m / tl.maximum(tl.sum(m, axis=1), tiny)[:, None, :]
    m = m / tl.maximum(tl.sum(m, axis=2), tiny)[:, :, None]
    return tl.where(mask, m, 0.0)


@triton.jit
def _mhc_block(
    inv_rms_ptr,
    T,
    N: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """This program's tokens and streams with their masks; tokens, masks and inverse RMS
    broadcast to [BT, 1] (H_pre, H_post) and [BT, 1, 1] (H_res); H_res's offsets within W
    and its stream mask, without and with the tokens'."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    n = tl.arange(0, BN)
    nmask = n < N
    if DYNAMIC:
        r = tl.load(inv_rms_ptr + tok, mask=tmask, other=0.0).to(tl.float32)
    else:
        r = tl.zeros([BLOCK_T], dtype=tl.float32)
    tmask3 = tmask[:, None, None]
    moffs = n[None, :, None] * N + n[None, None, :] + 2 * N
    mmask = nmask[None, :, None] & nmask[None, None, :]
    return (
        tok, tmask, n, nmask,
        tok[:, None], tmask[:, None], r[:, None],
        tok[:, None, None], tmask3, r[:, None, None],
        moffs, mmask, mmask & tmask3,
    )  # fmt: skip


@triton.jit
def _mhc_res_start(
    proj_ptr,
    gates_ptr,
    bias_ptr,
    tok3,
    tmask3,
    r3,
    moffs,
    mmask,
    full3,
    p,
    P,
    N: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """H_res's (t, raw proj, gate) of proposal p as ``gated_logits`` and Sinkhorn's start
    exp(t - column max), zero outside ``full3``. The first column normalisation absorbs the
    shift exactly (as in ``sinkhorn_knopp``), so no gradient flows through it."""
    W: tl.constexpr = N * N + 2 * N
    t, x, a = gated_logits(
        proj_ptr, r3, gates_ptr, bias_ptr, tok3, tmask3, p, P, moffs, mmask, 2, W, DYNAMIC
    )
    # Padded columns have max -inf: their (finite t) - max is +inf, removed by the where.
    col_max = tl.max(tl.where(full3, t, float("-inf")), axis=1)
    m0 = tl.where(full3, tl.exp(t - col_max[:, None, :]), 0.0)
    return x, a, m0


@triton.jit
def _mhc_fwd_kernel(
    proj_ptr,
    inv_rms_ptr,
    gates_ptr,
    bias_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    T,
    P,
    iters,
    N: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    W: tl.constexpr = N * N + 2 * N
    tok, tmask, n, nmask, tok2, tmask2, r2, tok3, tmask3, r3, moffs, mmask, full3 = _mhc_block(
        inv_rms_ptr, T, N, BN, BLOCK_T, DYNAMIC
    )
    vmask = nmask[None, :]
    acc_pre = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
    acc_post = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
    acc_res = tl.zeros([BLOCK_T, BN, BN], dtype=tl.float32)
    for p in range(P):
        t, _x, _a = gated_logits(
            proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P,
            n[None, :], vmask, 0, W, DYNAMIC,
        )  # fmt: skip
        acc_pre += tl.sigmoid(t)
        t, _x, _a = gated_logits(
            proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P,
            n[None, :] + N, vmask, 1, W, DYNAMIC,
        )  # fmt: skip
        acc_post += 2.0 * tl.sigmoid(t)
        _x, _a, m = _mhc_res_start(
            proj_ptr, gates_ptr, bias_ptr, tok3, tmask3, r3, moffs, mmask, full3, p, P,
            N, DYNAMIC,
        )  # fmt: skip
        for _ in range(iters):
            m = _sinkhorn_round(m, full3)
        acc_res += m

    inv_p = 1.0 / P
    store_tile(pre_ptr, tok, tmask, n, nmask, N, acc_pre * inv_p)
    store_tile(post_ptr, tok, tmask, n, nmask, N, acc_post * inv_p)
    o3 = tok3 * (N * N) + n[None, :, None] * N + n[None, None, :]
    tl.store(res_ptr + o3, acc_res * inv_p, mask=full3)


@triton.jit
def _mhc_bwd_kernel(
    proj_ptr,
    inv_rms_ptr,
    gates_ptr,
    bias_ptr,
    g_pre_ptr,
    g_post_ptr,
    g_res_ptr,
    d_proj_ptr,
    d_inv_rms_ptr,
    d_gates_ptr,
    d_bias_ptr,
    T,
    P,
    iters,
    N: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """Gradients of one block of tokens; gates and bias as per-program partials."""
    W: tl.constexpr = N * N + 2 * N
    tiny = 1.1754943508222875e-38
    tok, tmask, n, nmask, tok2, tmask2, r2, tok3, tmask3, r3, moffs, mmask, full3 = _mhc_block(
        inv_rms_ptr, T, N, BN, BLOCK_T, DYNAMIC
    )
    inv_p = 1.0 / P
    g_pre = load_tile(g_pre_ptr, tok, tmask, n, nmask, N) * inv_p
    g_post = load_tile(g_post_ptr, tok, tmask, n, nmask, N) * inv_p
    o3 = tok3 * (N * N) + n[None, :, None] * N + n[None, None, :]
    g_res = tl.load(g_res_ptr + o3, mask=full3, other=0.0).to(tl.float32) * inv_p

    pid = tl.program_id(0)
    d_r = tl.zeros([BLOCK_T], dtype=tl.float32)
    part = pid.to(tl.int64) * P * W  # this program's row of the bias partials
    for p in range(P):
        # --- H_pre = mean_p sigmoid(t_pre), H_post = mean_p 2 sigmoid(t_post)
        d_r = sigmoid_group_backward(
            proj_ptr, gates_ptr, bias_ptr, d_proj_ptr, d_gates_ptr, d_bias_ptr,
            g_pre, d_r, tok2, tmask2, r2, n, nmask, p, P, 1.0, 0, N, W, DYNAMIC,
        )  # fmt: skip
        d_r = sigmoid_group_backward(
            proj_ptr, gates_ptr, bias_ptr, d_proj_ptr, d_gates_ptr, d_bias_ptr,
            g_post, d_r, tok2, tmask2, r2, n, nmask, p, P, 2.0, 1, N, W, DYNAMIC,
        )  # fmt: skip

        # --- H_res = mean_p Sinkhorn(t_res), differentiated through the unrolled rounds.
        # Iterates are recomputed from m0 for every round (O(iters^2) small n x n
        # rounds per token, no scratch memory): the kernel stays register-only and the
        # iterates are bitwise those of the forward pass.
        x, a, m0 = _mhc_res_start(
            proj_ptr, gates_ptr, bias_ptr, tok3, tmask3, r3, moffs, mmask, full3, p, P,
            N, DYNAMIC,
        )  # fmt: skip
        g = g_res
        for back in range(iters):
            m = m0
            for _ in range(iters - 1 - back):
                m = _sinkhorn_round(m, full3)
            # the round being differentiated: m -> b = m / cs -> out = b / rs
            cs = tl.sum(m, axis=1)
            cc = tl.maximum(cs, tiny)
            b = tl.where(full3, m / cc[:, None, :], 0.0)
            rs = tl.sum(b, axis=2)
            rc = tl.maximum(rs, tiny)
            out = tl.where(full3, b / rc[:, :, None], 0.0)
            # clamp_min passes no gradient where the floor binds, as in torch
            dot_r = tl.where(rs >= tiny, tl.sum(g * out, axis=2), 0.0)
            g = tl.where(full3, (g - dot_r[:, :, None]) / rc[:, :, None], 0.0)
            dot_c = tl.where(cs >= tiny, tl.sum(g * b, axis=1), 0.0)
            g = tl.where(full3, (g - dot_c[:, None, :]) / cc[:, None, :], 0.0)
        dt = g * m0  # through exp (m0 and g are zero outside full3)
        d_b = tl.sum(dt, axis=0)  # [BN, BN]
        boffs = n[:, None] * N + n[None, :]
        tl.store(
            d_bias_ptr + part + p * W + 2 * N + boffs,
            d_b,
            mask=nmask[:, None] & nmask[None, :],
        )
        if DYNAMIC:
            tl.store(d_proj_ptr + tok3 * (P * W) + p * W + moffs, dt * a * r3, mask=full3)
            d_r += tl.sum(tl.sum(dt * x, axis=2), axis=1) * a
            d_a = tl.sum(tl.sum(tl.sum(dt * x * r3, 2), 1), 0)
            tl.store(d_gates_ptr + (pid * P + p) * 3 + 2, d_a)

    if DYNAMIC:
        tl.store(d_inv_rms_ptr + tok, d_r, mask=tmask)


class _MhcCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, inv_rms, gates, bias, num_streams, sinkhorn_iters):
        n, num_proposals = num_streams, bias.shape[0]
        width = n * n + 2 * n
        dynamic = proj is not None
        if dynamic:
            lead = proj.shape[:-2]
            proj2 = proj.reshape(-1, num_proposals * width).contiguous()
            rms = inv_rms.reshape(-1).contiguous()
            num_tokens = proj2.shape[0]
        else:
            lead, proj2, rms, num_tokens = (), bias, bias, 1
        bias_c, gates_c = bias.contiguous(), (gates.contiguous() if dynamic else bias)
        kw = {"device": bias.device, "dtype": torch.float32}
        pre = torch.empty(num_tokens, n, **kw)
        post = torch.empty(num_tokens, n, **kw)
        res = torch.empty(num_tokens, n, n, **kw)
        bn, block_t = _mhc_blocks(n, num_tokens)
        grid = (triton.cdiv(num_tokens, block_t),)
        if num_tokens:
            _mhc_fwd_kernel[grid](
                proj2, rms, gates_c, bias_c, pre, post, res,
                num_tokens, num_proposals, sinkhorn_iters,
                N=n, BN=bn, BLOCK_T=block_t, DYNAMIC=dynamic,
            )  # fmt: skip
        ctx.save_for_backward(proj2, rms, gates_c, bias_c)
        ctx.meta = (n, sinkhorn_iters, dynamic, lead, inv_rms.shape if dynamic else None)
        ctx.input_dtypes = tuple(None if t is None else t.dtype for t in (proj, inv_rms, gates))
        return (
            pre.view(*lead, 1, n),
            post.view(*lead, n),
            res.view(*lead, n, n),
        )

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res):
        proj2, rms, gates_c, bias_c = ctx.saved_tensors
        n, iters, dynamic, lead, rms_shape = ctx.meta
        num_proposals, width = bias_c.shape
        num_tokens = proj2.shape[0] if dynamic else 1
        g_pre = g_pre.reshape(num_tokens, n).contiguous()
        g_post = g_post.reshape(num_tokens, n).contiguous()
        g_res = g_res.reshape(num_tokens, n, n).contiguous()
        bn, block_t = _mhc_blocks(n, num_tokens)
        num_programs = triton.cdiv(num_tokens, block_t)
        kw = {"device": bias_c.device, "dtype": torch.float32}
        d_bias = torch.empty(num_programs, num_proposals, width, **kw)
        if dynamic:
            d_proj = torch.empty(num_tokens, num_proposals * width, **kw)
            d_rms = torch.empty(num_tokens, **kw)
            d_gates = torch.empty(num_programs, num_proposals, 3, **kw)
        else:
            d_proj = d_rms = d_gates = d_bias  # unused by the kernel
        if num_tokens:
            _mhc_bwd_kernel[(num_programs,)](
                proj2, rms, gates_c, bias_c, g_pre, g_post, g_res,
                d_proj, d_rms, d_gates, d_bias,
                num_tokens, num_proposals, iters,
                N=n, BN=bn, BLOCK_T=block_t, DYNAMIC=dynamic,
            )  # fmt: skip
        d_bias = d_bias.sum(0).to(bias_c.dtype)
        if not dynamic:
            return None, None, None, d_bias, None, None
        proj_dtype, rms_dtype, gates_dtype = ctx.input_dtypes
        return (
            d_proj.view(*lead, num_proposals, width).to(proj_dtype),
            d_rms.view(rms_shape).to(rms_dtype),
            d_gates.sum(0).to(gates_dtype),
            d_bias,
            None,
            None,
        )


def _mhc_blocks(n: int, num_tokens: int) -> tuple[int, int]:
    bn = max(2, next_pow2(n))
    # ~512 matrix entries per program; fewer tokens when there are few (static: one)
    block_t = max(2, min(512 // (bn * bn), next_pow2(num_tokens)))
    return bn, block_t


def fused_mhc_coefficients(
    proj: Tensor | None,
    inv_rms: Tensor | None,
    gates: Tensor | None,
    bias: Tensor,
    num_streams: int,
    sinkhorn_iters: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mHC coefficients (H_pre, H_post, H_res) of ``mhc_mixing``, from its projection.

    Per token and proposal p: t = a * (x phi) * inv_rms + b, H_pre = mean_p sigmoid(t_pre),
    H_post = mean_p 2 sigmoid(t_post), H_res = mean_p Sinkhorn(t_res) with exp-domain
    Sinkhorn-Knopp exactly as ``sinkhorn_knopp(..., log_domain=False)``.

    Args:
        proj: x phi, [..., P, W] with W = n^2 + 2n laid out [pre n | post n | res n*n]; None
            for the static variant (t = b).
        inv_rms: 1 / RMS(x), [...] or [..., 1]; None for the static variant.
        gates: (a_pre, a_post, a_res), [P, 3]; None for the static variant.
        bias: b, [P, W].
        num_streams: n.
        sinkhorn_iters: column-then-row rounds (>= 1).

    Returns:
        H_pre [..., 1, n], H_post [..., n], H_res [..., n, n] in fp32 ([1, n], [n], [n, n]
        for the static variant). Saves proj, inv_rms, gates and bias only; the backward
        differentiates the unrolled Sinkhorn rounds exactly (no implicit differentiation),
        recomputing the iterates in registers from exp(t - colmax) for every round it goes
        back through: O(iters^2) n x n rounds per token instead of a scratch buffer of
        2 * iters matrices per token. Not supported: log-domain Sinkhorn.
    """
    if sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
    width = num_streams * num_streams + 2 * num_streams
    if bias.dim() != 2 or bias.shape[1] != width:
        raise ValueError(f"bias must be [P, {width}], got {tuple(bias.shape)}")
    if (proj is None) != (gates is None) or (proj is None) != (inv_rms is None):
        raise ValueError("proj, inv_rms and gates are all given (dynamic) or all None (static)")
    if proj is not None and proj.shape[-2:] != bias.shape:
        raise ValueError(f"proj must be [..., {bias.shape[0]}, {width}], got {proj.shape}")
    check(proj, inv_rms, gates, bias)
    return _MhcCoefficients.apply(proj, inv_rms, gates, bias, num_streams, sinkhorn_iters)
