"""Fused Triton kernels for the GPU path of (m)HC: coefficients, width and depth connections.

Plain PyTorch + Triton; importing this module never needs Triton (``HAVE_TRITON`` says whether
the kernels exist) and ``supported`` tells callers when to fall back to PyTorch.

Layout and symbols as in ``streams``: T tokens (leading dims flattened), the state X as rows
[T, N, D], k = 1 (HC/mHC) or k = N (Frac-Connections), and the coefficients H_pre [T, k, N],
H_post [T, N], H_res [T, N, N] (destination rows, X'[i] = sum_j H_res[i, j] X[j]), or static
ones shared by all tokens, H_pre [k, N], H_post [N], H_res [N, N]. Coefficients are computed
in fp32; states and branch outputs may be fp32, bf16 or fp16 and are read and written in their
own dtype with fp32 arithmetic in registers. fp64 is not supported (callers use PyTorch).

Public functions, each an autograd function with Triton forward and backward kernels:

- ``rms_projection``: x phi and 1 / RMS(x) in one pass over x (the dynamic projection).
- ``mhc_coefficients``: H_pre, H_post, H_res of mHC from the projection x phi, the inverse RMS,
  gates and bias (exp-domain Sinkhorn-Knopp, differentiated through its unrolled iterations).
- ``width_connection``: h0 = H_pre X.
- ``depth_connection``: X' = H_res X + H_post^T dropout(y + bias), bias-dropout-add merged in.

Per-token reductions over D (dH_pre, dH_post, dH_res) are written as one partial sum per
(token, D block) program and finished with a torch ``sum``, which also reduces over tokens for
static coefficients: deterministic, unlike atomics.
"""

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the module stays importable; callers use the PyTorch path
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = [
    "HAVE_TRITON",
    "depth_connection",
    "mhc_coefficients",
    "rms_projection",
    "supported",
    "width_connection",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _interpreting() -> bool:
    # Triton decides at decoration time whether ``@triton.jit`` makes interpreted functions,
    # so the kernels below, not the environment now, say whether CPU tensors can run; fixed
    # once the module is imported, and asked on every connection call.
    if not HAVE_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_width_fwd_kernel, InterpretedFunction)


def supported(*tensors: Tensor | None) -> bool:
    """Whether the kernels can run on ``tensors`` (None entries are ignored): Triton is
    importable, every tensor is fp32, bf16 or fp16, and on CUDA (any device when the kernels
    were defined with TRITON_INTERPRET=1)."""
    if not HAVE_TRITON:
        return False
    interpreting = _interpreting()
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            return False
        if not (t.is_cuda or interpreting):
            return False
    return True


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _block_d(row_size: int, rows_per_tile: int) -> int:
    # About 2k fp32 values per [rows, BLOCK_D] tile keeps registers in check for N <= 8.
    return max(16, min(_next_pow2(row_size), 2048 // rows_per_tile, 1024))


if HAVE_TRITON:
    # ------------------------------------------------------------------------------------
    # shared pieces (inlined by Triton)
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _load_tile(ptr, rows, rmask, cols, cmask, stride):
        """Elements [rows, cols] of the row-major matrix at ptr in fp32, 0 outside the masks."""
        mask = rmask[:, None] & cmask[None, :]
        tile = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        return tile.to(tl.float32)

    @triton.jit
    def _store_tile(ptr, rows, rmask, cols, cmask, stride, value):
        """Stores value at [rows, cols] of the row-major matrix at ptr, in ptr's dtype."""
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * stride + cols[None, :]
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)

    # ------------------------------------------------------------------------------------
    # mHC coefficients
    # ------------------------------------------------------------------------------------

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
    def _mhc_logits(
        proj_ptr,
        inv_rms,
        gates_ptr,
        bias_ptr,
        tok,
        tmask,
        p,
        P,
        offs,
        omask,
        group: tl.constexpr,
        N: tl.constexpr,
        DYNAMIC: tl.constexpr,
    ):
        """(t, raw proj, gate) for one coefficient group of proposal p; offs index within W.

        ``offs`` has a leading token axis of size 1 (static) that broadcasts against ``tok``.
        """
        W: tl.constexpr = N * N + 2 * N
        b = tl.load(bias_ptr + p * W + offs, mask=omask, other=0.0).to(tl.float32)
        if DYNAMIC:
            a = tl.load(gates_ptr + p * 3 + group).to(tl.float32)
            pmask = tmask & omask
            x = tl.load(proj_ptr + tok * (P * W) + p * W + offs, mask=pmask, other=0.0)
            x = x.to(tl.float32)
            t = a * (x * inv_rms) + b
        else:
            a = 0.0
            x = b * 0.0
            t = b
        return t, x, a

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
        """H_res's (t, raw proj, gate) of proposal p as ``_mhc_logits``, t's row max and
        Sinkhorn's start exp(t - row max), zero outside ``full3``."""
        t, x, a = _mhc_logits(
            proj_ptr, r3, gates_ptr, bias_ptr, tok3, tmask3, p, P, moffs, mmask, 2, N, DYNAMIC
        )
        # Padded rows have max -inf: their (finite t) - max is +inf, removed by the where.
        row_max = tl.max(tl.where(full3, t, float("-inf")), axis=2)
        m0 = tl.where(full3, tl.exp(t - row_max[:, :, None]), 0.0)
        return t, x, a, row_max, m0

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
        tok, tmask, n, nmask, tok2, tmask2, r2, tok3, tmask3, r3, moffs, mmask, full3 = _mhc_block(
            inv_rms_ptr, T, N, BN, BLOCK_T, DYNAMIC
        )
        vmask = nmask[None, :]
        acc_pre = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
        acc_post = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
        acc_res = tl.zeros([BLOCK_T, BN, BN], dtype=tl.float32)
        for p in range(P):
            t, _x, _a = _mhc_logits(
                proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P,
                n[None, :], vmask, 0, N, DYNAMIC,
            )  # fmt: skip
            acc_pre += tl.sigmoid(t)
            t, _x, _a = _mhc_logits(
                proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P,
                n[None, :] + N, vmask, 1, N, DYNAMIC,
            )  # fmt: skip
            acc_post += 2.0 * tl.sigmoid(t)
            _t, _x, _a, _row_max, m = _mhc_res_start(
                proj_ptr, gates_ptr, bias_ptr, tok3, tmask3, r3, moffs, mmask, full3, p, P,
                N, DYNAMIC,
            )  # fmt: skip
            for _ in range(iters):
                m = _sinkhorn_round(m, full3)
            acc_res += m

        inv_p = 1.0 / P
        _store_tile(pre_ptr, tok, tmask, n, nmask, N, acc_pre * inv_p)
        _store_tile(post_ptr, tok, tmask, n, nmask, N, acc_post * inv_p)
        o3 = tok3 * (N * N) + n[None, :, None] * N + n[None, None, :]
        tl.store(res_ptr + o3, acc_res * inv_p, mask=full3)

    @triton.jit
    def _mhc_sigmoid_bwd(
        proj_ptr,
        gates_ptr,
        bias_ptr,
        d_proj_ptr,
        d_gates_ptr,
        d_bias_ptr,
        g,
        d_r,
        tok2,
        tmask2,
        r2,
        n,
        nmask,
        p,
        P,
        scale: tl.constexpr,
        group: tl.constexpr,
        N: tl.constexpr,
        DYNAMIC: tl.constexpr,
    ):
        """Backward of H = mean_p scale * sigmoid(t) for group 0 (H_pre) or 1 (H_post), g its
        gradient over P: stores proposal p's d_proj and gate and bias partials and returns
        d_r plus this group's share of d inv_rms."""
        W: tl.constexpr = N * N + 2 * N
        pid = tl.program_id(0)
        vmask = nmask[None, :]
        full2 = tmask2 & vmask
        offs = n[None, :] + group * N
        t, x, a = _mhc_logits(
            proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P, offs, vmask, group, N, DYNAMIC
        )
        s = tl.sigmoid(t)
        dt = tl.where(full2, scale * g * s * (1.0 - s), 0.0)
        part = pid.to(tl.int64) * P * W  # this program's row of the bias partials
        tl.store(d_bias_ptr + part + p * W + group * N + n, tl.sum(dt, axis=0), mask=nmask)
        if DYNAMIC:
            tl.store(d_proj_ptr + tok2 * (P * W) + p * W + offs, dt * a * r2, mask=full2)
            d_r += tl.sum(dt * x, axis=1) * a
            d_a = tl.sum(tl.sum(dt * x * r2, 1), 0)
            tl.store(d_gates_ptr + (pid * P + p) * 3 + group, d_a)
        return d_r

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
        g_pre = _load_tile(g_pre_ptr, tok, tmask, n, nmask, N) * inv_p
        g_post = _load_tile(g_post_ptr, tok, tmask, n, nmask, N) * inv_p
        o3 = tok3 * (N * N) + n[None, :, None] * N + n[None, None, :]
        g_res = tl.load(g_res_ptr + o3, mask=full3, other=0.0).to(tl.float32) * inv_p

        pid = tl.program_id(0)
        d_r = tl.zeros([BLOCK_T], dtype=tl.float32)
        part = pid.to(tl.int64) * P * W  # this program's row of the bias partials
        for p in range(P):
            # --- H_pre = mean_p sigmoid(t_pre), H_post = mean_p 2 sigmoid(t_post)
            d_r = _mhc_sigmoid_bwd(
                proj_ptr, gates_ptr, bias_ptr, d_proj_ptr, d_gates_ptr, d_bias_ptr,
                g_pre, d_r, tok2, tmask2, r2, n, nmask, p, P, 1.0, 0, N, DYNAMIC,
            )  # fmt: skip
            d_r = _mhc_sigmoid_bwd(
                proj_ptr, gates_ptr, bias_ptr, d_proj_ptr, d_gates_ptr, d_bias_ptr,
                g_post, d_r, tok2, tmask2, r2, n, nmask, p, P, 2.0, 1, N, DYNAMIC,
            )  # fmt: skip

            # --- H_res = mean_p Sinkhorn(t_res), differentiated through the unrolled rounds.
            # Iterates are recomputed from m0 for every round (O(iters^2) small n x n
            # rounds per token, no scratch memory): the kernel stays register-only and the
            # iterates are bitwise those of the forward pass.
            t, x, a, row_max, m0 = _mhc_res_start(
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
            dt = g * m0  # through exp
            # through the row max: torch's amax shares the gradient evenly among ties
            is_max = (t == row_max[:, :, None]) & full3
            ties = tl.maximum(tl.sum(is_max.to(tl.float32), axis=2), 1.0)
            d_max = -tl.sum(dt, axis=2) / ties
            dt = tl.where(full3, dt + tl.where(is_max, d_max[:, :, None], 0.0), 0.0)
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

    # ------------------------------------------------------------------------------------
    # per-(token, D block) tiles of the width and depth connections
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _token_tile(D, R: tl.constexpr, BR: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's token, its index among the (token, D block) partials, and its
        [BR, BLOCK_D] tile: the D block's elements and the rows r < R, each with a mask."""
        tok = tl.program_id(0).to(tl.int64)
        db = tl.program_id(1)
        d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        r = tl.arange(0, BR)
        return tok, tok * tl.num_programs(1) + db, d, d < D, r, r < R

    @triton.jit
    def _mix_fwd(
        rows_ptr,
        h_ptr,
        D,
        N: tl.constexpr,
        R: tl.constexpr,
        BR: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC: tl.constexpr,
    ):
        """This program's [BR, BLOCK_D] tile of h X in fp32, for rows X [T, N, D] and h [T, R, N]
        (or [R, N] if STATIC); with the tile's token, D elements and rows and their masks."""
        tok, _part, d, dmask, r, rmask = _token_tile(D, R, BR, BLOCK_D)
        h_ptr += 0 if STATIC else tok * (R * N)
        acc = tl.zeros([BR, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(N):
            x = tl.load(rows_ptr + tok * (N * D) + j * D + d, mask=dmask, other=0.0)
            h = tl.load(h_ptr + r * N + j, mask=rmask, other=0.0).to(tl.float32)
            acc += h[:, None] * x.to(tl.float32)[None, :]
        return tok, d, dmask, r, rmask, acc

    @triton.jit
    def _mix_bwd(
        rows_ptr,
        h_ptr,
        g_ptr,
        d_rows_ptr,
        d_h_ptr,
        D,
        N: tl.constexpr,
        R: tl.constexpr,
        BR: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC: tl.constexpr,
    ):
        """Backward of ``_mix_fwd`` for its gradient g [T, R, D]: stores dX = h^T g and dh = g X^T
        as partials [T, D blocks, R, N]; returns the tile as ``_mix_fwd`` does, with g."""
        tok, part, d, dmask, r, rmask = _token_tile(D, R, BR, BLOCK_D)
        h_ptr += 0 if STATIC else tok * (R * N)
        d_h_ptr += part * (R * N)
        g = _load_tile(g_ptr + tok * (R * D), r, rmask, d, dmask, D)
        for j in tl.static_range(N):
            h = tl.load(h_ptr + r * N + j, mask=rmask, other=0.0).to(tl.float32)
            dx = tl.sum(h[:, None] * g, axis=0)
            x_offs = tok * (N * D) + j * D + d
            tl.store(d_rows_ptr + x_offs, dx.to(d_rows_ptr.dtype.element_ty), mask=dmask)
            x = tl.load(rows_ptr + x_offs, mask=dmask, other=0.0).to(tl.float32)
            tl.store(d_h_ptr + r * N + j, tl.sum(g * x[None, :], axis=1), mask=rmask)
        return tok, part, d, dmask, r, rmask, g

    # ------------------------------------------------------------------------------------
    # width connection: h0 = H_pre X
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _width_fwd_kernel(
        rows_ptr,
        h_ptr,
        out_ptr,
        D,
        N: tl.constexpr,
        K: tl.constexpr,
        BK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC: tl.constexpr,
    ):
        tok, d, dmask, kk, kmask, acc = _mix_fwd(rows_ptr, h_ptr, D, N, K, BK, BLOCK_D, STATIC)
        _store_tile(out_ptr + tok * (K * D), kk, kmask, d, dmask, D, acc)

    @triton.jit
    def _width_bwd_kernel(
        rows_ptr,
        h_ptr,
        g_ptr,
        d_rows_ptr,
        d_h_ptr,
        D,
        N: tl.constexpr,
        K: tl.constexpr,
        BK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC: tl.constexpr,
    ):
        """dX = H_pre^T dh0; dH_pre = dh0 X^T as partial sums [T, D blocks, K, N]."""
        _mix_bwd(rows_ptr, h_ptr, g_ptr, d_rows_ptr, d_h_ptr, D, N, K, BK, BLOCK_D, STATIC)

    # ------------------------------------------------------------------------------------
    # depth connection: X' = H_res X + H_post^T dropout(y + bias)
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _branch_rows(
        out_ptr,
        bias_ptr,
        tok,
        d,
        dmask,
        n,
        nmask,
        D,
        p_drop,
        scale,
        seed,
        N: tl.constexpr,
        K_IS_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        PER_ROW: tl.constexpr,
    ):
        """y_i = dropout(out + bias) as row i receives it, [BN, BLOCK_D] (k = N or per-row
        masks) or [1, BLOCK_D] (shared by all rows), and the keep mask (used only with
        dropout)."""
        if K_IS_N:
            omask = nmask[:, None] & dmask[None, :]
            e = n[:, None] * D + d[None, :]  # element of y = [k*D]
            y = tl.load(out_ptr + tok * (N * D) + e, mask=omask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(bias_ptr + e, mask=omask, other=0.0).to(tl.float32)
        else:
            e = d[None, :]
            y = tl.load(out_ptr + tok * D + e, mask=dmask[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(bias_ptr + e, mask=dmask[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            # Philox counters: the element of X' for per-row masks (PER_ROW, also set for
            # k = N, where the elements of y and of X' coincide), else the element of y;
            # int64, so large activations never repeat a counter.
            row_counter = tok * (N * D) + n[:, None] * D + d[None, :]
            counter = row_counter if PER_ROW else tok * D + e
            keep = tl.rand(seed, counter) >= p_drop
            y = tl.where(keep, y * scale, 0.0)
        else:
            keep = y == y
        return y, keep

    @triton.jit
    def _depth_fwd_kernel(
        rows_ptr,
        out_ptr,
        bias_ptr,
        post_ptr,
        res_ptr,
        new_ptr,
        D,
        p_drop,
        scale,
        seed,
        N: tl.constexpr,
        BN: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC: tl.constexpr,
        K_IS_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        PER_ROW: tl.constexpr,
    ):
        tok, d, dmask, n, nmask, acc = _mix_fwd(rows_ptr, res_ptr, D, N, N, BN, BLOCK_D, STATIC)
        y, _keep = _branch_rows(
            out_ptr, bias_ptr, tok, d, dmask, n, nmask, D, p_drop, scale, seed,
            N, K_IS_N, HAS_BIAS, DROPOUT, PER_ROW,
        )  # fmt: skip
        post_base = 0 if STATIC else tok * N
        h_post = tl.load(post_ptr + post_base + n, mask=nmask, other=0.0).to(tl.float32)
        acc += h_post[:, None] * y
        _store_tile(new_ptr + tok * (N * D), n, nmask, d, dmask, D, acc)

    @triton.jit
    def _depth_bwd_kernel(
        rows_ptr,
        out_ptr,
        bias_ptr,
        post_ptr,
        res_ptr,
        g_ptr,
        d_rows_ptr,
        d_out_ptr,
        d_post_ptr,
        d_res_ptr,
        D,
        p_drop,
        scale,
        seed,
        N: tl.constexpr,
        BN: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC: tl.constexpr,
        K_IS_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        PER_ROW: tl.constexpr,
    ):
        """dX = H_res^T dX', dy = H_post-weighted dX' through the regenerated dropout mask;
        dH_res = dX' X^T and dH_post = <dX'[i], y_i> as partials per (token, D block)."""
        tok, part, d, dmask, n, nmask, g = _mix_bwd(
            rows_ptr, res_ptr, g_ptr, d_rows_ptr, d_res_ptr, D, N, N, BN, BLOCK_D, STATIC
        )
        y, keep = _branch_rows(
            out_ptr, bias_ptr, tok, d, dmask, n, nmask, D, p_drop, scale, seed,
            N, K_IS_N, HAS_BIAS, DROPOUT, PER_ROW,
        )  # fmt: skip
        tl.store(d_post_ptr + part * N + n, tl.sum(g * y, axis=1), mask=nmask)
        post_base = 0 if STATIC else tok * N
        h_post = tl.load(post_ptr + post_base + n, mask=nmask, other=0.0).to(tl.float32)
        dy = h_post[:, None] * g
        if DROPOUT:
            dy = tl.where(keep, dy * scale, 0.0)
        if K_IS_N:
            _store_tile(d_out_ptr + tok * (N * D), n, nmask, d, dmask, D, dy)
        else:  # every row received the same y
            tl.store(
                d_out_ptr + tok * D + d,
                tl.sum(dy, axis=0).to(d_out_ptr.dtype.element_ty),
                mask=dmask,
            )

    # ------------------------------------------------------------------------------------
    # RMS projection: proj = x phi, inv_rms = 1 / sqrt(mean(x^2) + eps)
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _rms_proj_fwd_kernel(
        x_ptr,
        phi_ptr,
        proj_ptr,
        inv_rms_ptr,
        T,
        K,
        M,
        eps,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One [BLOCK_T, BLOCK_M] tile of x phi; the sum of squares rides along the K loop,
        so x is read once for both."""
        tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        tmask = tok < T
        cmask = cols < M
        acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
        sum_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            x = _load_tile(x_ptr, tok, tmask, kk, kmask, K)
            w = _load_tile(phi_ptr, kk, kmask, cols, cmask, M)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            sum_sq += tl.sum(x * x, axis=1)
        _store_tile(proj_ptr, tok, tmask, cols, cmask, M, acc)
        inv_rms = tl.rsqrt(sum_sq / K + eps)
        if tl.program_id(1) == 0:
            tl.store(inv_rms_ptr + tok, inv_rms, mask=tmask)

    @triton.jit
    def _rms_proj_dx_kernel(
        x_ptr,
        phi_ptr,
        inv_rms_ptr,
        g_proj_ptr,
        g_inv_ptr,
        dx_ptr,
        T,
        K,
        M,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """dx = dproj phi^T - (d inv_rms inv_rms^3 / K) x, one [BLOCK_T, BLOCK_K] tile."""
        tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tmask = tok < T
        kmask = kk < K
        acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            cmask = cols < M
            g = _load_tile(g_proj_ptr, tok, tmask, cols, cmask, M)
            w = _load_tile(phi_ptr, kk, kmask, cols, cmask, M)
            acc = tl.dot(g, tl.trans(w), acc, input_precision=PRECISION)
        r = tl.load(inv_rms_ptr + tok, mask=tmask, other=0.0)
        g_r = tl.load(g_inv_ptr + tok, mask=tmask, other=0.0).to(tl.float32)
        c = -g_r * r * r * r / K
        acc += c[:, None] * _load_tile(x_ptr, tok, tmask, kk, kmask, K)
        _store_tile(dx_ptr, tok, tmask, kk, kmask, K, acc)

    @triton.jit
    def _rms_proj_dw_kernel(
        x_ptr,
        g_proj_ptr,
        d_phi_ptr,
        T,
        K,
        M,
        blocks_per_split,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """dphi = x^T dproj over one split of the tokens: partials [splits, K, M]."""
        kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(2)
        kmask = kk < K
        cmask = cols < M
        acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        for b in range(blocks_per_split):
            t0 = (split * blocks_per_split + b).to(tl.int64) * BLOCK_T
            tok = t0 + tl.arange(0, BLOCK_T)
            tmask = tok < T
            x = _load_tile(x_ptr, tok, tmask, kk, kmask, K)
            g = _load_tile(g_proj_ptr, tok, tmask, cols, cmask, M)
            acc = tl.dot(tl.trans(x), g, acc, input_precision=PRECISION)
        _store_tile(d_phi_ptr + split.to(tl.int64) * K * M, kk, kmask, cols, cmask, M, acc)


# ----------------------------------------------------------------------------------------
# autograd functions
# ----------------------------------------------------------------------------------------


def _check(*tensors: Tensor | None) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the Triton kernels need triton installed")
    if not supported(*tensors):
        raise ValueError(
            "the Triton kernels need fp32/bf16/fp16 tensors on CUDA (or TRITON_INTERPRET=1); "
            f"got {[(t.dtype, t.device) for t in tensors if t is not None]}"
        )


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
    bn = max(2, _next_pow2(n))
    # ~512 matrix entries per program; fewer tokens when there are few (static: one)
    block_t = max(2, min(512 // (bn * bn), _next_pow2(num_tokens)))
    return bn, block_t


def mhc_coefficients(
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
        recomputing the iterates in registers from exp(t - rowmax) for every round it goes
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
    _check(proj, inv_rms, gates, bias)
    return _MhcCoefficients.apply(proj, inv_rms, gates, bias, num_streams, sinkhorn_iters)


def _proj_configs(num_cols: int) -> tuple[dict, dict, dict]:
    """Block sizes of the forward, dx and dphi kernels. tl.dot needs every block dimension
    >= 16; these keep all three under 255 registers without spills on sm_90 (checked with
    ptxas). fp32 operands use full-precision FMA unless torch allows TF32 for fp32 matmuls."""
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    block_m = max(16, min(_next_pow2(num_cols), 128))
    fwd = {"BLOCK_T": 16, "BLOCK_K": 64, "BLOCK_M": block_m, "PRECISION": precision}
    # dx loops over the columns: small chunks keep the phi tile small
    dx = {"BLOCK_T": 32, "BLOCK_K": 64, "BLOCK_M": min(block_m, 32), "PRECISION": precision}
    dw = {"BLOCK_T": 32, "BLOCK_K": 64, "BLOCK_M": block_m, "PRECISION": precision}
    return fwd, dx, dw


class _RmsProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, eps):
        lead, size = x.shape[:-1], x.shape[-1]
        num_cols = phi.shape[1]
        x2 = x.reshape(-1, size).contiguous()
        w = phi.contiguous()
        num_tokens = x2.shape[0]
        kw = {"device": x.device, "dtype": torch.float32}
        proj = torch.empty(num_tokens, num_cols, **kw)
        inv_rms = torch.empty(num_tokens, **kw)
        cfg_fwd, cfg_dx, cfg_dw = _proj_configs(num_cols)
        grid = (
            triton.cdiv(num_tokens, cfg_fwd["BLOCK_T"]),
            triton.cdiv(num_cols, cfg_fwd["BLOCK_M"]),
        )
        if num_tokens:
            _rms_proj_fwd_kernel[grid](
                x2, w, proj, inv_rms, num_tokens, size, num_cols, eps, **cfg_fwd
            )
        ctx.save_for_backward(x2, w, inv_rms)
        ctx.meta = (x.shape, cfg_dx, cfg_dw)
        return proj.view(*lead, num_cols), inv_rms.view(lead)

    @staticmethod
    def backward(ctx, g_proj, g_inv_rms):
        x2, w, inv_rms = ctx.saved_tensors
        x_shape, cfg_dx, cfg_dw = ctx.meta
        (num_tokens, size), num_cols = x2.shape, w.shape[1]
        g_proj = g_proj.reshape(num_tokens, num_cols).contiguous()
        g_inv_rms = g_inv_rms.reshape(num_tokens).contiguous()
        dx = torch.empty_like(x2)
        grid = (triton.cdiv(num_tokens, cfg_dx["BLOCK_T"]), triton.cdiv(size, cfg_dx["BLOCK_K"]))
        if num_tokens:
            _rms_proj_dx_kernel[grid](
                x2, w, inv_rms, g_proj, g_inv_rms, dx, num_tokens, size, num_cols, **cfg_dx
            )
        # dphi reduces over all tokens: split them so that enough programs run at once
        token_blocks = triton.cdiv(num_tokens, cfg_dw["BLOCK_T"])
        tiles = triton.cdiv(size, cfg_dw["BLOCK_K"]) * triton.cdiv(num_cols, cfg_dw["BLOCK_M"])
        splits = max(1, min(token_blocks, 512 // tiles))
        per_split = triton.cdiv(token_blocks, splits)
        splits = triton.cdiv(token_blocks, per_split) if token_blocks else 1
        d_phi = torch.zeros(splits, size, num_cols, device=x2.device, dtype=torch.float32)
        grid = (
            triton.cdiv(size, cfg_dw["BLOCK_K"]),
            triton.cdiv(num_cols, cfg_dw["BLOCK_M"]),
            splits,
        )
        if num_tokens:
            _rms_proj_dw_kernel[grid](
                x2, g_proj, d_phi, num_tokens, size, num_cols, per_split, **cfg_dw
            )
        return dx.view(x_shape), d_phi.sum(0).to(w.dtype), None


def rms_projection(x: Tensor, phi: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """proj = x phi and inv_rms = 1 / sqrt(mean(x^2) + eps) in one pass over x.

    The dynamic projection of (m)HC: RMSNorm(x) phi = (x phi) * inv_rms, so the norm is a
    per-token factor applied later (``mhc_coefficients`` takes it separately).

    Args:
        x: [..., K] in fp32, bf16 or fp16 (read once, computed in fp32).
        phi: [K, M], the skinny projection (M = n^2 + 2n per mHC proposal).

    Returns:
        proj [..., M] and inv_rms [...], fp32. Saves x, phi and inv_rms; the backward gives
        dx = dproj phi^T - (d inv_rms inv_rms^3 / K) x and dphi = x^T dproj.
    """
    _check(x, phi)
    if phi.dim() != 2 or phi.shape[0] != x.shape[-1]:
        raise ValueError(f"phi {tuple(phi.shape)} does not match x {tuple(x.shape)}")
    return _RmsProjection.apply(x, phi, float(eps))


class _WidthConnection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, h_pre):
        lead, (num_rows, row_size) = rows.shape[:-2], rows.shape[-2:]
        static = h_pre.dim() == 2
        k = h_pre.shape[-2]
        x = rows.reshape(-1, num_rows, row_size).contiguous()
        h = h_pre.contiguous()
        out = torch.empty(x.shape[0], k * row_size, device=rows.device, dtype=rows.dtype)
        block_d = _block_d(row_size, _next_pow2(k))
        grid = (x.shape[0], triton.cdiv(row_size, block_d))
        if x.shape[0]:
            _width_fwd_kernel[grid](
                x, h, out, row_size,
                N=num_rows, K=k, BK=_next_pow2(k), BLOCK_D=block_d, STATIC=static,
            )  # fmt: skip
        ctx.save_for_backward(x, h)
        ctx.meta = (rows.shape, h_pre.shape, static, block_d)
        return out.view(*lead, k * row_size)

    @staticmethod
    def backward(ctx, grad):
        x, h = ctx.saved_tensors
        rows_shape, h_shape, static, block_d = ctx.meta
        num_tokens, num_rows, row_size = x.shape
        k = h_shape[-2]
        g = grad.reshape(num_tokens, k * row_size).contiguous()
        d_rows = torch.empty_like(x)
        grid = (num_tokens, triton.cdiv(row_size, block_d))
        d_h = torch.zeros(num_tokens, grid[1], k, num_rows, device=x.device, dtype=torch.float32)
        if num_tokens:
            _width_bwd_kernel[grid](
                x, h, g, d_rows, d_h, row_size,
                N=num_rows, K=k, BK=_next_pow2(k), BLOCK_D=block_d, STATIC=static,
            )  # fmt: skip
        d_h = d_h.sum(dim=(0, 1)) if static else d_h.sum(dim=1)
        return d_rows.view(rows_shape), d_h.view(h_shape).to(h.dtype)


def width_connection(rows: Tensor, h_pre: Tensor) -> Tensor:
    """h0 = H_pre X: rows X [..., N, D], h_pre [..., k, N] or static [k, N] -> [..., k*D].

    Computed in fp32, returned in the rows' dtype. Saves X and H_pre; the backward gives
    dX = H_pre^T dh0 and dH_pre = dh0 X^T (summed over tokens when static).
    """
    _check(rows, h_pre)
    if h_pre.dim() != 2 and h_pre.shape[:-2] != rows.shape[:-2]:
        raise ValueError(f"h_pre {tuple(h_pre.shape)} does not match rows {tuple(rows.shape)}")
    if h_pre.shape[-1] != rows.shape[-2]:
        raise ValueError(f"h_pre {tuple(h_pre.shape)} does not match rows {tuple(rows.shape)}")
    return _WidthConnection.apply(rows, h_pre)


class _DepthConnection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, out, bias, h_post, h_res, dropout_p, seed, per_row_mask):
        lead, (num_rows, row_size) = rows.shape[:-2], rows.shape[-2:]
        static = h_res.dim() == 2
        x = rows.reshape(-1, num_rows, row_size).contiguous()
        num_tokens = x.shape[0]
        y = out.reshape(num_tokens, -1).contiguous()
        k_is_n = y.shape[1] != row_size
        b = None if bias is None else bias.contiguous()
        post, res = h_post.contiguous(), h_res.contiguous()
        new = torch.empty_like(x)
        cfg = _depth_config(num_rows, row_size, static, k_is_n, b, dropout_p, per_row_mask)
        grid = (num_tokens, triton.cdiv(row_size, cfg["BLOCK_D"]))
        if num_tokens:
            _depth_fwd_kernel[grid](
                x, y, y if b is None else b, post, res, new, row_size,
                dropout_p, _dropout_scale(dropout_p), seed, **cfg,
            )  # fmt: skip
        ctx.save_for_backward(x, y, b, post, res)
        ctx.meta = (rows.shape, out.shape, cfg, dropout_p, seed)
        return new.view(*lead, num_rows * row_size)

    @staticmethod
    def backward(ctx, grad):
        x, y, b, post, res = ctx.saved_tensors
        rows_shape, out_shape, cfg, dropout_p, seed = ctx.meta
        num_tokens, num_rows, row_size = x.shape
        g = grad.reshape(num_tokens, num_rows, row_size).contiguous()
        d_rows = torch.empty_like(x)
        d_out = torch.empty_like(y)
        grid = (num_tokens, triton.cdiv(row_size, cfg["BLOCK_D"]))
        kw = {"device": x.device, "dtype": torch.float32}
        d_post = torch.zeros(num_tokens, grid[1], num_rows, **kw)
        d_res = torch.zeros(num_tokens, grid[1], num_rows, num_rows, **kw)
        if num_tokens:
            _depth_bwd_kernel[grid](
                x, y, y if b is None else b, post, res, g,
                d_rows, d_out, d_post, d_res, row_size,
                dropout_p, _dropout_scale(dropout_p), seed, **cfg,
            )  # fmt: skip
        reduce = (0, 1) if cfg["STATIC"] else 1
        d_bias = None
        if b is not None and ctx.needs_input_grad[2]:
            d_bias = d_out.sum(0, dtype=torch.float32).to(b.dtype)
        return (
            d_rows.view(rows_shape),
            d_out.view(out_shape),
            d_bias,
            d_post.sum(reduce).view(post.shape).to(post.dtype),
            d_res.sum(reduce).view(res.shape).to(res.dtype),
            None,
            None,
            None,
        )


def _depth_config(
    num_rows: int,
    row_size: int,
    static: bool,
    k_is_n: bool,
    bias: Tensor | None,
    dropout_p: float,
    per_row_mask: bool,
) -> dict:
    bn = _next_pow2(num_rows)
    return {
        "N": num_rows,
        "BN": bn,
        "BLOCK_D": _block_d(row_size, bn),
        "STATIC": static,
        "K_IS_N": k_is_n,
        "HAS_BIAS": bias is not None,
        "DROPOUT": dropout_p > 0.0,
        "PER_ROW": (per_row_mask or k_is_n) and dropout_p > 0.0,
    }


def _dropout_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0  # p = 1 drops everything


def depth_connection(
    rows: Tensor,
    out: Tensor,
    bias: Tensor | None,
    h_post: Tensor,
    h_res: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: int = 0,
    *,
    per_row_mask: bool = False,
) -> Tensor:
    """X' = H_res X + H_post^T y with y = dropout(out + bias), flattened to [..., N*D].

    The depth connection merged with Megatron's bias-dropout-add, in the rows' dtype.

    Args:
        rows: X, [..., N, D].
        out: the branch output, [..., k*D] with k = 1 (the same y for every row) or k = N
            (row i receives y's i-th D-slice).
        bias: the branch's output bias, [k*D], or None.
        h_post: [..., N] or static [N]. h_res: [..., N, N] or static [N, N].
        dropout_p, training: dropout on y, active only when training and p > 0. The mask
            comes from Philox ``tl.rand(seed, element index)`` and is regenerated in backward,
            so it is never stored; the same seed gives the same mask.
        per_row_mask: drop each row's share H_post[i] y independently (as
            ``streams.depth_connection`` does) instead of dropping y once for all rows; the
            same thing when k = N.

    Saves X, out, bias and the coefficients; the backward gives dX = H_res^T dX',
    dy = sum_i H_post[i] dX'[i] (through the mask), dbias = sum over tokens of dy,
    dH_post[i] = <dX'[i], y_i> and dH_res = dX' X^T (summed over tokens when static).
    """
    _check(rows, out, bias, h_post, h_res)
    num_rows, row_size = rows.shape[-2:]
    if out.shape[:-1] != rows.shape[:-2] or out.shape[-1] not in (row_size, num_rows * row_size):
        raise ValueError(f"out {tuple(out.shape)} does not match rows {tuple(rows.shape)}")
    if bias is not None and bias.shape != out.shape[-1:]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match out {tuple(out.shape)}")
    static = h_res.dim() == 2
    lead = () if static else rows.shape[:-2]
    if h_res.shape != (*lead, num_rows, num_rows) or h_post.shape != (*lead, num_rows):
        raise ValueError(
            f"h_post {tuple(h_post.shape)} / h_res {tuple(h_res.shape)} do not match rows "
            f"{tuple(rows.shape)}"
        )
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    return _DepthConnection.apply(rows, out, bias, h_post, h_res, p, int(seed), per_row_mask)
