"""hyper_connections_fused_kernels in a megatron-core GPT: the Triton path against PyTorch.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before they are defined); the kernels' own tests are in test_triton_kernels.py.
"""

import pytest
import torch

from megatron.hyper_connections import triton_kernels
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
    pytest.mark.skipif(not triton_kernels.HAVE_TRITON, reason="Triton is not installed"),
]


def _loss_and_grads(config):
    model = build_gpt(config)
    perturb_hyper_connections(model)
    loss = lm_loss(model, lm_batch(seed=5))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4", "mHCx2-3proposals", "SHCx2"])
@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "hc-recompute"])
def test_fused_kernels_match_the_pytorch_path(variant, recompute):
    if not triton_kernels.supported(torch.zeros(1)):
        pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET unset)")
    options = dict(VARIANTS[variant], recompute_hyper_connections=recompute)
    loss_ref, grads_ref = _loss_and_grads(make_config(options))
    loss, grads = _loss_and_grads(make_config(options, hyper_connections_fused_kernels=True))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_kernels_use_the_kernels():
    """Guard against a silent fallback: every kernel runs in a fused forward/backward."""
    if not triton_kernels.supported(torch.zeros(1)):
        pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET unset)")
    calls = []
    names = ["rms_projection", "mhc_coefficients", "width_connection", "depth_connection"]
    originals = {name: getattr(triton_kernels, name) for name in names}
    patch = pytest.MonkeyPatch()
    for name, fn in originals.items():
        patch.setattr(
            triton_kernels, name, lambda *a, _n=name, _f=fn, **k: calls.append(_n) or _f(*a, **k)
        )
    try:
        _loss_and_grads(make_config(VARIANTS["mHCx4"], hyper_connections_fused_kernels=True))
    finally:
        patch.undo()
    assert sorted(set(calls)) == sorted(names)


def test_fused_depth_applies_hidden_dropout():
    """The merged bias-dropout-add drops branch outputs in training, reproducibly per seed."""
    if not triton_kernels.supported(torch.zeros(1)):
        pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET unset)")
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
