"""Fused mHC-lite coefficients: H_pre, H_post, H_res from the projection, one autograd function.

Per token and proposal p, with x phi and inv_rms from the RMS projection, the gates a and the
bias b (``manifold_hyper_connection``): t = a * (x phi) * inv_rms + b, H_pre = mean_p
sigmoid(t_pre), H_post = mean_p 2 sigmoid(t_post), H_res = mean_p sum_k softmax(u)_k P_k with
u = t_res the n! permutation logits and P_k the permutation matrices of
``permutations.permutation_matrices`` (given to the kernel as the basis [n!, n*n]).

One program handles a block of tokens. The n! logits (720 at n = 6) are read in chunks of
BLOCK_K with an online max and sum for the softmax, so only a [tokens, BLOCK_K] tile and the
[tokens, n*n] accumulator live in registers; each chunk's sum_k exp(u_k - max) P_k is one
[tokens, BLOCK_K] x [BLOCK_K, n*n] product. The backward recomputes the softmax from the
inputs (a first pass for max, sum and H_res, a second for the gradients): with w = softmax(u)
and G the gradient of a proposal's H_res, du_k = w_k (dw_k - sum_l w_l dw_l), dw = G_flat
basis^T, and sum_l w_l dw_l = <G, H_res>. Gate and bias gradients are per-program partials
summed with torch (deterministic, unlike atomics).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..permutations import MAX_STREAMS, num_permutations, permutation_matrices
from .availability import check
from .triton_utils import gated_logits, load_tile, next_pow2, sigmoid_group_backward, store_tile

__all__ = ["fused_mhc_lite_coefficients"]


@triton.jit
def _lite_block(
    inv_rms_ptr,
    T,
    N: tl.constexpr,
    BN: tl.constexpr,
    BNN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """This program's tokens and streams with their masks, tokens and inverse RMS broadcast
    to [BT, 1]; the flattened n x n entries of H_res and their mask."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    n = tl.arange(0, BN)
    e = tl.arange(0, BNN)
    if DYNAMIC:
        r = tl.load(inv_rms_ptr + tok, mask=tmask, other=0.0).to(tl.float32)
    else:
        r = tl.zeros([BLOCK_T], dtype=tl.float32)
    return tok, tmask, n, n < N, e, e < N * N, tok[:, None], tmask[:, None], r[:, None]


@triton.jit
def _lite_logits(
    proj_ptr,
    gates_ptr,
    bias_ptr,
    basis_ptr,
    tok2,
    tmask2,
    r2,
    e,
    emask,
    p,
    P,
    k0,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """Logits k0 .. k0 + BLOCK_K of proposal p as ``gated_logits``: u [BT, BLOCK_K] (-inf
    past K, so that exp(u) = 0 there), raw proj and gate; the indices k of these logits and
    their mask; and the basis rows [BLOCK_K, BNN] of these permutations."""
    W: tl.constexpr = 2 * N + K
    k = k0 + tl.arange(0, BLOCK_K)
    kmask = k < K
    t, x, a = gated_logits(
        proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P,
        (2 * N + k)[None, :], kmask[None, :], 2, W, DYNAMIC,
    )  # fmt: skip
    # static: t is [1, BLOCK_K], broadcast to the tokens for the products
    u = tl.broadcast_to(tl.where(kmask[None, :], t, float("-inf")), (BLOCK_T, BLOCK_K))
    basis = load_tile(basis_ptr, k, kmask, e, emask, N * N)
    return u, x, a, k, kmask, basis


@triton.jit
def _lite_softmax(
    proj_ptr,
    gates_ptr,
    bias_ptr,
    basis_ptr,
    tok2,
    tmask2,
    r2,
    e,
    emask,
    p,
    P,
    N: tl.constexpr,
    K: tl.constexpr,
    BNN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """Proposal p's softmax over its K logits in one pass over chunks: the max m [BT], the sum
    s = sum_k exp(u_k - m) [BT] and the flattened H_res = sum_k softmax(u)_k P_k [BT, BNN]."""
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BNN], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        u, _x, _a, _k, _kmask, basis = _lite_logits(
            proj_ptr, gates_ptr, bias_ptr, basis_ptr, tok2, tmask2, r2, e, emask, p, P, k0,
            N, K, BLOCK_K, BLOCK_T, DYNAMIC,
        )  # fmt: skip
        # every chunk has a valid logit, so m_new is finite and the first rescale is exp(-inf)
        m_new = tl.maximum(m, tl.max(u, axis=1))
        rescale = tl.exp(m - m_new)
        w = tl.exp(u - m_new[:, None])
        s = s * rescale + tl.sum(w, axis=1)
        # ieee: no TF32 rounding of the weights in the product
        acc = acc * rescale[:, None] + tl.dot(w, basis, input_precision="ieee")
        m = m_new
    return m, s, acc / s[:, None]


@triton.jit
def _lite_fwd_kernel(
    proj_ptr,
    inv_rms_ptr,
    gates_ptr,
    bias_ptr,
    basis_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    T,
    P,
    N: tl.constexpr,
    K: tl.constexpr,
    BN: tl.constexpr,
    BNN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    W: tl.constexpr = 2 * N + K
    tok, tmask, n, nmask, e, emask, tok2, tmask2, r2 = _lite_block(
        inv_rms_ptr, T, N, BN, BNN, BLOCK_T, DYNAMIC
    )
    vmask = nmask[None, :]
    acc_pre = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
    acc_post = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
    acc_res = tl.zeros([BLOCK_T, BNN], dtype=tl.float32)
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
        _m, _s, h_res = _lite_softmax(
            proj_ptr, gates_ptr, bias_ptr, basis_ptr, tok2, tmask2, r2, e, emask, p, P,
            N, K, BNN, BLOCK_K, BLOCK_T, DYNAMIC,
        )  # fmt: skip
        acc_res += h_res

    inv_p = 1.0 / P
    store_tile(pre_ptr, tok, tmask, n, nmask, N, acc_pre * inv_p)
    store_tile(post_ptr, tok, tmask, n, nmask, N, acc_post * inv_p)
    store_tile(res_ptr, tok, tmask, e, emask, N * N, acc_res * inv_p)


@triton.jit
def _lite_bwd_kernel(
    proj_ptr,
    inv_rms_ptr,
    gates_ptr,
    bias_ptr,
    basis_ptr,
    g_pre_ptr,
    g_post_ptr,
    g_res_ptr,
    d_proj_ptr,
    d_inv_rms_ptr,
    d_gates_ptr,
    d_bias_ptr,
    T,
    P,
    N: tl.constexpr,
    K: tl.constexpr,
    BN: tl.constexpr,
    BNN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """Gradients of one block of tokens; gates and bias as per-program partials."""
    W: tl.constexpr = 2 * N + K
    tok, tmask, n, nmask, e, emask, tok2, tmask2, r2 = _lite_block(
        inv_rms_ptr, T, N, BN, BNN, BLOCK_T, DYNAMIC
    )
    inv_p = 1.0 / P
    g_pre = load_tile(g_pre_ptr, tok, tmask, n, nmask, N) * inv_p
    g_post = load_tile(g_post_ptr, tok, tmask, n, nmask, N) * inv_p
    g_res = load_tile(g_res_ptr, tok, tmask, e, emask, N * N) * inv_p  # [BT, BNN]

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

        # --- H_res = mean_p sum_k softmax(u)_k P_k: max, sum and H_res first, then du by chunks
        m, s, h_res = _lite_softmax(
            proj_ptr, gates_ptr, bias_ptr, basis_ptr, tok2, tmask2, r2, e, emask, p, P,
            N, K, BNN, BLOCK_K, BLOCK_T, DYNAMIC,
        )  # fmt: skip
        inv_s = 1.0 / s
        w_dw = tl.sum(g_res * h_res, axis=1)  # sum_l w_l dw_l = <G, H_res>
        d_a = tl.zeros([], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            u, x, a, k, kmask, basis = _lite_logits(
                proj_ptr, gates_ptr, bias_ptr, basis_ptr, tok2, tmask2, r2, e, emask, p, P,
                k0, N, K, BLOCK_K, BLOCK_T, DYNAMIC,
            )  # fmt: skip
            w = tl.exp(u - m[:, None]) * inv_s[:, None]
            dw = tl.dot(g_res, tl.trans(basis), input_precision="ieee")  # G_flat basis^T
            du = tl.where(tmask2, w * (dw - w_dw[:, None]), 0.0)  # 0 past K, where w = 0
            tl.store(d_bias_ptr + part + p * W + 2 * N + k, tl.sum(du, axis=0), mask=kmask)
            if DYNAMIC:
                offs = tok2 * (P * W) + p * W + 2 * N + k[None, :]
                tl.store(d_proj_ptr + offs, du * a * r2, mask=tmask2 & kmask[None, :])
                d_r += tl.sum(du * x, axis=1) * a
                d_a += tl.sum(tl.sum(du * x * r2, 1), 0)
        if DYNAMIC:
            tl.store(d_gates_ptr + (pid * P + p) * 3 + 2, d_a)

    if DYNAMIC:
        tl.store(d_inv_rms_ptr + tok, d_r, mask=tmask)


class _MhcLiteCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, inv_rms, gates, bias, num_streams):
        n, num_proposals = num_streams, bias.shape[0]
        width = bias.shape[1]
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
        basis = _basis(n, bias.device)
        pre = torch.empty(num_tokens, n, **kw)
        post = torch.empty(num_tokens, n, **kw)
        res = torch.empty(num_tokens, n, n, **kw)
        blocks = _lite_blocks(n)
        if num_tokens:
            _lite_fwd_kernel[(triton.cdiv(num_tokens, blocks["BLOCK_T"]),)](
                proj2, rms, gates_c, bias_c, basis, pre, post, res, num_tokens, num_proposals,
                DYNAMIC=dynamic, **blocks,
            )  # fmt: skip
        ctx.save_for_backward(proj2, rms, gates_c, bias_c)
        ctx.meta = (n, dynamic, lead, inv_rms.shape if dynamic else None)
        ctx.input_dtypes = tuple(None if t is None else t.dtype for t in (proj, inv_rms, gates))
        return (
            pre.view(*lead, 1, n),
            post.view(*lead, n),
            res.view(*lead, n, n),
        )

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res):
        proj2, rms, gates_c, bias_c = ctx.saved_tensors
        n, dynamic, lead, rms_shape = ctx.meta
        num_proposals, width = bias_c.shape
        num_tokens = proj2.shape[0] if dynamic else 1
        g_pre = g_pre.reshape(num_tokens, n).contiguous()
        g_post = g_post.reshape(num_tokens, n).contiguous()
        g_res = g_res.reshape(num_tokens, n * n).contiguous()
        blocks = _lite_blocks(n)
        num_programs = triton.cdiv(num_tokens, blocks["BLOCK_T"])
        kw = {"device": bias_c.device, "dtype": torch.float32}
        basis = _basis(n, bias_c.device)
        d_bias = torch.empty(num_programs, num_proposals, width, **kw)
        if dynamic:
            d_proj = torch.empty(num_tokens, num_proposals * width, **kw)
            d_rms = torch.empty(num_tokens, **kw)
            d_gates = torch.empty(num_programs, num_proposals, 3, **kw)
        else:
            d_proj = d_rms = d_gates = d_bias  # unused by the kernel
        if num_tokens:
            _lite_bwd_kernel[(num_programs,)](
                proj2, rms, gates_c, bias_c, basis, g_pre, g_post, g_res,
                d_proj, d_rms, d_gates, d_bias, num_tokens, num_proposals,
                DYNAMIC=dynamic, **blocks,
            )  # fmt: skip
        d_bias = d_bias.sum(0).to(bias_c.dtype)
        if not dynamic:
            return None, None, None, d_bias, None
        proj_dtype, rms_dtype, gates_dtype = ctx.input_dtypes
        return (
            d_proj.view(*lead, num_proposals, width).to(proj_dtype),
            d_rms.view(rms_shape).to(rms_dtype),
            d_gates.sum(0).to(gates_dtype),
            d_bias,
            None,
        )


@functools.cache
def _basis(n: int, device: torch.device) -> Tensor:
    """The permutation matrices as the kernels read them, [n!, n*n] fp32, once per device."""
    return permutation_matrices(n, torch.float32, device).flatten(-2).contiguous()


def _lite_blocks(n: int) -> dict[str, int]:
    """The kernels' constexpr sizes: 16 tokens per program (tl.dot's least dimension), 32
    logits per chunk, 64 at n = 6. Chosen by ptxas's register counts for sm_90 with 4 warps
    (not timed): 32 tokens spill registers in the backward at n >= 5, and 32 logits spill a
    little at n = 6."""
    num_logits = num_permutations(n)
    return {
        "N": n,
        "K": num_logits,
        "BN": max(2, next_pow2(n)),
        "BNN": max(16, next_pow2(n * n)),
        "BLOCK_K": max(16, min(next_pow2(num_logits), 64 if n == 6 else 32)),
        "BLOCK_T": 16,
    }


def fused_mhc_lite_coefficients(
    proj: Tensor | None,
    inv_rms: Tensor | None,
    gates: Tensor | None,
    bias: Tensor,
    num_streams: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mHC-lite coefficients (H_pre, H_post, H_res) of ``mhc_mixing`` with
    ``h_res_parameterization="permutations"``, from its projection.

    Per token and proposal p: t = a * (x phi) * inv_rms + b, H_pre = mean_p sigmoid(t_pre),
    H_post = mean_p 2 sigmoid(t_post), H_res = mean_p sum_k softmax(t_res)_k P_k over the n!
    permutation matrices in ``permutations.permutation_matrices`` order.

    Args:
        proj: x phi, [..., P, W] with W = 2n + n! laid out [pre n | post n | res n!]; None
            for the static variant (t = b).
        inv_rms: 1 / RMS(x), [...] or [..., 1]; None for the static variant.
        gates: (a_pre, a_post, a_res), [P, 3]; None for the static variant.
        bias: b, [P, W].
        num_streams: n, 2 to ``permutations.MAX_STREAMS``.

    Returns:
        H_pre [..., 1, n], H_post [..., n], H_res [..., n, n] in fp32 ([1, n], [n], [n, n]
        for the static variant). Saves proj, inv_rms, gates and bias only; the backward
        recomputes the softmax from them and is exact.
    """
    if not 2 <= num_streams <= MAX_STREAMS:
        raise ValueError(
            f"num_streams must be 2 to {MAX_STREAMS} for mHC-lite's coefficients (n! logits "
            f"per token), got {num_streams}"
        )
    width = 2 * num_streams + num_permutations(num_streams)
    if bias.dim() != 2 or bias.shape[1] != width:
        raise ValueError(f"bias must be [P, {width}] (W = 2n + n!), got {tuple(bias.shape)}")
    if (proj is None) != (gates is None) or (proj is None) != (inv_rms is None):
        raise ValueError("proj, inv_rms and gates are all given (dynamic) or all None (static)")
    if proj is not None and proj.shape[-2:] != bias.shape:
        raise ValueError(f"proj must be [..., {bias.shape[0]}, {width}], got {proj.shape}")
    check(proj, inv_rms, gates, bias)
    return _MhcLiteCoefficients.apply(proj, inv_rms, gates, bias, num_streams)
