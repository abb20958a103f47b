"""Triton helpers shared by the kernels of this package: tiles, the stream-mixing tile of the
width and depth kernels, and the gated logits and sigmoid groups (H_pre, H_post) of the mHC
and mHC-lite coefficient kernels. Importing this module needs Triton.

Layout as in ``streams``: T tokens, the state X as rows [T, N, D] (row-major), coefficients
h [T, R, N] per token or [R, N] shared by all tokens (STATIC). The coefficient kernels read
the projection [T, P, W] with W = 2N + R laid out [pre N | post N | res R]. Values are loaded
in their own dtype and computed in fp32.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "ADD_D_ROWS",
    "NO_D_ROWS",
    "STORE_D_ROWS",
    "block_d",
    "gated_logits",
    "interpreted",
    "load_tile",
    "mix_backward",
    "mix_forward",
    "next_pow2",
    "sigmoid_group_backward",
    "store_tile",
    "token_tile",
]

# What ``mix_backward`` does with dX (its D_ROWS argument).
NO_D_ROWS, STORE_D_ROWS, ADD_D_ROWS = 0, 1, 2


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def block_d(row_size: int, rows_per_tile: int) -> int:
    """D elements per tile: about 2k fp32 values per [rows, BLOCK_D] tile keeps registers in
    check for N <= 8."""
    return max(16, min(next_pow2(row_size), 2048 // rows_per_tile, 1024))


@triton.jit
def load_tile(ptr, rows, rmask, cols, cmask, stride):
    """Elements [rows, cols] of the row-major matrix at ptr in fp32, 0 outside the masks."""
    mask = rmask[:, None] & cmask[None, :]
    tile = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def store_tile(ptr, rows, rmask, cols, cmask, stride, value):
    """Stores value at [rows, cols] of the row-major matrix at ptr, in ptr's dtype."""
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * stride + cols[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """Whether the kernels were defined for Triton's interpreter (TRITON_INTERPRET=1 when
    ``@triton.jit`` ran), which runs them on CPU tensors too. Triton decides at decoration
    time, so this module's own functions say it, not the environment now."""
    return isinstance(load_tile, InterpretedFunction)


@triton.jit
def token_tile(D, R: tl.constexpr, BR: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's token, its index among the (token, D block) partials, and its
    [BR, BLOCK_D] tile: the D block's elements and the rows r < R, each with a mask."""
    tok = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.arange(0, BR)
    return tok, tok * tl.num_programs(1) + db, d, d < D, r, r < R


@triton.jit
def mix_forward(
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
    tok, _part, d, dmask, r, rmask = token_tile(D, R, BR, BLOCK_D)
    h_ptr += 0 if STATIC else tok * (R * N)
    acc = tl.zeros([BR, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(N):
        x = tl.load(rows_ptr + tok * (N * D) + j * D + d, mask=dmask, other=0.0)
        h = tl.load(h_ptr + r * N + j, mask=rmask, other=0.0).to(tl.float32)
        acc += h[:, None] * x.to(tl.float32)[None, :]
    return tok, d, dmask, r, rmask, acc


@triton.jit
def mix_backward(
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
    D_ROWS: tl.constexpr,
):
    """Backward of ``mix_forward`` for its gradient g [T, R, D]: dh = g X^T as partials
    [T, D blocks, R, N], and dX = h^T g stored (STORE_D_ROWS), added to d_rows (ADD_D_ROWS)
    or not computed (NO_D_ROWS); returns the tile as ``mix_forward`` does, with g."""
    tok, part, d, dmask, r, rmask = token_tile(D, R, BR, BLOCK_D)
    h_ptr += 0 if STATIC else tok * (R * N)
    d_h_ptr += part * (R * N)
    g = load_tile(g_ptr + tok * (R * D), r, rmask, d, dmask, D)
    for j in tl.static_range(N):
        x_offs = tok * (N * D) + j * D + d
        if D_ROWS != 0:
            h = tl.load(h_ptr + r * N + j, mask=rmask, other=0.0).to(tl.float32)
            dx = tl.sum(h[:, None] * g, axis=0)
            if D_ROWS == 2:
                dx += tl.load(d_rows_ptr + x_offs, mask=dmask, other=0.0).to(tl.float32)
            tl.store(d_rows_ptr + x_offs, dx.to(d_rows_ptr.dtype.element_ty), mask=dmask)
        x = tl.load(rows_ptr + x_offs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(d_h_ptr + r * N + j, tl.sum(g * x[None, :], axis=1), mask=rmask)
    return tok, part, d, dmask, r, rmask, g


@triton.jit
def gated_logits(
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
    W: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """(t, raw proj, gate) for one coefficient group (0 pre, 1 post, 2 res) of proposal p:
    t = a * (x phi) * inv_rms + b, or t = b (static); offs index within W.

    ``offs`` has a leading token axis of size 1 (static) that broadcasts against ``tok``.
    """
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
def sigmoid_group_backward(
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
    W: tl.constexpr,
    DYNAMIC: tl.constexpr,
):
    """Backward of H = mean_p scale * sigmoid(t) for group 0 (H_pre) or 1 (H_post), g its
    gradient over P: stores proposal p's d_proj and gate and bias partials and returns
    d_r plus this group's share of d inv_rms."""
    pid = tl.program_id(0)
    vmask = nmask[None, :]
    full2 = tmask2 & vmask
    offs = n[None, :] + group * N
    t, x, a = gated_logits(
        proj_ptr, r2, gates_ptr, bias_ptr, tok2, tmask2, p, P, offs, vmask, group, W, DYNAMIC
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
