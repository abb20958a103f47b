"""hyper_connections_fused_kernels in a megatron-core GPT: the fused backend against the lean
one (the same autograd functions with PyTorch ops).

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before they are defined); the kernels' own tests are in test_kernels.py.
"""

import pytest
import torch

from megatron.hyper_connections.backends import FUSED
from megatron.hyper_connections.hyper_connection import HyperConnectionBase
from megatron.hyper_connections.kernels import availability
from megatron.hyper_connections.saved_memory import saved_tensor_bytes
from tests.models import (
    VARIANTS,
    build_gpt,
    lm_batch,
    lm_loss,
    make_config,
    perturb_hyper_connections,
)

pytestmark = [
    pytest.mark.usefixtures("megatron_single_rank"),
    pytest.mark.skipif(not availability.HAVE_TRITON, reason="Triton is not installed"),
    pytest.mark.skipif(
        availability.HAVE_TRITON and not availability.supported(torch.zeros(1)),
        reason="no CUDA and Triton's interpreter is off (TRITON_INTERPRET unset)",
    ),
]


def _loss_and_grads(config):
    model = build_gpt(config)
    perturb_hyper_connections(model)
    batch = lm_batch(seed=5)
    loss, saved = saved_tensor_bytes(lambda: lm_loss(model, batch), exclude=model.parameters())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, saved


def _record_calls(monkeypatch, names: list[str]) -> list[str]:
    """The names of the ``TritonOps`` methods among ``names`` called from now on, in order."""
    from megatron.hyper_connections.kernels.ops import TritonOps

    calls = []
    for name in names:
        kernel = getattr(TritonOps, name)

        def record(*args, _name=name, _kernel=kernel):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(TritonOps, name, staticmethod(record))
    return calls


# The coefficient kernel a variant runs under fused kernels (HC and log-domain mHC: none).
COEFFICIENT_KERNELS = {
    "mHCx4": "mhc_coefficients",
    "mHCx2-3proposals": "mhc_coefficients",
    "mHCx4-lite": "mhc_lite_coefficients",
}


@pytest.mark.parametrize(
    "variant", ["DHCx4", "mHCx4", "mHCx2-3proposals", "SHCx2", "mHCx4-log", "mHCx4-lite"]
)
@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "hc-recompute"])
def test_fused_kernels_match_the_pytorch_path(variant, recompute, monkeypatch):
    """Same loss, gradients and saved memory (the fused backend keeps what the lean one keeps,
    the state chain included), with the variant's coefficient kernel, if any."""
    options = dict(VARIANTS[variant], recompute_hyper_connections=recompute)
    calls = _record_calls(monkeypatch, ["mhc_coefficients", "mhc_lite_coefficients"])
    loss_ref, grads_ref, saved_ref = _loss_and_grads(make_config(options))
    assert calls == []
    loss, grads, saved = _loss_and_grads(make_config(options, hyper_connections_fused_kernels=True))
    expected = COEFFICIENT_KERNELS.get(variant)
    assert set(calls) == ({expected} if expected else set())
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert saved == saved_ref


def test_fused_kernels_use_the_kernels():
    """Guard against a silent fallback: every kernel runs in a fused forward/backward, and every
    module is on the fused backend."""
    names = [
        "project",
        "project_backward",
        "branch_input",
        "branch_input_backward",
        "merge",
        "merge_backward",
        "mhc_coefficients",
    ]
    with pytest.MonkeyPatch.context() as patch:
        calls = _record_calls(patch, names)
        config = make_config(VARIANTS["mHCx4"], hyper_connections_fused_kernels=True)
        model = build_gpt(config)
        lm_loss(model, lm_batch(seed=5)).backward()
    assert sorted(set(calls)) == sorted(names)
    backends = {m.backend.name for m in model.modules() if isinstance(m, HyperConnectionBase)}
    assert backends == {FUSED}


def test_fused_merge_applies_hidden_dropout():
    """The merged bias-dropout-add drops branch outputs in training, reproducibly per seed."""
    config = make_config(
        VARIANTS["DHCx4"], hyper_connections_fused_kernels=True, hidden_dropout=0.5
    )
    model = build_gpt(config)
    batch = lm_batch(seed=5)
    model.eval()
    evaluated = lm_loss(model, batch)
    model.train()
    torch.manual_seed(0)
    first = lm_loss(model, batch)
    first.backward()
    torch.manual_seed(0)
    again = lm_loss(model, batch)
    assert not torch.equal(first, evaluated), "no dropout in training"
    assert torch.equal(first, again), "same seed, different masks"
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
