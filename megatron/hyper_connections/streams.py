"""The n-stream residual state and the two connections that read and write it.

Layout: one token's state is a matrix X of N rows of D values, stored flat as the last
dimension of the activation, ``[..., N*D]`` (stream-major), and viewed as ``[..., N, D]``.
With Megatron's ``[s, b, h]`` activations and batch-first models alike, every operation is per
token, so nothing is ever transposed. Hyper-Connections use N = n streams of D = C values;
Frac-Connections use N = m fractions of D = C / m values of one stream.

Convention (the mHC paper's): H_res[i, j] weights source row j into destination row i.
- ``branch_input`` (the width connection's math):  h0 = H_pre X,  H_pre [..., k, N] -> [..., k*D]
- ``merge_branch_output`` (the depth connection's):  X' = H_res X + H_post^T y,  H_post [..., N],
  y [..., k*D]
k = 1 for Hyper-Connections (the branch reads one C-vector); k = N = m for Frac-Connections
(the branch input is the m mixed fractions concatenated back to C values).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BranchOutput",
    "Mixing",
    "branch_input",
    "coefficient_dtype",
    "expand_streams",
    "merge_branch_output",
    "per_token_matmul",
    "reduce_streams",
]


class Mixing(NamedTuple):
    """The coefficients of one sublayer, per token or (static variants) shared by all tokens."""

    h_pre: Tensor
    """[..., k, N]: rows of the branch input as combinations of the state's rows."""
    h_post: Tensor
    """[..., N]: weight of the branch output added to each row of the state."""
    h_res: Tensor
    """[..., N, N]: residual mixing, destination rows."""


class BranchOutput(NamedTuple):
    """A branch's output as the depth connection receives it: y = dropout(out + bias)."""

    out: Tensor
    """[..., k*D]."""
    bias: Tensor | None
    """The branch's output bias [k*D], or None."""
    hidden_dropout: float = 0.0
    """The probability of dropping an element of out + bias now (0 outside training)."""
    seed: int = 0
    """The seed of that dropout's mask where the mask is regenerated from it (fused kernels)."""


def coefficient_dtype(state: Tensor) -> torch.dtype:
    """The coefficients' precision: fp32 for fp32, bf16 and fp16 states (the mHC paper's
    rule), fp64 for fp64 ones (exact tests)."""
    return torch.float64 if state.dtype == torch.float64 else torch.float32


def per_token_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for the small per-token matrices of the connections: ``torch.bmm`` where both are
    one batch of matrices [T, ., .] (the lean path; one op instead of matmul's five),
    ``torch.matmul`` with its broadcasting otherwise."""
    if a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(_unit_stride(a), _unit_stride(b))
    return torch.matmul(a, b)


def _unit_stride(matrices: Tensor) -> Tensor:
    """``matrices`` if rows or columns are contiguous, as BLAS takes them, else a contiguous
    copy: a batch of tiny matrices without either (a column slice of the coefficients, or
    tokens laid out last) makes bmm ten times slower than the copy."""
    if matrices.stride(-1) == 1 or matrices.stride(-2) == 1:
        return matrices
    return matrices.contiguous()


def expand_streams(x: Tensor, num_streams: int) -> Tensor:
    """[..., C] -> [..., n*C]: copy the decoder input into all n streams."""
    if num_streams == 1:
        return x
    return x.repeat(*(1,) * (x.dim() - 1), num_streams)


def reduce_streams(state: Tensor, num_streams: int) -> Tensor:
    """[..., n*C] -> [..., C]: the mean over streams.

    The mean (not the HC paper's sum) keeps a model at initialisation exactly equal to its
    residual counterpart: a sum would scale the final norm's input by n and so differ by the
    norm's eps.
    """
    if num_streams == 1:
        return state
    # A mean over the stream axis as laid out (einops' reduce permutes it last first, which
    # makes its backward several times slower).
    return state.unflatten(-1, (num_streams, -1)).mean(dim=-2)


def branch_input(state: Tensor, h_pre: Tensor) -> Tensor:
    """h0 = H_pre X, flattened: state [..., N, D], h_pre [..., k, N] -> [..., k*D]; computed in
    the coefficients' dtype, returned in the state's."""
    return per_token_matmul(h_pre, state.to(h_pre.dtype)).flatten(-2).to(state.dtype)


def merge_branch_output(
    state: Tensor,
    branch_output: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """X' = H_res X + H_post^T y, flattened to [..., N*D].

    Args:
        state: X, [..., N, D].
        branch_output: y, [..., k*D] with k = 1 (one vector for every row) or k = N.
        h_post: [..., N]. h_res: [..., N, N].
        dropout: drops elements of each row's share H_post[i] y independently, so the rows
            receive different noisy copies of the branch output.
    """
    row_size = state.shape[-1]
    branch_rows = branch_output.unflatten(-1, (-1, row_size))
    mixed = per_token_matmul(h_res, state)
    if dropout > 0.0 and training:
        contribution = F.dropout(h_post.unsqueeze(-1) * branch_rows, p=dropout, training=True)
        return (mixed + contribution).flatten(-2)
    # In place on the fresh product: no [..., N, D] temporary for H_post^T y.
    return mixed.addcmul_(h_post.unsqueeze(-1), branch_rows).flatten(-2)
