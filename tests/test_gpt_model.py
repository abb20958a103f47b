"""GPTModel with hyper-connections against megatron-core's residual GPTModel, one process."""

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron.hyper_connections import GPTModel, get_hyper_connection_spec
from megatron.hyper_connections.hyper_connection import HyperConnectionBase
from megatron.hyper_connections.transformer_layer import HyperConnectionTransformerLayer
from tests.models import (
    BATCH,
    SEQ,
    VARIANTS,
    build_baseline,
    build_gpt,
    logits,
    make_config,
)

pytestmark = pytest.mark.usefixtures("megatron_single_rank")


def _hc_param_names(model: torch.nn.Module) -> set[str]:
    return {
        f"{name}.{p}"
        for name, module in model.named_modules()
        if isinstance(module, HyperConnectionBase)
        for p, _ in module.named_parameters()
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_residual_equivalence_at_init(variant):
    """Baseline weights + HC parameters at their init reproduce the baseline's logits."""
    baseline = build_baseline()
    model = build_gpt(make_config(VARIANTS[variant]), seed=99)
    result = model.load_state_dict(baseline.state_dict(), strict=False)
    assert set(result.missing_keys) == _hc_param_names(model), "only HC parameters may be new"
    assert not result.unexpected_keys

    expected = logits(baseline)
    got = logits(model)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, f"{variant}: relative difference {rel:.2e} from the residual baseline"


def test_same_seed_gives_the_baseline_weights():
    """HC parameters are initialised without drawing random numbers, so the rest of the model
    is initialised exactly as the baseline with the same seed."""
    baseline = build_baseline().state_dict()
    model = build_gpt(make_config(VARIANTS["mHCx4"])).state_dict()
    for name, tensor in baseline.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(model[name], tensor), name


def test_disabled_is_megatron_core_exactly():
    baseline = build_baseline()
    model = build_gpt(make_config())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in baseline.named_parameters()]
    out_base, out = logits(baseline), logits(model)
    assert torch.equal(out, out_base)
    out_base.float().square().mean().backward()
    out.float().square().mean().backward()
    for (name, p), (_, q) in zip(
        model.named_parameters(), baseline.named_parameters(), strict=True
    ):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize(
    "variant", ["DHCx4", "SHCx2", "mHCx4", "mHCx2-3proposals", "mHCx4-lite", "Frac4"]
)
def test_every_parameter_gets_a_gradient(variant):
    model = build_gpt(make_config(VARIANTS[variant]))
    # Move off the init so that gradients proportional to the dynamic weights are non-zero.
    with torch.no_grad():
        for name in _hc_param_names(model):
            param = model.get_parameter(name)
            param.add_(0.05 * torch.randn_like(param))
    logits(model).float().square().mean().backward()

    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    biases = [
        n for n, _ in model.named_parameters() if n.endswith(("linear_proj.bias", "fc2.bias"))
    ]
    assert len(biases) == 2 * model.config.num_layers, "output biases are kept"


def test_hidden_dropout_applies_to_the_branch_output():
    config = make_config(VARIANTS["DHCx4"], hidden_dropout=0.5)
    model = build_gpt(config)
    model.train()
    tokens_logits = [logits(model) for _ in range(2)]
    assert not torch.equal(*tokens_logits), "hidden_dropout had no effect in training"
    model.eval()
    assert torch.equal(logits(model), logits(model))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_hyper_connections_dropout(dropout):
    model = build_gpt(make_config(VARIANTS["DHCx4"], hyper_connections_dropout=dropout))
    model.train()
    changed = not torch.equal(logits(model), logits(model))
    assert changed == (dropout > 0)


def test_layers_expose_the_monitoring_api():
    model = build_gpt(make_config(VARIANTS["mHCx4"]))
    layers = model.decoder.layers
    assert all(isinstance(layer, HyperConnectionTransformerLayer) for layer in layers)
    assert layers[0].hyper_conn_attn.get_log_amax() is None  # before any forward
    logits(model)
    for layer in layers:
        for hc in (layer.hyper_conn_attn, layer.hyper_conn_mlp):
            value = hc.get_log_amax()
            assert isinstance(value, float) and abs(value) < 1e-5  # mHC: Amax = 1 at init


def test_hyper_connection_parameters_are_marked_for_sequence_parallel():
    model = build_gpt(make_config(VARIANTS["DHCx4"]))
    for name in _hc_param_names(model):
        assert hasattr(model.get_parameter(name), "sequence_parallel"), name


def test_streams_are_expanded_and_reduced_once():
    """Layers carry [s, b, n*C]; attention, the final norm and the output layer see [s, b, C]."""
    model = build_gpt(make_config(VARIANTS["DHCx4"]))
    widths = {}

    def record(name):
        def hook(_module, args):
            widths[name] = args[0].shape[-1]

        return hook

    model.decoder.layers[0].self_attention.register_forward_pre_hook(record("attention"))
    model.decoder.layers[1].register_forward_pre_hook(
        lambda _m, _args, kwargs: widths.update(layer=kwargs["hidden_states"].shape[-1]),
        with_kwargs=True,
    )
    model.decoder.final_layernorm.register_forward_pre_hook(record("final_norm"))
    model.output_layer.register_forward_pre_hook(record("output_layer"))
    logits(model)
    hidden = model.config.hidden_size
    assert widths == dict(
        attention=hidden, layer=4 * hidden, final_norm=hidden, output_layer=hidden
    )


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4"])
def test_block_called_positionally_or_by_keyword(variant):
    """``block(hidden_states, attention_mask)`` (as megatron-core's CLIP ViT calls its decoder)
    and the keyword call give the same output: the residual block's, at init."""
    baseline = build_baseline()
    model = build_gpt(make_config(VARIANTS[variant]), seed=99)
    model.load_state_dict(baseline.state_dict(), strict=False)
    hidden = torch.randn(
        SEQ, BATCH, model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )

    expected = baseline.decoder(hidden, None)
    positional = model.decoder(hidden, None)
    keyword = model.decoder(hidden_states=hidden, attention_mask=None)
    assert positional.shape == expected.shape
    assert torch.equal(positional, keyword)
    torch.testing.assert_close(positional, expected, rtol=1e-5, atol=1e-5)


def test_spec_conversion_keeps_everything_but_the_layer_class():
    spec = get_gpt_layer_local_spec()
    converted = get_hyper_connection_spec(spec)
    assert converted.module is HyperConnectionTransformerLayer
    assert converted.submodules is spec.submodules
    assert get_hyper_connection_spec(converted) is converted
    assert spec.module.__name__ == "TransformerLayer", "the caller's spec is not modified"
    with pytest.raises(ValueError, match="cannot add hyper-connections to a spec of Linear"):
        get_hyper_connection_spec(torch.nn.Linear)


def test_moe_layers_are_wrapped():
    config = make_config(
        VARIANTS["mHCx4"],
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        # megatron-core's expert MLP adds its bias in place on a view, which autograd rejects.
        add_bias_linear=False,
    )
    model = build_gpt(config, spec=get_gpt_layer_local_spec(num_experts=4))
    out = logits(model)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert model.decoder.layers[0].hyper_conn_mlp.bias.grad is not None


def test_plain_megatron_config_builds_the_baseline():
    from megatron.core.transformer.transformer_config import TransformerConfig as MCoreConfig

    from tests.models import TINY

    model = build_gpt(MCoreConfig(**TINY))
    assert isinstance(model, GPTModel)
    assert not _hc_param_names(model)
