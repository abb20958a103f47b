"""The fused Triton kernels (``kernels``) against the PyTorch reference: values and every
input's gradient, the backward functions against autograd of the reference.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 set before the kernels
are defined, i.e. before a kernel module is first imported).
"""

import os
from collections.abc import Sequence

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton installed")

from megatron.hyper_connections import streams
from megatron.hyper_connections.kernels import availability
from megatron.hyper_connections.kernels.branch_input import (
    fused_branch_input,
    fused_branch_input_backward,
)
from megatron.hyper_connections.kernels.merge_branch_output import (
    fused_merge_branch_output,
    fused_merge_branch_output_backward,
)
from megatron.hyper_connections.kernels.mhc_coefficients import fused_mhc_coefficients
from megatron.hyper_connections.kernels.mhc_lite_coefficients import fused_mhc_lite_coefficients
from megatron.hyper_connections.kernels.rms_projection import (
    fused_rms_projection,
    fused_rms_projection_backward,
)
from megatron.hyper_connections.manifold_hyper_connection import mhc_coefficients
from megatron.hyper_connections.permutations import num_permutations
from megatron.hyper_connections.projection import Projection
from megatron.hyper_connections.sinkhorn import sinkhorn_knopp
from megatron.hyper_connections.streams import BranchOutput

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if not availability.supported(torch.empty(0, device=DEVICE)):
    pytest.skip(
        "the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before they are imported",
        allow_module_level=True,
    )

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}


def _close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    tol: dict[str, float] | None = None,
) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **(tol or TOL[dtype]))


def _grads(outputs, inputs, seed: int = 1):
    """Gradients of a random linear function of ``outputs`` w.r.t. ``inputs``."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, device=DEVICE).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, cotangents)


def _assert_matches(
    ours: Sequence[torch.Tensor],
    ref: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float32,
    grad_tol: dict[str, float] | None = None,
) -> None:
    """Outputs and the gradients of every input agree (``grad_tol`` overrides ``TOL[dtype]``)."""
    for a, b in zip(ours, ref, strict=True):
        _close(a, b, dtype)
    for a, b in zip(_grads(ours, inputs), _grads(ref, inputs), strict=True):
        _close(a, b, dtype, grad_tol)


def _leaf(*shape, scale: float = 1.0, shift: float = 0.0, dtype=torch.float32):
    t = (scale * torch.randn(*shape, device=DEVICE) + shift).to(dtype)
    return t.requires_grad_()


# ---------------------------------------------------------------------------------------
# mHC coefficients
# ---------------------------------------------------------------------------------------


def reference_coefficients(proj, inv_rms, gates, bias, n: int, iters: int):
    """``mhc_mixing`` after its projection: sigmoid, 2 sigmoid and exp-domain Sinkhorn."""
    t = bias
    if proj is not None:
        sizes = torch.tensor([n, n, n * n], device=gates.device)
        gate = gates.repeat_interleave(sizes, dim=-1)
        t = gate * (proj * inv_rms.reshape(*proj.shape[:-2], 1, 1)) + bias
    t_pre, t_post, t_res = t.split([n, n, n * n], dim=-1)
    h_pre = torch.sigmoid(t_pre).mean(dim=-2).unsqueeze(-2)
    h_post = (2.0 * torch.sigmoid(t_post)).mean(dim=-2)
    h_res = sinkhorn_knopp(t_res.unflatten(-1, (n, n)), iters, log_domain=False).mean(dim=-3)
    return h_pre, h_post, h_res


def _check_coefficients(
    inputs: Sequence[torch.Tensor | None], n: int, iters: int
) -> tuple[torch.Tensor, ...]:
    """The kernel against ``reference_coefficients``: values and the given inputs' gradients."""
    ours = fused_mhc_coefficients(*inputs, n, iters)
    ref = reference_coefficients(*inputs, n, iters)
    _assert_matches(ours, ref, [t for t in inputs if t is not None])
    return ours


def _mhc_inputs(n: int, num_proposals: int, tokens: tuple[int, ...], bias_scale: float = 1.0):
    width = n * n + 2 * n
    proj = _leaf(*tokens, num_proposals, width)
    inv_rms = (0.5 + torch.rand(tokens, device=DEVICE)).requires_grad_()
    gates = _leaf(num_proposals, 3, scale=0.5, shift=0.5)
    bias = _leaf(num_proposals, width, scale=bias_scale)
    return proj, inv_rms, gates, bias


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("num_proposals", [1, 3])
def test_mhc_coefficients_dynamic(n: int, num_proposals: int) -> None:
    torch.manual_seed(n * 10 + num_proposals)
    inputs = _mhc_inputs(n, num_proposals, (3, 5))  # leading dims are flattened
    ours = _check_coefficients(inputs, n, 6)
    assert [o.shape for o in ours] == [(3, 5, 1, n), (3, 5, n), (3, 5, n, n)]


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("num_proposals", [1, 3])
def test_mhc_coefficients_static(n: int, num_proposals: int) -> None:
    torch.manual_seed(n * 10 + num_proposals)
    bias = _leaf(num_proposals, n * n + 2 * n, scale=2.0)
    ours = _check_coefficients((None, None, None, bias), n, 5)
    assert [o.shape for o in ours] == [(1, n), (n,), (n, n)]


def test_mhc_coefficients_many_tokens_and_iterations() -> None:
    """Several token blocks per launch (bias partials over programs) and the default 20
    Sinkhorn rounds; a token count that does not fill the last block."""
    torch.manual_seed(0)
    n = 4
    _check_coefficients(_mhc_inputs(n, 2, (70,), bias_scale=3.0), n, 20)


def test_mhc_coefficients_ties_at_init() -> None:
    """At init every column of t_res has tied maxima when b_res = 0 (and phi = 0): the shift
    by the column max passes no gradient, ties or not, as in ``sinkhorn_knopp``."""
    n = 4
    proj, inv_rms, gates, _ = _mhc_inputs(n, 1, (4,))
    with torch.no_grad():
        proj.zero_()
    bias = torch.zeros(1, n * n + 2 * n, device=DEVICE, requires_grad=True)
    _check_coefficients((proj, inv_rms, gates, bias), n, 3)


def test_mhc_coefficients_match_mhc_mixing() -> None:
    """End to end: ``mhc_mixing`` of a state equals the kernel fed with x phi and 1 / RMS(x)."""
    from megatron.hyper_connections.manifold_hyper_connection import mhc_mixing

    torch.manual_seed(0)
    n, C, P, eps = 4, 8, 2, 1e-5
    width = n * n + 2 * n
    state = _leaf(5, n, C)
    phi = _leaf(n * C, P * width, scale=0.3)
    gates = _leaf(P, 3, scale=0.5, shift=0.5)
    bias = _leaf(P, width)
    inputs = (state, phi, gates, bias)
    ref = mhc_mixing(state, bias, gates, phi, sinkhorn_iters=7, eps=eps)
    x = state.flatten(-2)
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1) + eps)
    proj = (x @ phi).unflatten(-1, (P, width))
    ours = fused_mhc_coefficients(proj, inv_rms, gates, bias, n, 7)
    _assert_matches(ours, ref, inputs)


# ---------------------------------------------------------------------------------------
# mHC-lite coefficients
# ---------------------------------------------------------------------------------------


def reference_lite_coefficients(proj, inv_rms, gates, bias):
    """``mhc_coefficients(..., h_res_parameterization="permutations")`` in fp32, fed with the
    kernel's layouts (proj [..., P, W], inv_rms [...])."""
    projection = None
    if proj is not None:
        lead = proj.shape[:-2]
        projection = Projection(
            proj.float().flatten(-2).unsqueeze(-2), inv_rms.float().reshape(*lead, 1, 1)
        )
        gates = gates.float()
    mixing = mhc_coefficients(
        projection, bias.float(), gates, h_res_parameterization="permutations"
    )
    return mixing.h_pre, mixing.h_post, mixing.h_res


def _lite_inputs(
    n: int,
    num_proposals: int,
    tokens: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    bias_scale: float = 1.0,
):
    width = 2 * n + num_permutations(n)
    proj = _leaf(*tokens, num_proposals, width, dtype=dtype)
    inv_rms = (0.5 + torch.rand(tokens, device=DEVICE)).to(dtype).requires_grad_()
    gates = _leaf(num_proposals, 3, scale=0.5, shift=0.5, dtype=dtype)
    bias = _leaf(num_proposals, width, scale=bias_scale, dtype=dtype)
    return proj, inv_rms, gates, bias


def _check_lite_coefficients(inputs, n: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """The kernel against ``reference_lite_coefficients``: values (fp32 from the same inputs,
    so at fp32 tolerance) and the given inputs' gradients (rounded to their dtype)."""
    ours = fused_mhc_lite_coefficients(*inputs, n)
    ref = reference_lite_coefficients(*inputs)
    assert all(o.dtype == torch.float32 for o in ours)
    _assert_matches(ours, ref, [t for t in inputs if t is not None], grad_tol=TOL[dtype])
    return ours


LITE_STREAMS = [2, 3, 4, 5, 6]  # n! = 2 .. 720 logits: one partial chunk up to 12 chunks


@pytest.mark.parametrize("n", LITE_STREAMS)
@pytest.mark.parametrize("num_proposals", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mhc_lite_coefficients_dynamic(n: int, num_proposals: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n * 10 + num_proposals)
    inputs = _lite_inputs(n, num_proposals, (2, 3), dtype)  # leading dims are flattened
    ours = _check_lite_coefficients(inputs, n, dtype)
    assert [o.shape for o in ours] == [(2, 3, 1, n), (2, 3, n), (2, 3, n, n)]


@pytest.mark.parametrize("n", LITE_STREAMS)
@pytest.mark.parametrize("num_proposals", [1, 3])
def test_mhc_lite_coefficients_static(n: int, num_proposals: int) -> None:
    torch.manual_seed(n * 10 + num_proposals)
    bias = _leaf(num_proposals, 2 * n + num_permutations(n), scale=2.0)
    ours = _check_lite_coefficients((None, None, None, bias), n)
    assert [o.shape for o in ours] == [(1, n), (n,), (n, n)]


@pytest.mark.parametrize("n", [4, 6])
def test_mhc_lite_coefficients_many_tokens(n: int) -> None:
    """Several token blocks per launch (bias and gate partials over programs, a last block
    not filled) and large logits, whose maximum moves between chunks (the online softmax's
    rescaling)."""
    torch.manual_seed(n)
    _check_lite_coefficients(_lite_inputs(n, 2, (37,), bias_scale=6.0), n)


@pytest.mark.parametrize("n", [3, 5, 6])
def test_mhc_lite_h_res_is_doubly_stochastic(n: int) -> None:
    """Rows and columns of H_res sum to 1 and its entries are in [0, 1], for logits of any
    size (softmax weights of permutation matrices)."""
    torch.manual_seed(n)
    inputs = [t.detach() for t in _lite_inputs(n, 2, (5,), bias_scale=20.0)]
    _, _, h_res = fused_mhc_lite_coefficients(*inputs, n)
    ones = torch.ones(5, n, device=DEVICE)
    torch.testing.assert_close(h_res.sum(-1), ones, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_res.sum(-2), ones, atol=1e-6, rtol=0)
    assert bool((h_res >= 0).all()) and bool((h_res <= 1 + 1e-6).all())


def test_mhc_lite_coefficients_save_only_their_inputs() -> None:
    """What autograd keeps for backward is proj, inv_rms, gates and bias: no softmax."""
    n = 4
    inputs = _lite_inputs(n, 2, (6,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_mhc_lite_coefficients(*inputs, n)
    assert sorted(t.numel() for t in saved) == sorted(t.numel() for t in inputs)


def test_mhc_lite_coefficients_bad_input() -> None:
    bias = torch.zeros(1, 2 * 7 + num_permutations(7), device=DEVICE)
    with pytest.raises(ValueError, match=r"num_streams must be 2 to 6 .* got 7"):
        fused_mhc_lite_coefficients(None, None, None, bias, 7)
    with pytest.raises(ValueError, match=r"bias must be \[P, 32\] \(W = 2n \+ n!\), got \(1, 24\)"):
        fused_mhc_lite_coefficients(None, None, None, torch.zeros(1, 24, device=DEVICE), 4)


# ---------------------------------------------------------------------------------------
# RMS projection
# ---------------------------------------------------------------------------------------


def _reference_grads(outputs, inputs, cotangents):
    """Gradients of sum(<output, cotangent>) for ``inputs``, None for an unused one."""
    return torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)


def _cotangent(like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=DEVICE).to(like.dtype)


@pytest.mark.parametrize(
    ("tokens", "size", "num_cols", "dtype"),
    [
        ((3, 5), 40, 24, torch.float32),  # one K block, masked
        ((70,), 150, 72, torch.float32),  # several token and K blocks, dphi split over tokens
        ((4, 3), 96, 150, torch.float32),  # several column blocks
        ((2, 7), 130, 24, torch.bfloat16),
    ],
)
def test_rms_projection(tokens, size: int, num_cols: int, dtype: torch.dtype) -> None:
    torch.manual_seed(size)
    x = _leaf(*tokens, size, dtype=dtype)
    phi = _leaf(size, num_cols, scale=0.2)
    projection = fused_rms_projection(x, phi, eps=1e-5)
    proj, inv_rms = projection
    xf = x.float()
    ref_proj = xf @ phi
    ref_inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + 1e-5)
    assert proj.shape == (*tokens, num_cols) and inv_rms.shape == (*tokens, 1)
    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(proj, ref_proj, **tol)
    torch.testing.assert_close(inv_rms, ref_inv, **tol)

    grad = Projection(_cotangent(proj, 1), _cotangent(inv_rms, 2))
    ref_dx, ref_dphi = _reference_grads([ref_proj, ref_inv], [x, phi], grad)
    # dx is added to what the gradient buffer holds: start from something nonzero
    start = torch.randn(x.shape, device=DEVICE)
    dx = start.clone()
    args = (x.detach(), phi.detach(), projection, grad)
    dphi = fused_rms_projection_backward(*args, dx)
    grad_tol = tol if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(dx - start, ref_dx.float(), **grad_tol)
    torch.testing.assert_close(dphi, ref_dphi, **grad_tol)
    # without a gradient buffer, dphi only
    torch.testing.assert_close(fused_rms_projection_backward(*args, None), dphi)


# ---------------------------------------------------------------------------------------
# branch input (width connection)
# ---------------------------------------------------------------------------------------

# long reductions over D (dH from per-block partials): fp32 rounding grows with D
ROW_BLOCKS_GRAD_TOL = {"atol": 1e-4, "rtol": 1e-5}
WIDTH_CASES = [(2, 1), (3, 1), (4, 1), (8, 1), (3, 3), (4, 4), (8, 8)]  # (N, k)


def _coefficients(tokens: tuple[int, ...], k: int, num_rows: int, static: bool):
    lead = () if static else tokens
    h_pre = _leaf(*lead, k, num_rows, scale=0.5, shift=0.3)
    h_post = _leaf(*lead, num_rows, scale=0.5, shift=1.0)
    h_res = _leaf(*lead, num_rows, num_rows, scale=0.5)
    return h_pre, h_post, h_res


def _check_branch_input(rows, h_pre, dtype=torch.float32, grad_tol=None) -> None:
    """The kernel's h0, dH_pre and dX (added to a buffer) against autograd of the reference."""
    ours = fused_branch_input(rows, h_pre)
    ref = streams.branch_input(rows.float(), h_pre).to(dtype)
    _close(ours, ref, dtype)
    grad = _cotangent(ref, 3)
    ref_rows, ref_pre = _reference_grads([ref], [rows, h_pre], [grad])
    start = torch.randn(rows.shape, device=DEVICE)
    d_rows = start.clone()
    d_pre = fused_branch_input_backward(rows.detach(), h_pre.detach(), grad, d_rows)
    _close(d_pre, ref_pre, dtype, grad_tol)
    _close((d_rows - start).to(dtype), ref_rows, dtype, grad_tol)
    torch.testing.assert_close(
        fused_branch_input_backward(rows.detach(), h_pre.detach(), grad), d_pre
    )


@pytest.mark.parametrize(("num_rows", "k"), WIDTH_CASES)
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_branch_input(num_rows: int, k: int, static: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(num_rows * 10 + k)
    tokens, row_size = (2, 3), 24
    rows = _leaf(*tokens, num_rows, row_size, dtype=dtype)
    h_pre, _, _ = _coefficients(tokens, k, num_rows, static)
    _check_branch_input(rows, h_pre, dtype)


@pytest.mark.parametrize(("num_rows", "k"), [(4, 1), (8, 8)])
def test_branch_input_several_row_blocks(num_rows: int, k: int) -> None:
    """D larger than one block: dH_pre is summed over the D-block partials."""
    torch.manual_seed(0)
    rows = _leaf(3, num_rows, 700)
    h_pre = _leaf(3, k, num_rows)
    _check_branch_input(rows, h_pre, grad_tol=ROW_BLOCKS_GRAD_TOL)


# ---------------------------------------------------------------------------------------
# merge of the branch output (depth connection, + bias, dropout)
# ---------------------------------------------------------------------------------------


def _check_merge(rows, out, bias, h_post, h_res, dtype=torch.float32, grad_tol=None) -> None:
    """The kernel's X' and its five gradients against autograd of the reference."""
    # no dropout (outside training the callers pass probability 0)
    ours = fused_merge_branch_output(rows, BranchOutput(out, bias), h_post, h_res)
    y = out.float() + (0.0 if bias is None else bias.float())
    ref = streams.merge_branch_output(rows.float(), y, h_post, h_res).to(dtype)
    _close(ours, ref, dtype)
    grad = _cotangent(ref, 4)
    inputs = (rows, out, bias, h_post, h_res)
    given = [t for t in inputs if t is not None]
    expected = iter(_reference_grads([ref], given, [grad]))
    rows, out, bias, h_post, h_res = (None if t is None else t.detach() for t in inputs)
    got = fused_merge_branch_output_backward(rows, BranchOutput(out, bias), h_post, h_res, grad)
    for t, ours_grad in zip(inputs, got, strict=True):
        if t is None:
            assert ours_grad is None
            continue
        ref_grad = next(expected)
        _close(ours_grad.to(ref_grad.dtype), ref_grad, dtype, grad_tol)
    assert got[0].dtype == torch.float32, "dX is fp32: the width connection adds to it"


@pytest.mark.parametrize(("num_rows", "k"), WIDTH_CASES)
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_merge_branch_output(
    num_rows: int, k: int, static: bool, dtype: torch.dtype, with_bias: bool
) -> None:
    torch.manual_seed(num_rows * 10 + k)
    tokens, row_size = (2, 3), 24
    rows = _leaf(*tokens, num_rows, row_size, dtype=dtype)
    out = _leaf(*tokens, k * row_size, dtype=dtype)
    bias = _leaf(k * row_size, scale=0.5, dtype=dtype) if with_bias else None
    _, h_post, h_res = _coefficients(tokens, k, num_rows, static)
    _check_merge(rows, out, bias, h_post, h_res, dtype)


def test_merge_branch_output_several_row_blocks() -> None:
    torch.manual_seed(0)
    num_rows, row_size = 4, 1100
    _, h_post, h_res = _coefficients((2,), 1, num_rows, static=False)
    args = (_leaf(2, num_rows, row_size), _leaf(2, row_size), _leaf(row_size), h_post, h_res)
    _check_merge(*args, grad_tol=ROW_BLOCKS_GRAD_TOL)


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_fp16_state(static: bool) -> None:
    """A whole sublayer's passes with an fp16 state and branch (fp32 coefficients)."""
    torch.manual_seed(0)
    dtype, num_rows, row_size = torch.float16, 4, 40
    rows = _leaf(3, num_rows, row_size, dtype=dtype)
    out = _leaf(3, row_size, dtype=dtype)
    bias = _leaf(row_size, scale=0.5, dtype=dtype)
    h_pre, h_post, h_res = _coefficients((3,), 1, num_rows, static)
    _check_branch_input(rows, h_pre, dtype)
    _check_merge(rows, out, bias, h_post, h_res, dtype)


def _keep_mask(tokens: int, num_rows: int, k: int, row_size: int, p: float, seed: int):
    """The kernel's keep mask, read off a forward with X = 0, y = 1, H_post = 1: [T, N, D]."""
    zeros = torch.zeros(tokens, num_rows, row_size, device=DEVICE)
    ones = torch.ones(tokens, k * row_size, device=DEVICE)
    h_post = torch.ones(num_rows, device=DEVICE)
    h_res = torch.zeros(num_rows, num_rows, device=DEVICE)
    new = fused_merge_branch_output(zeros, BranchOutput(ones, None, p, seed), h_post, h_res)
    new = new.unflatten(-1, (num_rows, row_size))
    scale = torch.tensor(1.0 / (1.0 - p)).item()  # in fp32
    assert set(new.unique().tolist()) <= {0.0, scale}
    return new != 0


@pytest.mark.parametrize("k", [1, 4], ids=["k1", "kN"])
def test_merge_branch_output_dropout(k: int) -> None:
    torch.manual_seed(0)
    tokens, num_rows, row_size, p, seed = 6, 4, 100, 0.25, 1234
    keep = _keep_mask(tokens, num_rows, k, row_size, p, seed)
    assert abs((~keep).float().mean().item() - p) < 0.04
    # a different seed gives a different mask, the same seed the same one
    assert not torch.equal(keep, _keep_mask(tokens, num_rows, k, row_size, p, seed + 1))
    assert torch.equal(keep, _keep_mask(tokens, num_rows, k, row_size, p, seed))
    # k = 1: y is dropped once, and every row receives the same dropped y
    assert bool((keep == keep[:, :1]).all()) == (k == 1)

    rows = _leaf(tokens, num_rows, row_size)
    out = _leaf(tokens, k * row_size)
    bias = _leaf(k * row_size, scale=0.5)
    _, h_post, h_res = _coefficients((tokens,), k, num_rows, static=False)
    inputs = (rows, out, bias, h_post, h_res)
    branch = BranchOutput(out, bias, p, seed)
    ours = fused_merge_branch_output(rows, branch, h_post, h_res)
    assert torch.equal(ours, fused_merge_branch_output(rows, branch, h_post, h_res))
    # the reference with the same mask: the backward regenerates exactly the forward's mask
    y = (out + bias).unflatten(-1, (k, row_size))
    y = y * keep[:, :k] / (1.0 - p)
    ref = (h_res @ rows + h_post.unsqueeze(-1) * y).flatten(-2)
    _close(ours, ref)
    grad = _cotangent(ref, 5)
    rows, out, bias, h_post, h_res = (t.detach() for t in inputs)
    branch = BranchOutput(out, bias, p, seed)
    got = fused_merge_branch_output_backward(rows, branch, h_post, h_res, grad)
    for ours_grad, ref_grad in zip(got, _reference_grads([ref], inputs, [grad]), strict=True):
        _close(ours_grad, ref_grad)
    grad_out = got[1].unflatten(-1, (k, row_size))
    if k == 1:  # exactly zero where y was dropped, nonzero elsewhere
        assert torch.equal(grad_out[:, 0] == 0, ~keep[:, 0])


def test_supported() -> None:
    assert availability.HAVE_TRITON
    x = torch.zeros(2, device=DEVICE)
    assert availability.supported(x, None, x.bfloat16(), x.half())
    assert not availability.supported(x, x.double())
    assert "torch.float64" in availability.unsupported_reason(x.double())
    with pytest.raises(ValueError, match=r"fp32, bf16 or fp16 tensors, got torch\.float64"):
        fused_branch_input(x.double().view(1, 2, 1), torch.ones(1, 2, device=DEVICE))
