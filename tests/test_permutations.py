"""H_res as a mixture of permutation matrices (mHC-lite): exactly doubly stochastic."""

import itertools
import math
import re

import pytest
import torch

from megatron.hyper_connections.permutations import (
    MAX_STREAMS,
    permutation_matrices,
    permutation_mixture,
)


@pytest.mark.parametrize("n", range(1, MAX_STREAMS + 1))
def test_the_basis_is_every_permutation_matrix_once_identity_first(n: int) -> None:
    basis = permutation_matrices(n, torch.float64, None)
    assert basis.shape == (math.factorial(n), n, n)
    torch.testing.assert_close(basis[0], torch.eye(n, dtype=torch.float64))
    assert ((basis == 0) | (basis == 1)).all()
    assert (basis.sum(dim=-1) == 1).all() and (basis.sum(dim=-2) == 1).all()
    assert len({tuple(p.flatten().tolist()) for p in basis}) == math.factorial(n)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_mixture_is_the_weighted_sum_of_permutations(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(5, math.factorial(n), generator=gen, dtype=torch.float64)
    weights = torch.softmax(logits, dim=-1)
    expected = torch.zeros(5, n, n, dtype=torch.float64)
    for k, perm in enumerate(itertools.permutations(range(n))):
        for i, j in enumerate(perm):
            expected[:, i, j] += weights[:, k]
    torch.testing.assert_close(permutation_mixture(logits, n), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("n", [2, 4, 6])
def test_rows_and_columns_sum_to_one_at_any_logits_in_fp32(n: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = scale * torch.randn(64, math.factorial(n), generator=gen)
    h_res = permutation_mixture(logits, n)
    assert h_res.dtype == torch.float32 and (h_res >= 0).all()
    for dim in (-1, -2):
        error = (h_res.sum(dim=dim) - 1).abs().max().item()
        assert error < 1e-6, f"sums off by {error} (dim {dim}, logits x {scale})"


def test_gradients_flow_to_every_logit() -> None:
    logits = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: permutation_mixture(u, 4), (logits,))


@pytest.mark.parametrize("n", [0, MAX_STREAMS + 1])
def test_stream_counts_beyond_the_limit_are_refused(n: int) -> None:
    message = (
        f"H_res as a mixture of permutations takes 1 to {MAX_STREAMS} streams (n! logits per "
        f"token), got n={n}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        permutation_matrices(n, torch.float32, None)
