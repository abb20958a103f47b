"""The pure-PyTorch math of the package against an independent reference of the papers.

``reference.py`` writes the paper equations per token with explicit loops in float64. Here the
package's modules (with random, non-init parameters) and pure functions are compared with it,
and the properties the reference doc asks for are checked: gradients, Sinkhorn, residual
equivalence at init, metrics, monitoring and configuration errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import reference as ref
import torch
from torch import Tensor

from megatron.hyper_connections.hyper_connection import HyperConnection, hc_mixing
from megatron.hyper_connections.manifold_hyper_connection import (
    ManifoldHyperConnection,
    mhc_mixing,
)
from megatron.hyper_connections.metrics import backward_gain, forward_gain, log_amax
from megatron.hyper_connections.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_tokens_last
from megatron.hyper_connections.streams import (
    branch_input,
    expand_streams,
    merge_branch_output,
    reduce_streams,
)

HIDDEN = 8
BATCH, SEQ = 2, 3
# The modules compute their coefficients in fp32 by design (reference doc, section 3.6:
# `.float()` inside `mixing`), even after `.double()`, so module outputs are compared with
# the float64 reference at fp32 precision; the pure functions do not cast and are compared
# in float64 at 1e-10 in the `*_fp64_*` tests.
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
FP64_TOL = {"rtol": 1e-10, "atol": 1e-10}

Branch = Callable[[Tensor], Tensor]

# (num_residual_streams, num_fracs, dynamic, use_tanh)
HC_VARIANTS = [
    *(pytest.param(n, 1, True, True, id=f"DHC-n{n}") for n in (1, 2, 4)),
    *(pytest.param(n, 1, True, False, id=f"DHC-notanh-n{n}") for n in (1, 2, 4)),
    *(pytest.param(n, 1, False, True, id=f"SHC-n{n}") for n in (1, 2, 4)),
    *(pytest.param(1, m, True, True, id=f"Frac-m{m}") for m in (2, 4)),
    *(pytest.param(1, m, True, False, id=f"Frac-notanh-m{m}") for m in (2, 4)),
    pytest.param(1, 4, False, True, id="Frac-static-m4"),
]


def mhc_id(n: int, proposals: int, log_domain: bool, dynamic: bool) -> str:
    return f"n{n}-P{proposals}-{'log' if log_domain else 'exp'}-{'dyn' if dynamic else 'static'}"


# (num_residual_streams, num_proposals, log_domain_sinkhorn, dynamic)
MHC_VARIANTS = [
    pytest.param(n, p, log, dyn, id=mhc_id(n, p, log, dyn))
    for n in (2, 4)
    for p in (1, 3)
    for log in (False, True)
    for dyn in (True, False)
]


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.5^2): far from the init, so no term can hide behind a 0 or 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return module


def make_branch(width: int, seed: int = 1) -> Branch:
    """A fixed per-token branch y = tanh(W h + b), usable in any dtype and leading shape."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
    bias = 0.1 * torch.randn(width, generator=gen, dtype=torch.float64)

    def branch(h: Tensor) -> Tensor:
        return torch.tanh(h @ weight.to(h.dtype).T + bias.to(h.dtype))

    return branch


def make_prenorm_branch(width: int, seed: int) -> Branch:
    """A fixed pre-norm branch y = W RMSNorm(h), as an attention or MLP sublayer would be."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=gen) / math.sqrt(width)

    def branch(h: Tensor) -> Tensor:
        normed = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-5)
        return normed @ weight.T

    return branch


def random_state(width: int, layout: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random state [b, s, width] ("bsh") or [s, b, width] ("sbh"), same tokens either way."""
    gen = torch.Generator().manual_seed(2)
    state = torch.randn(BATCH, SEQ, width, generator=gen, dtype=torch.float64).to(dtype)
    return state if layout == "bsh" else state.transpose(0, 1).contiguous()


def hc_reference(
    module: HyperConnection, state: Tensor, branch: Branch
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference sublayer with ``module``'s parameters (HC or Frac): h0, X', H_res."""
    k, N = module.num_fracs, module.num_rows
    W = module.dynamic_proj
    dyn: dict[str, Any] = {}
    if W is not None:
        # dynamic_proj = [W_m | W_r | W_b] (docstring of hc_mixing).
        dyn = {"s_a": module.scale_pre_res.item(), "s_b": module.scale_post.item()}
        names = ("W_m", "W_r", "W_b") if k == 1 else ("W_y", "W_a", "W_b")
        dyn.update(zip(names, (W[:, :k], W[:, k : k + N], W[:, k + N :]), strict=True))
    common = {"use_tanh": module.use_tanh, "eps": module.eps, **dyn}
    with torch.no_grad():
        if k == 1:
            return ref.hc_sublayer(
                state,
                N,
                branch,
                module.static_pre,
                module.static_res,
                module.static_post,
                **common,
            )
        return ref.frac_sublayer(
            state,
            k,
            branch,
            module.static_pre,
            module.static_res,
            module.static_post,
            **common,
        )


def mhc_reference(
    module: ManifoldHyperConnection, state: Tensor, branch: Branch
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference mHC sublayer with ``module``'s parameters: h0, X', H_res (with their
    graph on the parameters)."""
    return ref.mhc_sublayer(
        state,
        module.num_residual_streams,
        branch,
        module.bias,
        module.gates,
        module.dynamic_proj,
        sinkhorn_iters=module.sinkhorn_iters,
        eps=module.eps,
        h_res_parameterization=module.h_res_parameterization,
    )


def run_module(
    module: HyperConnection | ManifoldHyperConnection, state: Tensor, branch: Branch
) -> tuple[Tensor, Tensor]:
    """(branch input, new state) through the module's width and depth connections."""
    h0, inputs = module.width_connection(state)
    return h0, module.depth_connection(branch(h0), inputs)


def assert_close(actual: Tensor, expected: Tensor, what: str, tol: dict[str, float]) -> None:
    """torch's assert_close, keeping its mismatch report and naming the quantity."""
    torch.testing.assert_close(
        actual, expected, **tol, msg=lambda report: f"{what} differs from the reference: {report}"
    )


def check_module_against_reference(
    module: HyperConnection | ManifoldHyperConnection, reference: Callable, layout: str
) -> Tensor:
    """The module's h0, X' and H_res (fp32) against ``reference`` (fp64) on a random state;
    returns the module's H_res."""
    state = random_state(module.num_rows * module.row_size, layout)
    branch = make_branch(module.hidden_size)
    branch_input, new_state = run_module(module, state, branch)
    ref_h0, ref_state, ref_h_res = reference(module, state.double(), branch)
    assert_close(branch_input.double(), ref_h0, "branch input", FP32_TOL)
    assert_close(new_state.double(), ref_state, "new state", FP32_TOL)
    h_res = module.last_h_res().double().expand_as(ref_h_res)
    assert_close(h_res, ref_h_res, "H_res", FP32_TOL)
    return h_res


def make_hc(n: int, m: int, dynamic: bool, use_tanh: bool, layer_index: int = 0) -> HyperConnection:
    return HyperConnection(
        HIDDEN,
        num_residual_streams=n,
        num_fracs=m,
        dynamic=dynamic,
        use_tanh=use_tanh,
        layer_index=layer_index,
    )


def make_mhc(
    n: int, proposals: int, log_domain: bool, dynamic: bool, layer_index: int = 0
) -> ManifoldHyperConnection:
    return ManifoldHyperConnection(
        HIDDEN,
        num_residual_streams=n,
        num_proposals=proposals,
        log_domain_sinkhorn=log_domain,
        dynamic=dynamic,
        layer_index=layer_index,
    )


# ------------------------------------------------------------------------------------------
# Modules and pure functions against the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bsh", "sbh"])
@pytest.mark.parametrize(("n", "m", "dynamic", "use_tanh"), HC_VARIANTS)
def test_hc_module_matches_reference(
    n: int, m: int, dynamic: bool, use_tanh: bool, layout: str
) -> None:
    # H_res = A_r(X)^T (destination rows): the transposition convention itself.
    check_module_against_reference(
        randomise(make_hc(n, m, dynamic, use_tanh)), hc_reference, layout
    )


@pytest.mark.parametrize(("n", "m", "dynamic", "use_tanh"), HC_VARIANTS)
def test_hc_functional_fp64_matches_reference(
    n: int, m: int, dynamic: bool, use_tanh: bool
) -> None:
    module = randomise(make_hc(n, m, dynamic, use_tanh)).double()
    state = random_state(n * HIDDEN, "bsh", torch.float64)
    branch = make_branch(HIDDEN)
    N, D = module.num_rows, module.row_size

    rows = state.unflatten(-1, (N, D))
    params = [module.static_pre, module.static_res, module.static_post]
    if dynamic:
        params += [module.dynamic_proj, module.scale_pre_res, module.scale_post]
    with torch.no_grad():
        mixing = hc_mixing(rows, *params, use_tanh=use_tanh, eps=module.eps)
        assert mixing.h_res.dtype == torch.float64, "hc_mixing must not cast float64 inputs"
        h0 = branch_input(rows, mixing.h_pre)
        new_state = merge_branch_output(rows, branch(h0), mixing.h_post, mixing.h_res)

    ref_h0, ref_state, ref_h_res = hc_reference(module, state, branch)
    assert_close(h0, ref_h0, "branch input", FP64_TOL)
    assert_close(new_state, ref_state, "new state", FP64_TOL)
    assert_close(mixing.h_res.expand_as(ref_h_res), ref_h_res, "H_res", FP64_TOL)


@pytest.mark.parametrize("layout", ["bsh", "sbh"])
@pytest.mark.parametrize(("n", "proposals", "log_domain", "dynamic"), MHC_VARIANTS)
def test_mhc_module_matches_reference(
    n: int, proposals: int, log_domain: bool, dynamic: bool, layout: str
) -> None:
    module = randomise(make_mhc(n, proposals, log_domain, dynamic))
    check_module_against_reference(module, mhc_reference, layout)


@pytest.mark.parametrize(("n", "proposals", "log_domain", "dynamic"), MHC_VARIANTS)
def test_mhc_functional_fp64_matches_reference(
    n: int, proposals: int, log_domain: bool, dynamic: bool
) -> None:
    module = randomise(make_mhc(n, proposals, log_domain, dynamic)).double()
    state = random_state(n * HIDDEN, "bsh", torch.float64)
    branch = make_branch(HIDDEN)

    rows = state.unflatten(-1, (n, HIDDEN))
    with torch.no_grad():
        mixing = mhc_mixing(
            rows,
            module.bias,
            module.gates,
            module.dynamic_proj,
            sinkhorn_iters=module.sinkhorn_iters,
            log_domain_sinkhorn=log_domain,
            eps=module.eps,
        )
        assert mixing.h_res.dtype == torch.float64, "mhc_mixing must not cast float64 inputs"
        h0 = branch_input(rows, mixing.h_pre)
        new_state = merge_branch_output(rows, branch(h0), mixing.h_post, mixing.h_res)

    ref_h0, ref_state, ref_h_res = mhc_reference(module, state, branch)
    assert_close(h0, ref_h0, "branch input", FP64_TOL)
    assert_close(new_state, ref_state, "new state", FP64_TOL)
    assert_close(mixing.h_res.expand_as(ref_h_res), ref_h_res, "H_res", FP64_TOL)


# ------------------------------------------------------------------------------------------
# gradcheck (float64, pure functions: they do not cast)
# ------------------------------------------------------------------------------------------


def _leaf(*shape: int, scale: float = 0.5, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize(
    ("k", "dynamic", "use_tanh"),
    [
        (1, True, True),
        (1, True, False),
        (1, False, True),
        (3, True, True),
    ],
)
def test_gradcheck_hc_mixing(k: int, dynamic: bool, use_tanh: bool) -> None:
    N, D = 3, 4
    inputs = [
        _leaf(2, N, D, scale=1.0, seed=1),
        _leaf(N, k, seed=2),
        _leaf(N, N, seed=3),
        _leaf(N, seed=4),
    ]
    if dynamic:
        inputs += [_leaf(D, k + N + 1, seed=5), _leaf(1, seed=6), _leaf(1, seed=7)]

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        return tuple(hc_mixing(*args, use_tanh=use_tanh))

    assert torch.autograd.gradcheck(fn, inputs), "hc_mixing gradient"


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("dynamic", [True, False])
def test_gradcheck_mhc_mixing(log_domain: bool, dynamic: bool) -> None:
    n, C, P = 2, 3, 2
    width = n * n + 2 * n
    inputs = [_leaf(2, n, C, scale=1.0, seed=1), _leaf(P, width, seed=2), _leaf(P, 3, seed=3)]
    if dynamic:
        inputs.append(_leaf(n * C, P * width, seed=4))

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        # All three outputs (H_pre, H_post, H_res) are checked.
        return tuple(mhc_mixing(*args, sinkhorn_iters=5, log_domain_sinkhorn=log_domain))

    assert torch.autograd.gradcheck(fn, inputs), "mhc_mixing gradient"


@pytest.mark.parametrize("log_domain", [False, True])
def test_gradcheck_sinkhorn(log_domain: bool) -> None:
    logits = _leaf(2, 3, 3, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda t: sinkhorn_knopp(t, num_iters=7, log_domain=log_domain), (logits,)
    ), "sinkhorn_knopp gradient"


@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_branch_input_and_merge_branch_output(k: int) -> None:
    N, D = 3, 4
    state, h_pre = _leaf(2, N, D, seed=1), _leaf(2, k, N, seed=2)
    branch_output, h_post, h_res = _leaf(2, k * D, seed=3), _leaf(2, N, seed=4), _leaf(2, N, N)
    assert torch.autograd.gradcheck(branch_input, (state, h_pre)), "branch_input"
    assert torch.autograd.gradcheck(merge_branch_output, (state, branch_output, h_post, h_res)), (
        "merge_branch_output"
    )


# ------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------


def _logits(scale: float, dtype: torch.dtype, n: int = 4, batch: int = 64) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return (scale * torch.randn(batch, n, n, generator=gen, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("num_iters", [1, 2, 5, 20])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_sinkhorn_rows_sum_to_one(
    dtype: torch.dtype, tol: float, num_iters: int, log_domain: bool
) -> None:
    h = sinkhorn_knopp(_logits(3.0, dtype), num_iters, log_domain)
    row_error = (h.sum(dim=-1) - 1).abs().max().item()
    assert row_error < tol, f"rows sum to 1 +- {row_error} after {num_iters} iterations"
    assert (h >= 0).all(), "negative entries"


def test_sinkhorn_matches_reference() -> None:
    logits = _logits(2.0, torch.float64, n=3, batch=4)
    for t in range(logits.shape[0]):
        for iters in (1, 4, 20):
            torch.testing.assert_close(
                sinkhorn_knopp(logits[t], iters), ref.sinkhorn(logits[t], iters), **FP64_TOL
            )
            torch.testing.assert_close(
                sinkhorn_knopp(logits[t], iters, log_domain=True),
                ref.sinkhorn(logits[t], iters),
                **FP64_TOL,
            )


@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_matches_the_paper_by_hand(log_domain: bool) -> None:
    """T = [[0, 2], [0, 0]], one iteration from M0 = exp(T): columns [1, 1] / 2 and
    [e^2, 1] / (e^2 + 1), then rows. (Starting from exp(T - rowmax) would give the matrix
    with its columns swapped, [[.192, .808], [.638, .362]].)"""
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    e2 = math.exp(2.0)
    c0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    c1 = torch.tensor([e2, 1.0], dtype=torch.float64) / (e2 + 1.0)
    by_hand = torch.stack([c0, c1], dim=-1)
    by_hand = by_hand / by_hand.sum(dim=-1, keepdim=True)
    result = sinkhorn_knopp(logits, 1, log_domain=log_domain)
    torch.testing.assert_close(result, by_hand, **FP64_TOL)
    expected = torch.tensor([[0.362, 0.638], [0.808, 0.192]], dtype=torch.float64)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_is_the_papers_at_every_iteration_count_near_init(log_domain: bool) -> None:
    """Near the default init (b_res = 4 I plus a dynamic part) the paper's M0 = exp(T) and a
    per-row shifted start differ by 1e-3 to 1e-2 after 20 iterations; the column shift is
    exact."""
    gen = torch.Generator().manual_seed(3)
    logits = 4.0 * torch.eye(4, dtype=torch.float64) + torch.randn(
        16, 4, 4, generator=gen, dtype=torch.float64
    )
    for iters in (1, 2, 20):
        paper = torch.stack([ref.sinkhorn(t, iters) for t in logits])
        torch.testing.assert_close(sinkhorn_knopp(logits, iters, log_domain), paper, **FP64_TOL)


@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_columns_converge(log_domain: bool) -> None:
    logits = _logits(1.0, torch.float64)  # moderate logits

    def column_error(iters: int) -> float:
        h = sinkhorn_knopp(logits, iters, log_domain)
        return (h.sum(dim=-2) - 1).abs().max().item()

    err_1, err_50 = column_error(1), column_error(50)
    assert err_50 < 1e-4, f"column sums off by {err_50} after 50 iterations"
    assert err_50 < 1e-3 * err_1, f"columns do not converge: {err_1} -> {err_50}"


def test_sinkhorn_log_domain_large_logits_fp32() -> None:
    gen = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (64, 4, 4), generator=gen) * 2 - 1
    logits = (signs * torch.rand(64, 4, 4, generator=gen) * 1e4).float()
    logits[0, 0, 0], logits[0, 1, 1] = 1e4, -1e4  # the extremes are present
    h = sinkhorn_knopp(logits, 20, log_domain=True)
    assert torch.isfinite(h).all(), "log-domain Sinkhorn produced NaN or inf"
    assert (h >= 0).all(), "negative entries"
    row_error = (h.sum(dim=-1) - 1).abs().max().item()
    assert row_error < 1e-5, f"rows sum to 1 +- {row_error} for logits up to 1e4"


@pytest.mark.parametrize("num_iters", [1, 20])
def test_sinkhorn_exp_and_log_domain_agree(num_iters: int) -> None:
    logits = _logits(2.0, torch.float64)
    torch.testing.assert_close(
        sinkhorn_knopp(logits, num_iters, log_domain=False),
        sinkhorn_knopp(logits, num_iters, log_domain=True),
        rtol=1e-12,
        atol=1e-12,
    )


def test_sinkhorn_exp_and_log_domain_agree_at_convergence() -> None:
    # Both converge to the same doubly stochastic scaling of exp(T).
    logits = _logits(1.0, torch.float64)
    torch.testing.assert_close(
        sinkhorn_knopp(logits, 200, log_domain=False),
        sinkhorn_knopp(logits, 200, log_domain=True),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("num_iters", [1, 2, 20])
def test_sinkhorn_gradient_is_the_papers_through_every_iteration(
    num_iters: int, log_domain: bool
) -> None:
    """The hand-written exp-domain backward (and the log-softmaxes') against autograd through
    the paper's scalar iterations, matrix by matrix, for an upstream gradient that weights
    every entry differently."""
    logits = _leaf(3, 2, 4, 4, scale=1.5, seed=5)
    upstream = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6)).double()
    (ours,) = torch.autograd.grad(sinkhorn_knopp(logits, num_iters, log_domain), logits, upstream)
    flat, weights = logits.reshape(-1, 4, 4), upstream.reshape(-1, 4, 4)
    paper = [
        torch.autograd.grad(ref.sinkhorn(t, num_iters), t, w)[0]
        for t, w in zip(flat, weights, strict=True)
    ]
    torch.testing.assert_close(ours, torch.stack(paper).view_as(ours), **FP64_TOL)


def test_sinkhorn_tokens_last_is_the_same_function() -> None:
    """The [n, n, tokens] layout the mHC coefficients use, with and without gradients."""
    logits = _leaf(2, 3, 3, scale=2.0, seed=7)
    tokens_last = logits.detach().permute(1, 2, 0).clone().requires_grad_()
    h = sinkhorn_knopp_tokens_last(tokens_last, 5)
    torch.testing.assert_close(h.permute(2, 0, 1), sinkhorn_knopp(logits, 5), **FP64_TOL)
    with torch.no_grad():  # the in-place path the lean forward takes
        torch.testing.assert_close(sinkhorn_knopp_tokens_last(tokens_last, 5), h, **FP64_TOL)
    (grad,) = torch.autograd.grad(h, tokens_last, torch.ones_like(h) * torch.arange(2.0))
    (expected,) = torch.autograd.grad(
        sinkhorn_knopp(logits, 5),
        logits,
        torch.ones(2, 3, 3).double() * torch.arange(2.0)[:, None, None],
    )
    torch.testing.assert_close(grad.permute(2, 0, 1), expected, **FP64_TOL)


def test_sinkhorn_exp_domain_keeps_an_underflowed_row_finite() -> None:
    """A row far below every column's maximum underflows in the exp domain: the floor keeps
    it (and its gradient) zero instead of NaN; the log domain normalises it."""
    logits = torch.tensor([[0.0, 0.0], [-200.0, -200.0]], requires_grad=True)
    h = sinkhorn_knopp(logits, 3)
    torch.testing.assert_close(h, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    exact = sinkhorn_knopp(logits.detach(), 3, log_domain=True)
    torch.testing.assert_close(exact, torch.full((2, 2), 0.5))


@pytest.mark.parametrize("num_iters", [0, -1])
def test_sinkhorn_rejects_fewer_than_one_iteration(num_iters: int) -> None:
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_knopp(torch.zeros(2, 2), num_iters)


# ------------------------------------------------------------------------------------------
# Gradients reach H_res (Sinkhorn is never detached)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("proposals", [1, 3])
def test_mhc_h_res_parameters_get_gradient(proposals: int, log_domain: bool) -> None:
    n = 4
    module = make_mhc(n, proposals, log_domain, dynamic=True)  # default init
    # Distinct streams: with identical ones H_res X = X for any row-stochastic H_res.
    state = random_state(n * HIDDEN, "sbh")
    new_state = module(state, make_branch(HIDDEN))
    weights = torch.randn(new_state.shape, generator=torch.Generator().manual_seed(5))
    (new_state * weights).sum().backward()

    width = n * n + 2 * n
    res_bias_grad = module.bias.grad[:, 2 * n :]
    res_proj_grad = module.dynamic_proj.grad.unflatten(-1, (proposals, width))[..., 2 * n :]
    for p in range(proposals):
        assert res_bias_grad[p].abs().max() > 0, f"zero gradient on b_res of proposal {p}"
        assert res_proj_grad[:, p].abs().max() > 0, f"zero gradient on phi_res of proposal {p}"


# ------------------------------------------------------------------------------------------
# Residual equivalence at the default initialisation
# ------------------------------------------------------------------------------------------


def _init_variants() -> list[Any]:
    """(factory of the sublayer with index i at its default init, n) for every variant."""
    hc = [
        pytest.param(
            lambda i, n=n, dyn=dyn, th=th: make_hc(n, 1, dyn, th, layer_index=i),
            n,
            id=f"{'DHC' if dyn else 'SHC'}{'' if th else '-notanh'}-n{n}",
        )
        for n in (1, 2, 4)
        for dyn, th in ((True, True), (True, False), (False, True))
    ]
    frac = [
        pytest.param(lambda i, m=m: make_hc(1, m, True, True, layer_index=i), 1, id=f"Frac-m{m}")
        for m in (2, 4)
    ]
    mhc = [
        pytest.param(
            lambda i, n=n, p=p, log=log, dyn=dyn: make_mhc(n, p, log, dyn, layer_index=i),
            n,
            id=f"mHC-{mhc_id(n, p, log, dyn)}",
        )
        for n in (2, 4)
        for p in (1, 3)
        for log in (False, True)
        for dyn in (True, False)
    ]
    return hc + frac + mhc


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize(("factory", "n"), _init_variants())
def test_residual_equivalence_at_init(
    factory: Callable[[int], torch.nn.Module], n: int, depth: int
) -> None:
    branches = [make_prenorm_branch(HIDDEN, seed=10 + i) for i in range(depth)]
    x = random_state(HIDDEN, "sbh")

    plain = x
    for branch in branches:
        plain = plain + branch(plain)

    state = expand_streams(x, n)
    for i, branch in enumerate(branches):
        state = factory(i)(state, branch)
    out = reduce_streams(state, n)

    # Relative to the state's scale: elementwise ratios blow up on entries near zero.
    # HC and Frac are exact here (0.0 observed); mHC's sigmoid(logit(1/n)) rounds (~3e-7).
    error = ((out - plain).abs().max() / plain.abs().max()).item()
    assert error < 1e-6, f"not the pre-norm residual at init: relative error {error}"


# ------------------------------------------------------------------------------------------
# Metrics and monitoring
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_metrics_match_reference(n: int) -> None:
    gen = torch.Generator().manual_seed(6)
    mats = torch.randn(5, n, n, generator=gen, dtype=torch.float64)
    fwd, bwd, lam = forward_gain(mats), backward_gain(mats), log_amax(mats)
    for t, H in enumerate(mats):
        assert fwd[t].item() == pytest.approx(ref.forward_gain(H), rel=1e-12), "forward gain"
        assert bwd[t].item() == pytest.approx(ref.backward_gain(H), rel=1e-12), "backward gain"
        # log_amax computes in fp32 (metrics.py casts with .float()).
        assert lam[t].item() == pytest.approx(ref.log_amax(H), abs=1e-5), "log_amax"
    # Not symmetric in general: the forward and backward gains are different metrics.
    assert not torch.allclose(fwd, bwd)


def test_metrics_of_doubly_stochastic_and_identity() -> None:
    h = sinkhorn_knopp(_logits(1.0, torch.float64), 50)
    torch.testing.assert_close(forward_gain(h), torch.ones(h.shape[0], dtype=h.dtype))
    assert (backward_gain(h) - 1).abs().max() < 1e-4, "columns of a Sinkhorn matrix sum to ~1"
    assert log_amax(h).abs().max() < 1e-4, "a doubly stochastic matrix has spectral norm 1"
    for n in (1, 2, 4):
        assert log_amax(torch.eye(n)).item() == 0.0, "log_amax of the identity"


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda: make_hc(4, 1, True, True), id="DHC-n4"),
        pytest.param(lambda: make_hc(2, 1, False, True), id="SHC-n2"),
        pytest.param(lambda: make_hc(1, 4, True, True), id="Frac-m4"),
        pytest.param(lambda: make_mhc(4, 3, False, True), id="mHC-n4-P3"),
        pytest.param(lambda: make_mhc(2, 1, True, False), id="mHC-n2-static"),
    ],
)
def test_get_log_amax(factory: Callable[[], torch.nn.Module]) -> None:
    module = randomise(factory())
    assert module.get_log_amax() is None, "no forward yet: get_log_amax must return None"

    state = random_state(module.num_rows * module.row_size, "bsh")
    branch = make_branch(HIDDEN)
    module(state, branch)
    value = module.get_log_amax()
    assert isinstance(value, float), f"get_log_amax returned {type(value)}"

    if isinstance(module, ManifoldHyperConnection):
        _, _, ref_h_res = mhc_reference(module, state.double(), branch)
    else:
        _, _, ref_h_res = hc_reference(module, state.double(), branch)
    token_mean = ref_h_res.reshape(-1, *ref_h_res.shape[-2:]).mean(dim=0)
    assert value == pytest.approx(ref.log_amax(token_mean), abs=1e-5), "token-averaged H_res"


# ------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(
            lambda: HyperConnection(16, num_residual_streams=0),
            "num_residual_streams",
            id="hc-streams-0",
        ),
        pytest.param(
            lambda: HyperConnection(16, num_residual_streams=1, num_fracs=0),
            "num_fracs",
            id="hc-fracs-0",
        ),
        pytest.param(
            lambda: HyperConnection(16, num_residual_streams=1, num_fracs=3),
            "num_fracs=3",
            id="hc-fracs-not-dividing",
        ),
        pytest.param(
            lambda: HyperConnection(16, num_residual_streams=2, num_fracs=2),
            "num_fracs=2.*num_residual_streams",
            id="hc-fracs-with-streams",
        ),
        pytest.param(
            lambda: ManifoldHyperConnection(16, num_residual_streams=1),
            "num_residual_streams",
            id="mhc-streams-1",
        ),
        pytest.param(
            lambda: ManifoldHyperConnection(16, sinkhorn_iters=0),
            "sinkhorn_iters",
            id="mhc-iters-0",
        ),
        pytest.param(
            lambda: ManifoldHyperConnection(16, num_proposals=0),
            "num_proposals",
            id="mhc-proposals-0",
        ),
    ],
)
def test_constructor_errors(make: Callable[[], torch.nn.Module], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_gains_report_the_mean_matrix_and_the_per_token_mean() -> None:
    from megatron.hyper_connections.metrics import gains

    h = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[-2.0, 0.0], [0.0, 1.0]]])  # two tokens
    g = gains(h)
    assert g["forward_mean_matrix"].item() == 1.0  # the 2 and -2 cancel in the average
    assert g["forward_per_token"].item() == 2.0
    assert g["backward_per_token"].item() == 2.0


def test_composite_is_the_product_to_the_end_of_the_network() -> None:
    from megatron.hyper_connections.metrics import composite

    gen = torch.Generator().manual_seed(0)
    hs = [torch.randn(3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    products = composite(hs)
    torch.testing.assert_close(products[2], hs[2])
    torch.testing.assert_close(products[0], hs[2] @ hs[1] @ hs[0])


# ------------------------------------------------------------------------------------------
# mHC-lite (H_res a mixture of permutation matrices) and mHC's gradients, against the reference
# ------------------------------------------------------------------------------------------

# (num_residual_streams, num_proposals, dynamic)
LITE_VARIANTS = [
    pytest.param(n, p, dyn, id=f"n{n}-P{p}-{'dyn' if dyn else 'static'}")
    for n in (2, 3, 4)
    for p in (1, 3)
    for dyn in (True, False)
]


def make_mhc_lite(n: int, proposals: int, dynamic: bool) -> ManifoldHyperConnection:
    return ManifoldHyperConnection(
        HIDDEN,
        num_residual_streams=n,
        num_proposals=proposals,
        dynamic=dynamic,
        h_res_parameterization="permutations",
    )


@pytest.mark.parametrize("layout", ["bsh", "sbh"])
@pytest.mark.parametrize(("n", "proposals", "dynamic"), LITE_VARIANTS)
def test_mhc_lite_module_matches_reference(
    n: int, proposals: int, dynamic: bool, layout: str
) -> None:
    module = randomise(make_mhc_lite(n, proposals, dynamic))
    h_res = check_module_against_reference(module, mhc_reference, layout)
    for dim in (-1, -2):  # exactly doubly stochastic, far from init
        assert (h_res.sum(dim=dim) - 1).abs().max() < 1e-6


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: make_mhc(4, 3, False, True), id="mHC-n4-P3"),
        pytest.param(lambda: make_mhc(3, 1, True, True), id="mHC-n3-log"),
        pytest.param(lambda: make_mhc_lite(4, 3, True), id="mHC-lite-n4-P3"),
        pytest.param(lambda: make_mhc_lite(3, 1, False), id="mHC-lite-n3-static"),
    ],
)
def test_mhc_outputs_and_parameter_gradients_match_fp64_reference(make: Callable) -> None:
    """The module (fp64) against the paper's equations written out in fp64: outputs and the
    gradients of every parameter, to 1e-6 relative."""
    module = randomise(make()).double()
    state = random_state(module.num_residual_streams * HIDDEN, "bsh", torch.float64)
    branch = make_branch(HIDDEN)
    weights = torch.randn(state.shape, generator=torch.Generator().manual_seed(5)).double()

    branch_input, new_state = run_module(module, state, branch)
    (new_state * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    ref_h0, ref_state, _ = mhc_reference(module, state, branch)
    (ref_state * weights).sum().backward()

    tol = {"rtol": 1e-6, "atol": 1e-9}
    assert_close(branch_input, ref_h0, "branch input", tol)
    assert_close(new_state, ref_state.detach(), "new state", tol)
    for name, param in module.named_parameters():
        assert_close(grads[name], param.grad, f"d loss / d {name}", tol)


@pytest.mark.parametrize("n", [2, 4])
def test_mhc_lite_is_the_residual_at_init(n: int) -> None:
    module = make_mhc_lite(n, 1, True)
    x = random_state(HIDDEN, "bsh")
    branch = make_branch(HIDDEN)
    branch_input, new_state = run_module(module, expand_streams(x, n), branch)
    torch.testing.assert_close(branch_input, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reduce_streams(new_state, n), x + branch(x), rtol=1e-5, atol=1e-5)


def test_mhc_lite_log_amax_of_the_mean_h_res_is_zero_far_from_init() -> None:
    module = randomise(make_mhc_lite(4, 1, True), seed=3)
    with torch.no_grad():
        module.dynamic_proj.mul_(20.0)  # far from init: large, token-dependent logits
    run_module(module, random_state(4 * HIDDEN, "bsh"), make_branch(HIDDEN))
    assert abs(module.get_log_amax()) < 1e-6
