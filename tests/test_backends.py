"""Which backend a configuration gets and why (``backends.select_backend``), that a module runs
on it, and that a fallback is logged, never silent."""

import logging

import pytest
import torch

from megatron.hyper_connections import backends
from megatron.hyper_connections.autograd import StateChain
from megatron.hyper_connections.backends import (
    COMPILED,
    EAGER,
    FUSED,
    LEAN,
    PYTORCH,
    TRITON,
    config_backend,
    select_backend,
)
from megatron.hyper_connections.hyper_connection import HyperConnection
from megatron.hyper_connections.kernels import availability
from megatron.hyper_connections.manifold_hyper_connection import ManifoldHyperConnection
from megatron.hyper_connections.transformer_layer import build_hyper_connection
from tests.models import VARIANTS, make_config

MHC = {"manifold": True}
FUSE = {"fused_kernels": True}
COMPILE = {"compile_coefficients": True}
LITE = {"h_res_parameterization": "permutations"}

# select_backend's options -> (backend, coefficients, logged as a fallback, part of the reason)
TABLE = [
    ({}, LEAN, EAGER, False, "memory-lean autograd with PyTorch ops"),
    (COMPILE, LEAN, COMPILED, False, "memory-lean autograd"),
    (MHC, LEAN, EAGER, False, "memory-lean autograd"),
    ({**MHC, "log_domain_sinkhorn": True}, LEAN, EAGER, False, "memory-lean autograd"),
    ({"stream_dropout": 0.1}, PYTORCH, EAGER, False, "per-stream dropout 0.1"),
    ({"stream_dropout": 0.1, **COMPILE}, PYTORCH, COMPILED, False, "plain autograd"),
    ({"stream_dropout": 0.1, **FUSE}, PYTORCH, EAGER, True, "fused kernels have no per-stream"),
    ({**MHC, "stream_dropout": 0.1, **FUSE}, PYTORCH, EAGER, True, "are not used"),
    (FUSE, FUSED, EAGER, False, "HC's few coefficient ops in PyTorch"),
    ({**FUSE, **COMPILE}, FUSED, COMPILED, False, "Triton kernels for the passes over the state"),
    ({**FUSE, **MHC}, FUSED, TRITON, False, "and for mHC's coefficients"),
    ({**FUSE, **MHC, **COMPILE}, FUSED, TRITON, True, "torch.compile is not used"),
    ({**FUSE, **MHC, "log_domain_sinkhorn": True}, FUSED, EAGER, True, "exp-domain"),
    ({**FUSE, **MHC, "log_domain_sinkhorn": True, **COMPILE}, FUSED, COMPILED, True, "exp-domain"),
    ({**MHC, **LITE}, LEAN, EAGER, False, "memory-lean autograd"),
    ({**FUSE, **MHC, **LITE}, FUSED, TRITON, False, "and for mHC-lite's coefficients"),
    ({**FUSE, **MHC, **LITE, **COMPILE}, FUSED, TRITON, True, "torch.compile is not used"),
    ({**FUSE, **MHC, **LITE, "log_domain_sinkhorn": True}, FUSED, TRITON, False, "mHC-lite's"),
]


@pytest.mark.parametrize(("options", "name", "coefficients", "fallback", "reason"), TABLE)
def test_backend_table(options, name, coefficients, fallback, reason) -> None:
    if name == FUSED and not availability.HAVE_TRITON:
        pytest.skip("Triton is not installed")
    backend = select_backend(**options)
    assert (backend.name, backend.coefficients, backend.fallback) == (name, coefficients, fallback)
    assert reason in backend.reason, backend.reason


def test_fused_kernels_without_triton_fall_back_to_lean(monkeypatch) -> None:
    monkeypatch.setattr(availability, "HAVE_TRITON", False)
    backend = select_backend(**FUSE, **MHC)
    assert (backend.name, backend.coefficients, backend.fallback) == (LEAN, EAGER, True)
    assert "Triton is not installed" in backend.reason


FUSED_KERNELS = {"hyper_connections_fused_kernels": True}
CONFIGS = [  # (variant, config options)
    ("DHCx4", {}),
    ("DHCx4", {"hyper_connections_dropout": 0.1}),
    ("DHCx4", {"hyper_connections_dropout": 0.1, **FUSED_KERNELS}),
    ("DHCx4", {"hyper_connections_compile": True}),
    ("mHCx4", FUSED_KERNELS),
    ("mHCx4-log", FUSED_KERNELS),
    ("mHCx4-lite", FUSED_KERNELS),
    ("Frac4", FUSED_KERNELS),
]


@pytest.mark.parametrize(("variant", "options"), CONFIGS)
def test_config_backend_is_the_modules_backend(variant: str, options: dict) -> None:
    """What ``config_backend`` says of a config is what the modules it builds run on."""
    if options.get("hyper_connections_fused_kernels") and not availability.HAVE_TRITON:
        pytest.skip("Triton is not installed")
    config = make_config(VARIANTS[variant], **options)
    expected = config_backend(config)
    for sublayer in (0, 1):
        module = build_hyper_connection(config, sublayer)
        assert repr(module.backend) == repr(expected)


def test_a_fallback_is_logged_once(caplog) -> None:
    backends.log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        for _ in range(3):
            hc = HyperConnection(8, 2, dropout=0.1)
            hc.use_fused_kernels()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert "per-stream dropout 0.1" in messages[0] and "are not used" in messages[0]
    assert hc.backend.name == PYTORCH


def _modules(**kwargs):
    torch.manual_seed(0)
    lean = ManifoldHyperConnection(8, 2, **kwargs).double()
    with torch.no_grad():
        for p in lean.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = ManifoldHyperConnection(8, 2, **kwargs).double()
    fused.load_state_dict(lean.state_dict())
    fused.use_fused_kernels()
    return lean, fused


@pytest.mark.skipif(not availability.HAVE_TRITON, reason="Triton is not installed")
def test_fused_module_on_tensors_the_kernels_cannot_take_logs_and_runs_unfused(caplog) -> None:
    """fp64 (never taken by the kernels): the call runs on the lean backend, and says so."""
    lean, fused = _modules()
    assert fused.backend.name == FUSED
    state = torch.randn(3, 2 * 8, dtype=torch.float64, requires_grad=True)
    branch = torch.nn.Tanh()
    backends.log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        out = fused(state, branch)
        fused(state, branch)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "torch.float64" in messages[0], messages
    assert "run on the lean backend" in messages[0]
    torch.testing.assert_close(out, lean(state, branch), rtol=0, atol=0)


@pytest.mark.parametrize("module", ["HC", "mHC"])
def test_no_grad_runs_the_same_forward(module: str) -> None:
    """Inference needs no separate path: under no_grad the autograd functions run forward."""
    torch.manual_seed(0)
    hc = HyperConnection(8, 4) if module == "HC" else ManifoldHyperConnection(8, 4)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = torch.randn(2, 3, 4 * 8)
    branch = torch.nn.Tanh()
    with_grad = hc(state.requires_grad_(), branch)
    with torch.no_grad():
        without = hc(state, branch)
    assert not without.requires_grad
    assert torch.equal(without, with_grad.detach())


def test_state_chain_needs_the_lean_or_fused_backend() -> None:
    hc = HyperConnection(8, 2, dropout=0.1)
    with pytest.raises(ValueError, match="a state chain needs the lean or fused backend"):
        hc.use_state_chain(StateChain(2), 0)
