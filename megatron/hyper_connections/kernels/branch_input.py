"""Fused branch input of the width connection: h0 = H_pre X, and its backward.

X [..., N, D] (fp32, bf16 or fp16, read in its own dtype), H_pre [..., k, N] per token or
[k, N] shared by all tokens, fp32 arithmetic; h0 [..., k*D] in X's dtype. One program per
(token, D block) tile. The backward writes dH_pre as one partial sum per tile, finished with a
torch ``sum`` (over tokens too for a static H_pre): deterministic, unlike atomics.

- ``fused_branch_input``: h0, as ``streams.branch_input``.
- ``fused_branch_input_backward``: dH_pre = dh0 X^T, and dX += H_pre^T dh0 in place.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .availability import check
from .triton_utils import (
    ADD_D_ROWS,
    NO_D_ROWS,
    block_d,
    mix_backward,
    mix_forward,
    next_pow2,
    store_tile,
)

__all__ = ["fused_branch_input", "fused_branch_input_backward"]


@triton.jit
def _branch_input_fwd_kernel(
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
    tok, d, dmask, kk, kmask, acc = mix_forward(rows_ptr, h_ptr, D, N, K, BK, BLOCK_D, STATIC)
    store_tile(out_ptr + tok * (K * D), kk, kmask, d, dmask, D, acc)


@triton.jit
def _branch_input_bwd_kernel(
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
    D_ROWS: tl.constexpr,
):
    """dX += H_pre^T dh0 (unless D_ROWS is NO_D_ROWS); dH_pre = dh0 X^T as partial sums
    [T, D blocks, K, N]."""
    mix_backward(rows_ptr, h_ptr, g_ptr, d_rows_ptr, d_h_ptr, D, N, K, BK, BLOCK_D, STATIC, D_ROWS)


def _check_shapes(rows: Tensor, h_pre: Tensor) -> None:
    matches = h_pre.shape[-1] == rows.shape[-2] and (
        h_pre.dim() == 2 or h_pre.shape[:-2] == rows.shape[:-2]
    )
    if not matches:
        raise ValueError(
            f"h_pre {tuple(h_pre.shape)} does not match rows {tuple(rows.shape)}: it must be "
            f"[..., k, {rows.shape[-2]}] with the rows' leading dimensions, or [k, "
            f"{rows.shape[-2]}]"
        )


def fused_branch_input(rows: Tensor, h_pre: Tensor) -> Tensor:
    """h0 = H_pre X: rows X [..., N, D], h_pre [..., k, N] or static [k, N] -> [..., k*D]."""
    check(rows, h_pre)
    _check_shapes(rows, h_pre)
    lead, (num_rows, row_size) = rows.shape[:-2], rows.shape[-2:]
    k = h_pre.shape[-2]
    x = rows.reshape(-1, num_rows, row_size).contiguous()
    out = torch.empty(x.shape[0], k * row_size, device=rows.device, dtype=rows.dtype)
    block = block_d(row_size, next_pow2(k))
    grid = (x.shape[0], triton.cdiv(row_size, block))
    if x.shape[0]:
        _branch_input_fwd_kernel[grid](
            x, h_pre.contiguous(), out, row_size,
            N=num_rows, K=k, BK=next_pow2(k), BLOCK_D=block, STATIC=h_pre.dim() == 2,
        )  # fmt: skip
    return out.view(*lead, k * row_size)


def fused_branch_input_backward(
    rows: Tensor, h_pre: Tensor, grad: Tensor, grad_rows: Tensor | None = None
) -> Tensor:
    """dH_pre = dh0 X^T (fp32, h_pre's shape: summed over tokens when static) for the gradient
    ``grad`` of h0 [..., k*D]; adds dX = H_pre^T dh0 to ``grad_rows`` in place when given (a
    contiguous fp32 tensor shaped like ``rows``)."""
    check(rows, h_pre, grad, grad_rows)
    _check_shapes(rows, h_pre)
    num_rows, row_size = rows.shape[-2:]
    k = h_pre.shape[-2]
    x = rows.reshape(-1, num_rows, row_size).contiguous()
    num_tokens = x.shape[0]
    if grad_rows is not None and (
        grad_rows.dtype != torch.float32 or grad_rows.shape != rows.shape
    ):
        raise ValueError(
            f"grad_rows must be fp32 and shaped like rows {tuple(rows.shape)}, got "
            f"{grad_rows.dtype} {tuple(grad_rows.shape)}"
        )
    block = block_d(row_size, next_pow2(k))
    grid = (num_tokens, triton.cdiv(row_size, block))
    d_h = torch.zeros(num_tokens, grid[1], k, num_rows, device=x.device, dtype=torch.float32)
    static = h_pre.dim() == 2
    if num_tokens:
        _branch_input_bwd_kernel[grid](
            x, h_pre.contiguous(), grad.reshape(num_tokens, k * row_size).contiguous(),
            d_h if grad_rows is None else grad_rows.view(num_tokens, num_rows, row_size),
            d_h, row_size,
            N=num_rows, K=k, BK=next_pow2(k), BLOCK_D=block, STATIC=static,
            D_ROWS=NO_D_ROWS if grad_rows is None else ADD_D_ROWS,
        )  # fmt: skip
    d_h = d_h.sum(dim=(0, 1)) if static else d_h.sum(dim=1)
    return d_h.view(h_pre.shape)
