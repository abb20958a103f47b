"""The dynamic projection: the one step of the coefficient computation that reads the state.

Both HC and mHC compute their dynamic coefficients from RMS-normalised vectors v of the state
(HC: each row x_j, D values; mHC: the flattened token, N*D values) times a weight W. Since
norm(v) W = (v W) / RMS(v), the projection is split into the product and the per-vector
factor, which are all the rest of the computation needs:

    proj = v W  [..., R, M],    inv_rms = 1 / sqrt(mean(v^2) + eps)  [..., R, 1]

Everything after this step works on M numbers per vector (M = k + N + 1 for HC, n^2 + 2n per
proposal for mHC): the memory-lean backward rebuilds ``Projection`` from X (one pass), runs
autograd only on the small graph after it, and writes the state's gradient by hand
(``rms_projection_backward``) in two large in-place ops.
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
    """``Projection`` of the vectors ``inputs`` [..., R, K] with ``weight`` [K, M], computed in
    the weight's dtype."""
    inputs = inputs.to(weight.dtype)
    # vector_norm reduces without materialising v^2 (a full copy of the state).
    norm = torch.linalg.vector_norm(inputs, dim=-1, keepdim=True)
    inv_rms = torch.rsqrt(norm.square() / inputs.shape[-1] + eps)
    return Projection(torch.matmul(inputs, weight), inv_rms)


def rms_projection_backward(
    inputs: Tensor,
    weight: Tensor,
    projection: Projection,
    grad: Projection,
    grad_inputs: Tensor | None = None,
) -> Tensor:
    """Gradient of ``rms_projection`` for ``weight``; adds the one for ``inputs`` to
    ``grad_inputs`` in place when given (a contiguous tensor shaped like ``inputs``):

        d inputs += d proj W^T - (d inv_rms inv_rms^3 / K) v,   d W = v^T d proj.

    Computed in the weight's dtype, which ``grad_inputs`` has.
    """
    inputs = inputs.to(weight.dtype)
    proj_grad = grad.proj.reshape(-1, grad.proj.shape[-1])
    if grad_inputs is not None:
        # A contiguous W^T: the skinny matmul can be several times slower on a view.
        grad_inputs.view(-1, inputs.shape[-1]).addmm_(proj_grad, weight.t().contiguous())
        scale = grad.inv_rms * projection.inv_rms.pow(3) / -inputs.shape[-1]
        grad_inputs.addcmul_(inputs, scale)
    # (d proj^T v)^T: the long token dimension is the contraction of a row-major product.
    return torch.matmul(proj_grad.t(), inputs.reshape(-1, inputs.shape[-1])).t()
