"""Fused RMS projection: proj = v W and inv_rms = 1 / sqrt(mean(v^2) + eps) in one pass over v.

The dynamic projection of (m)HC (``projection``): RMSNorm(v) W = (v W) * inv_rms, so the norm
is a per-vector factor that the coefficients apply later. v is a state row (HC) or the whole
flattened token (mHC), [..., K], read once in its own dtype; W [K, M] is skinny (M = k + N + 1
for HC, n^2 + 2n per proposal for mHC). Products are fp32 (TF32 only where torch allows it for
fp32 matmuls).

Drop-in replacements of ``projection.rms_projection`` and ``rms_projection_backward``:

- ``fused_rms_projection``: the ``Projection`` (proj and inv_rms, fp32).
- ``fused_rms_projection_backward``: adds dv = dproj W^T - (d inv_rms inv_rms^3 / K) v to a
  given gradient in place and returns dW = v^T dproj.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..projection import Projection
from .availability import check
from .triton_utils import load_tile, next_pow2, store_tile

__all__ = ["fused_rms_projection", "fused_rms_projection_backward"]


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
        x = load_tile(x_ptr, tok, tmask, kk, kmask, K)
        w = load_tile(phi_ptr, kk, kmask, cols, cmask, M)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        sum_sq += tl.sum(x * x, axis=1)
    store_tile(proj_ptr, tok, tmask, cols, cmask, M, acc)
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
    """dx += dproj phi^T - (d inv_rms inv_rms^3 / K) x, one [BLOCK_T, BLOCK_K] tile."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tmask = tok < T
    kmask = kk < K
    acc = load_tile(dx_ptr, tok, tmask, kk, kmask, K)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        cmask = cols < M
        g = load_tile(g_proj_ptr, tok, tmask, cols, cmask, M)
        w = load_tile(phi_ptr, kk, kmask, cols, cmask, M)
        acc = tl.dot(g, tl.trans(w), acc, input_precision=PRECISION)
    r = tl.load(inv_rms_ptr + tok, mask=tmask, other=0.0)
    g_r = tl.load(g_inv_ptr + tok, mask=tmask, other=0.0).to(tl.float32)
    c = -g_r * r * r * r / K
    acc += c[:, None] * load_tile(x_ptr, tok, tmask, kk, kmask, K)
    store_tile(dx_ptr, tok, tmask, kk, kmask, K, acc)


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
        x = load_tile(x_ptr, tok, tmask, kk, kmask, K)
        g = load_tile(g_proj_ptr, tok, tmask, cols, cmask, M)
        acc = tl.dot(tl.trans(x), g, acc, input_precision=PRECISION)
    store_tile(d_phi_ptr + split.to(tl.int64) * K * M, kk, kmask, cols, cmask, M, acc)


def _configs(num_cols: int) -> tuple[dict, dict, dict]:
    """Block sizes of the forward, dx and dphi kernels. tl.dot needs every block dimension
    >= 16; these keep all three under 255 registers without spills on sm_90 (checked with
    ptxas). fp32 operands use full-precision FMA unless torch allows TF32 for fp32 matmuls."""
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    block_m = max(16, min(next_pow2(num_cols), 128))
    fwd = {"BLOCK_T": 16, "BLOCK_K": 64, "BLOCK_M": block_m, "PRECISION": precision}
    # dx loops over the columns: small chunks keep the phi tile small
    dx = {"BLOCK_T": 32, "BLOCK_K": 64, "BLOCK_M": min(block_m, 32), "PRECISION": precision}
    dw = {"BLOCK_T": 32, "BLOCK_K": 64, "BLOCK_M": block_m, "PRECISION": precision}
    return fwd, dx, dw


def _check_shapes(inputs: Tensor, weight: Tensor) -> None:
    if weight.dim() != 2 or weight.shape[0] != inputs.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match inputs {tuple(inputs.shape)}: "
            f"it must be [{inputs.shape[-1]}, M]"
        )


def fused_rms_projection(inputs: Tensor, weight: Tensor, eps: float) -> Projection:
    """proj = inputs W [..., M] and inv_rms [..., 1] (both fp32) for inputs [..., K] in fp32,
    bf16 or fp16 and weight W [K, M]."""
    check(inputs, weight)
    _check_shapes(inputs, weight)
    lead, size = inputs.shape[:-1], inputs.shape[-1]
    num_cols = weight.shape[1]
    x = inputs.reshape(-1, size).contiguous()
    num_tokens = x.shape[0]
    kw = {"device": inputs.device, "dtype": torch.float32}
    proj = torch.empty(num_tokens, num_cols, **kw)
    inv_rms = torch.empty(num_tokens, **kw)
    cfg, _, _ = _configs(num_cols)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_T"]), triton.cdiv(num_cols, cfg["BLOCK_M"]))
    if num_tokens:
        _rms_proj_fwd_kernel[grid](
            x, weight.contiguous(), proj, inv_rms, num_tokens, size, num_cols, float(eps), **cfg
        )
    return Projection(proj.view(*lead, num_cols), inv_rms.view(*lead, 1))


def fused_rms_projection_backward(
    inputs: Tensor, weight: Tensor, projection: Projection, grad: Projection, grad_in: Tensor | None
) -> Tensor:
    """dW = inputs^T dproj (fp32, [K, M]) for the gradient ``grad`` of ``projection`` (what
    ``fused_rms_projection`` returned for ``inputs`` and ``weight``); adds d inputs to
    ``grad_in`` in place unless it is None (else a contiguous fp32 tensor shaped like
    ``inputs``)."""
    check(inputs, weight, *projection, *grad)
    _check_shapes(inputs, weight)
    size, num_cols = weight.shape
    x = inputs.reshape(-1, size).contiguous()
    num_tokens = x.shape[0]
    g_proj = grad.proj.reshape(num_tokens, num_cols).contiguous()
    _, cfg_dx, cfg_dw = _configs(num_cols)
    if grad_in is not None and num_tokens:
        if grad_in.dtype != torch.float32 or grad_in.shape != inputs.shape:
            raise ValueError(
                f"grad_in must be fp32 and shaped like inputs {tuple(inputs.shape)}, got "
                f"{grad_in.dtype} {tuple(grad_in.shape)}"
            )
        grid = (triton.cdiv(num_tokens, cfg_dx["BLOCK_T"]), triton.cdiv(size, cfg_dx["BLOCK_K"]))
        _rms_proj_dx_kernel[grid](
            x, weight.contiguous(), projection.inv_rms.reshape(num_tokens).contiguous(), g_proj,
            grad.inv_rms.reshape(num_tokens).contiguous(), grad_in.view(num_tokens, size),
            num_tokens, size, num_cols, **cfg_dx,
        )  # fmt: skip
    # dphi reduces over all tokens: split them so that enough programs run at once
    token_blocks = triton.cdiv(num_tokens, cfg_dw["BLOCK_T"])
    tiles = triton.cdiv(size, cfg_dw["BLOCK_K"]) * triton.cdiv(num_cols, cfg_dw["BLOCK_M"])
    splits = max(1, min(token_blocks, 512 // tiles))
    per_split = triton.cdiv(token_blocks, splits)
    splits = triton.cdiv(token_blocks, per_split) if token_blocks else 1
    d_phi = torch.zeros(splits, size, num_cols, device=x.device, dtype=torch.float32)
    grid = (
        triton.cdiv(size, cfg_dw["BLOCK_K"]),
        triton.cdiv(num_cols, cfg_dw["BLOCK_M"]),
        splits,
    )
    if num_tokens:
        _rms_proj_dw_kernel[grid](x, g_proj, d_phi, num_tokens, size, num_cols, per_split, **cfg_dw)
    return d_phi.sum(0)
