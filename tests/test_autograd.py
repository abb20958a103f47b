"""The memory-lean autograd functions against plain autograd, and the state recomputation."""

import pytest
import torch
from torch import nn

from megatron.hyper_connections.autograd import StateChain
from megatron.hyper_connections.hyper_connection import HyperConnection, HyperConnectionBase
from megatron.hyper_connections.manifold_hyper_connection import ManifoldHyperConnection
from megatron.hyper_connections.saved_memory import saved_tensor_bytes
from megatron.hyper_connections.streams import branch_input, expand_streams, merge_branch_output

C, SEQ, BATCH = 16, 5, 3

MODULES = {
    "DHCx4": lambda i: HyperConnection(C, 4, layer_index=i),
    "DHCx4-notanh": lambda i: HyperConnection(C, 4, layer_index=i, use_tanh=False),
    "SHCx2": lambda i: HyperConnection(C, 2, layer_index=i, dynamic=False),
    "DHCx1": lambda i: HyperConnection(C, 1, layer_index=i),
    "Frac4": lambda i: HyperConnection(C, 1, num_fracs=4, layer_index=i),
    "mHCx4": lambda i: ManifoldHyperConnection(C, 4),
    "mHCx4-log-3proposals": lambda i: ManifoldHyperConnection(
        C, 4, log_domain_sinkhorn=True, num_proposals=3
    ),
    "mHCx2-static": lambda i: ManifoldHyperConnection(C, 2, dynamic=False),
    "mHCx4-lite": lambda i: ManifoldHyperConnection(C, 4, h_res_parameterization="permutations"),
    "mHCx3-lite-3proposals": lambda i: ManifoldHyperConnection(
        C, 3, num_proposals=3, h_res_parameterization="permutations"
    ),
}


def reference_sublayer(hc: HyperConnectionBase, state: torch.Tensor, branch) -> torch.Tensor:
    """The same sublayer with plain autograd through the pure functions."""
    rows = state.unflatten(-1, (hc.num_rows, hc.row_size))
    mixing = hc.mixing(rows)
    h0 = branch_input(rows, mixing.h_pre)
    return merge_branch_output(rows, branch(h0), mixing.h_post, mixing.h_res)


def _network(variant: str, num_sublayers: int, seed: int = 0):
    torch.manual_seed(seed)
    hcs = nn.ModuleList(MODULES[variant](i) for i in range(num_sublayers))
    with torch.no_grad():
        for p in hcs.parameters():
            p.add_(0.3 * torch.randn_like(p))  # off the init: every path matters
    branches = nn.ModuleList(
        nn.Sequential(nn.LayerNorm(C), nn.Linear(C, C), nn.Tanh()) for _ in range(num_sublayers)
    )
    state = expand_streams(torch.randn(SEQ, BATCH, C), hcs[0].num_residual_streams)
    # float64 so that the comparison is not blurred by summation order.
    return hcs.double(), branches.double(), state.double().requires_grad_()


def _run(hcs, branches, state, lean: bool):
    for hc, branch in zip(hcs, branches, strict=True):
        state = hc(state, branch) if lean else reference_sublayer(hc, state, branch)
    return state


def _grads(hcs, branches, state, lean: bool, chain: StateChain | None = None):
    for position, hc in enumerate(hcs):
        hc.use_state_chain(chain, position)
    for p in [*hcs.parameters(), *branches.parameters(), state]:
        p.grad = None
    out = _run(hcs, branches, state, lean)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    named = {f"hc.{n}": p.grad for n, p in hcs.named_parameters()}
    named.update({f"branch.{n}": p.grad for n, p in branches.named_parameters()})
    return out.detach(), {**named, "state": state.grad}


@pytest.mark.parametrize("variant", sorted(MODULES))
def test_lean_autograd_matches_plain_autograd(variant):
    hcs, branches, state = _network(variant, num_sublayers=3)
    out_ref, grads_ref = _grads(hcs, branches, state, lean=False)
    out, grads = _grads(hcs, branches, state, lean=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name, grad in grads_ref.items():
        assert grads[name] is not None, f"{variant}: {name} got no gradient"
        torch.testing.assert_close(
            grads[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{variant} {n}: {m}"
        )


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4", "SHCx2", "Frac4"])
@pytest.mark.parametrize("block_size", [1, 2, 3, 6])
def test_state_recompute_gives_the_same_gradients(variant, block_size):
    hcs, branches, state = _network(variant, num_sublayers=6)
    out_ref, grads_ref = _grads(hcs, branches, state, lean=True)
    out, grads = _grads(hcs, branches, state, lean=True, chain=StateChain(block_size))
    assert torch.equal(out, out_ref)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(
            grads[name], grad, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}"
        )


def saved_units(hc: nn.Module, fn, unit_numel: int) -> float:
    """What ``fn`` saves for backward beyond the parameters of ``hc``, in units of one [s, b, C]
    fp64 activation."""
    out, saved = saved_tensor_bytes(fn, exclude=hc.parameters())
    del out
    return saved / (8 * unit_numel)


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4", "mHCx4-log-3proposals", "mHCx4-lite"])
def test_lean_autograd_saves_state_and_branch_output_only(variant):
    """Per sublayer: X (n units) and y (1 unit), nothing else; the branch saves its own."""
    hcs, _, state = _network(variant, num_sublayers=1)
    hc, n = hcs[0], hcs[0].num_residual_streams
    identity = nn.Identity()
    unit = SEQ * BATCH * C
    lean = saved_units(hc, lambda: hc(state, identity), unit)
    plain = saved_units(hc, lambda: reference_sublayer(hc, state, identity), unit)
    assert lean == n + 1, f"{variant}: lean path saves {lean:.2f} units"
    assert lean < plain, f"{variant}: lean {lean:.2f} units, plain autograd {plain:.2f}"


def test_state_recompute_keeps_one_state_per_block():
    hcs, _, state = _network("DHCx4", num_sublayers=6)
    identity = nn.Identity()
    unit = SEQ * BATCH * C

    def run(chain):
        for position, hc in enumerate(hcs):
            hc.use_state_chain(chain, position)
        return saved_units(hcs, lambda: _run(hcs, [identity] * 6, state, lean=True), unit)

    per_sublayer, per_block_of_3 = run(None), run(StateChain(3))
    n = 4
    # Without recompute every sublayer keeps its state (n units); with blocks of 3 only
    # every third does, so 4 of the 6 states (16 units) are rebuilt instead of kept.
    assert per_sublayer - per_block_of_3 == pytest.approx(4 * n)


def test_state_chain_rejects_invalid_block_size():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        StateChain(0)


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4"])
def test_compiled_coefficients_match_eager(variant):
    """torch.compile'd coefficients, in forward and inside the lean backward, change nothing."""
    hcs, branches, state = _network(variant, num_sublayers=2)
    out_ref, grads_ref = _grads(hcs, branches, state, lean=True)
    for hc in hcs:
        hc.compile_coefficients()
    out, grads = _grads(hcs, branches, state, lean=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(
            grads[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{variant} {n}: {m}"
        )
