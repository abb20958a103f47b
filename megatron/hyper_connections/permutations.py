"""Exactly doubly stochastic H_res as a convex combination of permutation matrices (mHC-lite,
Yang and Gao, arXiv 2601.05732).

By the Birkhoff-von Neumann theorem every doubly stochastic n x n matrix is a convex
combination of the n! permutation matrices P_k. With logits u [..., n!]:

    H_res = sum_k softmax(u)_k P_k

is doubly stochastic at any parameter values and in any precision (each P_k has rows and
columns summing to 1, and the weights sum to 1), with no iterations: one softmax and one
[n!] x [n*n] matmul. The cost is n! logits per token, so n is limited to ``MAX_STREAMS``.
"""

import itertools
import math

import torch
from torch import Tensor

__all__ = ["MAX_STREAMS", "num_permutations", "permutation_matrices", "permutation_mixture"]

MAX_STREAMS = 6
"""The largest n served: n! logits per token and sublayer (720 at n = 6, 5040 at n = 7)."""


def num_permutations(n: int) -> int:
    """n!, the number of H_res logits per token for n streams."""
    return math.factorial(n)


_PERMUTATION_MATRICES: dict[tuple[int, torch.dtype, torch.device | None], Tensor] = {}
"""Built once per device (a copy to a GPU every call would wait for the host); a dict, not
functools.cache, which torch.compile warns about."""


def permutation_matrices(n: int, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    """The n! permutation matrices [n!, n, n] in lexicographic order (the identity first):
    P_k[i, j] = 1 where j = perm_k(i), so (P_k X)[i] = X[perm_k(i)]."""
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(
            f"H_res as a mixture of permutations takes 1 to {MAX_STREAMS} streams "
            f"(n! logits per token), got n={n}"
        )
    key = (n, dtype, device)
    if key not in _PERMUTATION_MATRICES:
        rows = torch.tensor(list(itertools.permutations(range(n))))  # [n!, n], identity first
        one_hot = torch.nn.functional.one_hot(rows, n)  # P_k[i, perm_k(i)] = 1
        _PERMUTATION_MATRICES[key] = one_hot.to(dtype=dtype, device=device)
    return _PERMUTATION_MATRICES[key]


def permutation_mixture(logits: Tensor, n: int) -> Tensor:
    """H_res = sum_k softmax(logits)_k P_k: logits [..., n!] -> [..., n, n]."""
    weights = torch.softmax(logits, dim=-1)
    basis = permutation_matrices(n, weights.dtype, weights.device).flatten(-2)  # [n!, n*n]
    return (weights @ basis).unflatten(-1, (n, n))
