"""Sinkhorn-Knopp projection onto doubly stochastic matrices (mHC paper, eq. 9).

Given logits T of shape [..., n, n], returns H_res = Sinkhorn(T) exactly as the paper: start
from M0 = exp(T) and alternately normalise columns and rows, ``num_iters`` times, rows last.
Ending with the rows makes every row sum to 1 to rounding (forward gain exactly 1); the column
sums converge with the iterations. Gradients flow through every iteration: detaching them
would leave the H_res parameters without gradient.

Cost. The matrices are tiny (n x n per token) and the iterations many, so the work is laid
out matrices first and tokens last, ``[..., n, n, B]``: every normalisation is then one long
vectorised loop over the tokens rather than B loops of length n (4x faster on a CPU). The
exp domain is one autograd function whose backward is written by hand: 2 ops per
normalisation instead of autograd's ~12, from the iterates it keeps (transient in the lean
backward, which rebuilds the coefficients; see ``autograd``). The log domain is one
``log_softmax`` per normalisation, whose own backward is one op.
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["sinkhorn_knopp", "sinkhorn_knopp_tokens_last"]

COLUMNS, ROWS = -3, -2
"""The axes summed by a column and by a row normalisation of matrices laid out [..., n, n, B]
(H_res[i, j] at [..., i, j, b]): a column normalisation sums over the rows i."""


def sinkhorn_knopp(logits: Tensor, num_iters: int = 20, log_domain: bool = False) -> Tensor:
    """Project ``logits`` [..., n, n] onto the Birkhoff polytope.

    Args:
        logits: unconstrained scores T; H_res[i, j] weights source stream j into stream i.
        num_iters: column-then-row normalisation rounds (>= 1).
        log_domain: alternate log-softmaxes instead of divisions: exact for logits of any
            magnitude (tested up to 1e4), where the exp domain underflows.
    """
    *batch, n, _ = logits.shape
    tokens_last = logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()
    h_res = sinkhorn_knopp_tokens_last(tokens_last, num_iters, log_domain)
    return h_res.permute(2, 0, 1).reshape(*batch, n, n)


def sinkhorn_knopp_tokens_last(
    logits: Tensor, num_iters: int = 20, log_domain: bool = False
) -> Tensor:
    """``sinkhorn_knopp`` of matrices laid out [..., n, n, B] (H_res[i, j] of matrix b at
    [..., i, j, b]); returns the same layout."""
    if num_iters < 1:
        raise ValueError(f"sinkhorn num_iters must be >= 1, got {num_iters}")
    if log_domain:
        # log_softmax is invariant to a shift along its axis, so it starts from T itself.
        log_m = logits
        for _ in range(num_iters):
            log_m = torch.log_softmax(log_m, dim=COLUMNS)
            log_m = torch.log_softmax(log_m, dim=ROWS)
        return log_m.exp()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ExpDomainSinkhorn.apply(logits, num_iters)
    return _exp_domain(logits, num_iters, iterates=None)


def _exp_domain(logits: Tensor, num_iters: int, iterates: list[Tensor] | None) -> Tensor:
    """The exp-domain iterations; appends every normalised matrix to ``iterates`` when given
    (else normalises in place)."""
    # M0 = exp(T) as the paper, normalised over its columns: the softmax over each column,
    # which computes exp(T - column max) against overflow; the division by the column sum
    # absorbs that per-column factor exactly, so every iteration count gives the paper's
    # matrix. (A per-row shift would not cancel.)
    m = torch.softmax(logits, dim=COLUMNS)
    # A row can only sum to zero once exp() has underflowed for every entry of it; the floor
    # turns that 0/0 into 0 instead of NaN and never binds otherwise. Columns need no floor:
    # after a row normalisation every column holds an entry >= 1/n^2 (its largest entry was
    # >= 1/n after the column normalisation, and a row sums to at most n).
    tiny = torch.finfo(m.dtype).tiny
    for iteration in range(num_iters):
        if iteration:
            sums = m.sum(dim=COLUMNS, keepdim=True)
            m = m.div_(sums) if iterates is None else m / sums
        if iterates is not None:
            iterates.append(m)
        sums = m.sum(dim=ROWS, keepdim=True).clamp_min_(tiny)
        m = m.div_(sums) if iterates is None else m / sums
        if iterates is not None:
            iterates.append(m)
    return m


class _ExpDomainSinkhorn(torch.autograd.Function):
    """Exp-domain Sinkhorn of [..., n, n, B] logits with the backward of its unrolled
    iterations, in the log-derivative g = S * dL/dS of each iterate S: a normalisation
    S' = S / sum(S) along an axis maps g' to g = g' - S' sum(g') (summed along that axis), and
    g of the first iterate, the column softmax of T, is dL/dT. Keeps the 2 * num_iters
    normalised matrices for it (n^2 numbers per token each)."""

    @staticmethod
    def forward(ctx, logits: Tensor, num_iters: int) -> Tensor:
        iterates: list[Tensor] = []
        h_res = _exp_domain(logits, num_iters, iterates)
        ctx.save_for_backward(*iterates)
        return h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        iterates = ctx.saved_tensors
        g = iterates[-1] * grad  # in the iterates' layout (grad may be a permuted view)
        for step in range(len(iterates) - 1, -1, -1):  # rows at odd steps, columns at even
            axis = ROWS if step % 2 else COLUMNS
            g = g.addcmul_(iterates[step], g.sum(dim=axis, keepdim=True), value=-1.0)
        return g, None
