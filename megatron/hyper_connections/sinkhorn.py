"""Sinkhorn-Knopp projection onto doubly stochastic matrices (mHC paper, eq. 9).

Given logits T of shape [..., n, n], returns H_res = Sinkhorn(T) exactly as the paper: start
from M0 = exp(T) and alternately normalise columns and rows, ``num_iters`` times, rows last.
Ending with the rows makes every row sum to 1 to rounding (forward gain exactly 1); the column
sums converge with the iterations. Gradients flow through every iteration: detaching them
would leave the H_res parameters without gradient.
"""

import torch
from torch import Tensor

__all__ = ["sinkhorn_knopp"]


def sinkhorn_knopp(logits: Tensor, num_iters: int = 20, log_domain: bool = False) -> Tensor:
    """Project ``logits`` [..., n, n] onto the Birkhoff polytope.

    Args:
        logits: unconstrained scores T; H_res[i, j] weights source stream j into stream i.
        num_iters: column-then-row normalisation rounds (>= 1).
        log_domain: alternate log-sum-exp subtractions instead of divisions. Slower, but exact
            for logits of any magnitude (tested up to 1e4), where the exp domain underflows.
    """
    if num_iters < 1:
        raise ValueError(f"sinkhorn num_iters must be >= 1, got {num_iters}")
    # M0 = exp(T) as the paper, computed as exp(T - colmax) against overflow: the first column
    # normalisation divides each column by its sum, which absorbs a per-column factor exactly,
    # so every iteration count gives the paper's matrix. (A per-row shift would not cancel.)
    # The result does not depend on the shift, so no gradient flows through it.
    log_m = logits - logits.detach().amax(dim=-2, keepdim=True)
    if log_domain:
        for _ in range(num_iters):
            log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)
            log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)
        return log_m.exp()

    m = log_m.exp()  # finite: each column's largest entry is exactly 1
    # A column (or row) can only sum to zero once exp() has underflowed for every entry of
    # it; the floor turns that 0/0 into 0 instead of NaN and never binds otherwise.
    tiny = torch.finfo(m.dtype).tiny
    for _ in range(num_iters):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(tiny)
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return m
