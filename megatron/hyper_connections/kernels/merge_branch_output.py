"""Fused depth connection merged with the bias-dropout-add: X' = H_res X + H_post^T y with
y = dropout(out + bias), and its backward.

X [..., N, D] and the branch output out [..., k*D] (k = 1: the same y for every row; k = N:
row i receives y's i-th D-slice, Frac-Connections) in fp32, bf16 or fp16; H_post [..., N] and
H_res [..., N, N] per token or [N] and [N, N] shared by all tokens; fp32 arithmetic, X' in X's
dtype. One program per (token, D block) tile reads X and y once (n + 1 units) and writes X'
(n units). The dropout mask comes from Philox ``tl.rand(seed, element index of y)`` and is
regenerated in backward, so it is never stored: the same seed gives the same mask.

- ``fused_merge_branch_output``: X', as ``streams.merge_branch_output`` of dropout(out + bias)
  for a ``streams.BranchOutput``.
- ``fused_merge_branch_output_backward``: dX = H_res^T dX', dy through the mask (and its sum
  over tokens, dbias), dH_post[i] = <dX'[i], y_i> and dH_res = dX' X^T.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..streams import BranchOutput
from .availability import check
from .triton_utils import STORE_D_ROWS, block_d, mix_backward, mix_forward, next_pow2, store_tile

__all__ = ["fused_merge_branch_output", "fused_merge_branch_output_backward"]


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
):
    """y_i = dropout(out + bias) as row i receives it, [BN, BLOCK_D] (k = N) or [1, BLOCK_D]
    (shared by all rows), and the keep mask (used only with dropout)."""
    if K_IS_N:
        omask = nmask[:, None] & dmask[None, :]
        e = n[:, None] * D + d[None, :]  # element of y = [k*D]
        y = tl.load(out_ptr + tok * (N * D) + e, mask=omask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias_ptr + e, mask=omask, other=0.0).to(tl.float32)
        counter = tok * (N * D) + e
    else:
        e = d[None, :]
        y = tl.load(out_ptr + tok * D + e, mask=dmask[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias_ptr + e, mask=dmask[None, :], other=0.0).to(tl.float32)
        counter = tok * D + e
    if DROPOUT:
        # Philox counters: the element of y, int64 so large activations never repeat one.
        keep = tl.rand(seed, counter) >= p_drop
        y = tl.where(keep, y * scale, 0.0)
    else:
        keep = y == y
    return y, keep


@triton.jit
def _merge_fwd_kernel(
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
):
    tok, d, dmask, n, nmask, acc = mix_forward(rows_ptr, res_ptr, D, N, N, BN, BLOCK_D, STATIC)
    y, _keep = _branch_rows(
        out_ptr, bias_ptr, tok, d, dmask, n, nmask, D, p_drop, scale, seed,
        N, K_IS_N, HAS_BIAS, DROPOUT,
    )  # fmt: skip
    post_base = 0 if STATIC else tok * N
    h_post = tl.load(post_ptr + post_base + n, mask=nmask, other=0.0).to(tl.float32)
    acc += h_post[:, None] * y
    store_tile(new_ptr + tok * (N * D), n, nmask, d, dmask, D, acc)


@triton.jit
def _merge_bwd_kernel(
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
):
    """dX = H_res^T dX', dy = H_post-weighted dX' through the regenerated dropout mask;
    dH_res = dX' X^T and dH_post = <dX'[i], y_i> as partials per (token, D block)."""
    tok, part, d, dmask, n, nmask, g = mix_backward(
        rows_ptr, res_ptr, g_ptr, d_rows_ptr, d_res_ptr, D, N, N, BN, BLOCK_D, STATIC,
        STORE_D_ROWS,
    )  # fmt: skip
    y, keep = _branch_rows(
        out_ptr, bias_ptr, tok, d, dmask, n, nmask, D, p_drop, scale, seed,
        N, K_IS_N, HAS_BIAS, DROPOUT,
    )  # fmt: skip
    tl.store(d_post_ptr + part * N + n, tl.sum(g * y, axis=1), mask=nmask)
    post_base = 0 if STATIC else tok * N
    h_post = tl.load(post_ptr + post_base + n, mask=nmask, other=0.0).to(tl.float32)
    dy = h_post[:, None] * g
    if DROPOUT:
        dy = tl.where(keep, dy * scale, 0.0)
    if K_IS_N:
        store_tile(d_out_ptr + tok * (N * D), n, nmask, d, dmask, D, dy)
    else:  # every row received the same y
        tl.store(
            d_out_ptr + tok * D + d,
            tl.sum(dy, axis=0).to(d_out_ptr.dtype.element_ty),
            mask=dmask,
        )


class _Merge:
    """The flattened tensors and launch settings shared by the forward and the backward."""

    def __init__(self, rows: Tensor, branch: BranchOutput, h_post: Tensor, h_res: Tensor):
        out, bias, hidden_dropout, seed = branch
        check(rows, out, bias, h_post, h_res)
        num_rows, row_size = rows.shape[-2:]
        if out.shape[:-1] != rows.shape[:-2] or out.shape[-1] not in (
            row_size,
            num_rows * row_size,
        ):
            raise ValueError(
                f"out {tuple(out.shape)} does not match rows {tuple(rows.shape)}: it must be "
                f"[..., {row_size}] or [..., {num_rows * row_size}]"
            )
        if bias is not None and bias.shape != out.shape[-1:]:
            raise ValueError(f"bias {tuple(bias.shape)} does not match out {tuple(out.shape)}")
        static = h_res.dim() == 2
        lead = () if static else rows.shape[:-2]
        if h_res.shape != (*lead, num_rows, num_rows) or h_post.shape != (*lead, num_rows):
            raise ValueError(
                f"h_post {tuple(h_post.shape)} / h_res {tuple(h_res.shape)} do not match rows "
                f"{tuple(rows.shape)}"
            )
        if not 0.0 <= hidden_dropout <= 1.0:
            raise ValueError(f"hidden_dropout must be in [0, 1], got {hidden_dropout}")
        self.x = rows.reshape(-1, num_rows, row_size).contiguous()
        self.y = out.reshape(self.x.shape[0], -1).contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.post, self.res = h_post.contiguous(), h_res.contiguous()
        self.p, self.seed = float(hidden_dropout), int(seed)
        self.scale = 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0  # p = 1 drops everything
        bn = next_pow2(num_rows)
        self.config = {
            "N": num_rows,
            "BN": bn,
            "BLOCK_D": block_d(row_size, bn),
            "STATIC": static,
            "K_IS_N": self.y.shape[1] != row_size,
            "HAS_BIAS": bias is not None,
            "DROPOUT": self.p > 0.0,
        }
        self.grid = (self.x.shape[0], triton.cdiv(row_size, self.config["BLOCK_D"]))

    def inputs(self) -> tuple:
        """The kernels' leading arguments: X, y, the bias (y when there is none), H_post, H_res."""
        return self.x, self.y, self.y if self.bias is None else self.bias, self.post, self.res

    def dropout(self) -> tuple:
        return self.p, self.scale, self.seed


def fused_merge_branch_output(
    rows: Tensor, branch: BranchOutput, h_post: Tensor, h_res: Tensor
) -> Tensor:
    """X' = H_res X + H_post^T dropout(out + bias), flattened to [..., N*D] in the rows' dtype.

    Args:
        rows: X, [..., N, D].
        branch: out [..., k*D] with k = 1 or k = N, the bias [k*D] or None, the dropout
            probability now (0 outside training) and the seed of its mask.
        h_post: [..., N] or static [N]. h_res: [..., N, N] or static [N, N].
    """
    merge = _Merge(rows, branch, h_post, h_res)
    new = torch.empty_like(merge.x)
    if merge.x.shape[0]:
        _merge_fwd_kernel[merge.grid](
            *merge.inputs(), new, rows.shape[-1], *merge.dropout(), **merge.config
        )
    return new.view(*rows.shape[:-2], -1)


def fused_merge_branch_output_backward(
    rows: Tensor, branch: BranchOutput, h_post: Tensor, h_res: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """The gradients of ``fused_merge_branch_output`` (same arguments) for dX' ``grad``:
    (dX fp32 [..., N, D], d out, d bias or None, dH_post and dH_res in fp32 shaped like them,
    summed over tokens when static)."""
    merge = _Merge(rows, branch, h_post, h_res)
    x, y = merge.x, merge.y
    num_tokens, num_rows, row_size = x.shape
    g = grad.reshape(num_tokens, num_rows, row_size).contiguous()
    kw = {"device": x.device, "dtype": torch.float32}
    d_rows = torch.empty(x.shape, **kw)
    d_out = torch.empty_like(y)
    d_post = torch.zeros(num_tokens, merge.grid[1], num_rows, **kw)
    d_res = torch.zeros(num_tokens, merge.grid[1], num_rows, num_rows, **kw)
    if num_tokens:
        _merge_bwd_kernel[merge.grid](
            *merge.inputs(), g, d_rows, d_out, d_post, d_res, row_size, *merge.dropout(),
            **merge.config,
        )  # fmt: skip
    reduce = (0, 1) if merge.config["STATIC"] else 1
    bias = branch.bias
    d_bias = None if bias is None else d_out.sum(0, dtype=torch.float32).to(bias.dtype)
    return (
        d_rows.view(rows.shape),
        d_out.view(branch.out.shape),
        d_bias,
        d_post.sum(reduce).view(h_post.shape),
        d_res.sum(reduce).view(h_res.shape),
    )
