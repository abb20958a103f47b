"""The dynamic projection: the one step of the coefficient computation that reads the state.

Both HC and mHC compute their dynamic coefficients from RMS-normalised vectors v of the state
(HC: each row x_j, D values; mHC: the flattened token, N*D values) times a weight W. Since
norm(v) W = (v W) / RMS(v), the projection is split into the product and the per-vector
factor, which are all the rest of the computation needs:

    proj = v W  [..., R, M],    inv_rms = 1 / sqrt(mean(v^2) + eps)  [..., R, 1]

Everything after this step works on M numbers per vector (M = k + N + 1 for HC, n^2 + 2n per
proposal for mHC), so the memory-lean backward keeps ``Projection`` (a few dozen numbers per
token) instead of recomputing it from the n*C state, and writes the state's gradient by hand
(``rms_projection_backward``) in two large ops.
"""

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Projection", "rms_projection", "rms_projection_backward"]


class Projection(NamedTuple):
    proj: Tensor
    """v W, [..., R, M]."""
    inv_rms: Tensor
    """1 / RMS(v), [..., R, 1]."""


def rms_projection(inputs: Tensor, weight: Tensor, eps: float) -> Projection:
    """``Projection`` of the vectors ``inputs`` [..., R, K] with ``weight`` [K, M]."""
    # vector_norm reduces without materialising v^2 (a full copy of the state).
    norm = torch.linalg.vector_norm(inputs, dim=-1, keepdim=True)
    inv_rms = torch.rsqrt(norm.square() / inputs.shape[-1] + eps)
    return Projection(torch.matmul(inputs, weight), inv_rms)


def rms_projection_backward(
    inputs: Tensor, weight: Tensor, projection: Projection, grad: Projection
) -> tuple[Tensor, Tensor]:
    """Gradients of ``rms_projection`` for ``inputs`` and ``weight``.

    d inputs = d proj W^T - (d inv_rms inv_rms^3 / K) v,   d W = v^T d proj (over all vectors).
    """
    # A contiguous W^T: the skinny matmul is several times slower on a transposed view.
    grad_inputs = torch.matmul(grad.proj, weight.transpose(0, 1).contiguous())
    scale = grad.inv_rms * projection.inv_rms.pow(3) / -inputs.shape[-1]
    grad_inputs.addcmul_(inputs, scale)
    grad_weight = torch.matmul(inputs.flatten(0, -2).transpose(0, 1), grad.proj.flatten(0, -2))
    return grad_inputs, grad_weight
