"""TransformerConfig: the seed's options, their defaults, and every refused value."""

import math
import re

import pytest
import torch

from megatron.hyper_connections import TransformerConfig
from tests.models import TINY


def config(**options) -> TransformerConfig:
    return TransformerConfig(**{**TINY, **options})


def test_seed_readme_snippets_work_unchanged():
    hc = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        use_hyper_connections=True,
        num_residual_streams=4,
        hyper_connections_dropout=0.0,
        num_fracs=1,
    )
    mhc = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        use_hyper_connections=True,
        use_manifold_hyper_connections=True,
        num_residual_streams=4,
        hyper_connections_dropout=0.0,
        num_fracs=1,
        mhc_sinkhorn_iters=20,
        mhc_log_domain_sinkhorn=False,
        mhc_num_dynamic_alpha_proposals=1,
    )
    assert hc.num_residual_streams == mhc.num_residual_streams == 4


def test_defaults_disable_hyper_connections():
    c = config()
    assert (c.use_hyper_connections, c.num_residual_streams, c.num_fracs) == (False, 1, 1)
    assert (c.mhc_sinkhorn_iters, c.mhc_num_dynamic_alpha_proposals) == (20, 1)


HC = dict(use_hyper_connections=True)
MHC = dict(use_hyper_connections=True, use_manifold_hyper_connections=True, num_residual_streams=4)

INVALID = [
    (dict(HC, num_residual_streams=0), "num_residual_streams must be an integer >= 1, got num_residual_streams=0"),
    (dict(HC, num_residual_streams=2.5), "num_residual_streams must be an integer >= 1, got num_residual_streams=2.5"),
    (dict(HC, num_fracs=0), "num_fracs must be an integer >= 1, got num_fracs=0"),
    (dict(HC, num_fracs=3), "num_fracs=3 must divide hidden_size=32"),
    (dict(HC, num_fracs=2, num_residual_streams=2), "num_fracs=2 with num_residual_streams=2 is not supported"),
    (dict(HC, hyper_connections_dropout=1.0), "hyper_connections_dropout must be a float in [0, 1), got hyper_connections_dropout=1.0"),
    (dict(HC, hyper_connections_dropout=-0.1), "hyper_connections_dropout must be a float in [0, 1), got hyper_connections_dropout=-0.1"),
    (dict(MHC, mhc_h_res_parameterization="birkhoff"), "mhc_h_res_parameterization must be 'sinkhorn' or 'permutations', got mhc_h_res_parameterization='birkhoff'"),
    (dict(MHC, mhc_h_res_parameterization="permutations", mhc_sinkhorn_iters=5), "mhc_sinkhorn_iters=5 has no effect on mHC-lite (it is an option of mHC): leave mhc_sinkhorn_iters at its default 20"),
    (dict(MHC, mhc_h_res_parameterization="permutations", num_residual_streams=7), "mhc_h_res_parameterization='permutations' takes num_residual_streams <= 6 (n! H_res logits per token), got num_residual_streams=7"),
    (dict(HC, num_residual_streams=4, mhc_h_res_parameterization="permutations"), "mhc_h_res_parameterization='permutations' has no effect without use_manifold_hyper_connections=True"),
    (dict(MHC, mhc_sinkhorn_iters=0), "mhc_sinkhorn_iters must be an integer >= 1, got mhc_sinkhorn_iters=0"),
    (dict(MHC, mhc_num_dynamic_alpha_proposals=0), "mhc_num_dynamic_alpha_proposals must be an integer >= 1, got mhc_num_dynamic_alpha_proposals=0"),
    (dict(MHC, mhc_h_res_bias_init=math.inf), "mhc_h_res_bias_init must be a finite float, got mhc_h_res_bias_init=inf"),
    (dict(MHC, num_residual_streams=1), "use_manifold_hyper_connections=True needs num_residual_streams >= 2, got num_residual_streams=1"),
    (dict(MHC, num_residual_streams=1, num_fracs=4), "num_fracs=4 has no effect on mHC (it is an option of HC): leave num_fracs at its default 1"),
    (dict(MHC, hyper_connections_tanh=False), "hyper_connections_tanh=False has no effect on mHC (it is an option of HC): leave hyper_connections_tanh at its default True"),
    (dict(use_manifold_hyper_connections=True, num_residual_streams=4), "num_residual_streams=4 has no effect without use_hyper_connections=True"),
    (dict(use_manifold_hyper_connections=True), "use_manifold_hyper_connections=True has no effect without use_hyper_connections=True"),
    (dict(num_residual_streams=4), "num_residual_streams=4 has no effect without use_hyper_connections=True"),
    (dict(HC, num_residual_streams=4, mhc_sinkhorn_iters=5), "mhc_sinkhorn_iters=5 has no effect without use_manifold_hyper_connections=True"),
    (dict(HC, num_residual_streams=4, hyper_connections_recompute_block_size=0, recompute_hyper_connections=True), "hyper_connections_recompute_block_size must be None or an integer >= 1, got hyper_connections_recompute_block_size=0"),
    (dict(HC, num_residual_streams=4, hyper_connections_recompute_block_size=2), "hyper_connections_recompute_block_size=2 has no effect without recompute_hyper_connections=True"),
    (dict(HC, num_residual_streams=4, recompute_hyper_connections=True, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), "recompute_hyper_connections=True with recompute_granularity='full' is not supported"),
    (dict(HC, num_residual_streams=4, recompute_hyper_connections=True, hyper_connections_dropout=0.1), "recompute_hyper_connections=True needs hyper_connections_dropout=0, got hyper_connections_dropout=0.1"),
    (dict(recompute_hyper_connections=True), "recompute_hyper_connections=True has no effect without use_hyper_connections=True"),
]  # fmt: skip


@pytest.mark.parametrize(("options", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_values_name_the_option_the_value_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(**options)


def test_output_init_scaling():
    torch.manual_seed(0)
    plain = config(**HC, num_residual_streams=4)
    scaled = config(**HC, num_residual_streams=4, hyper_connections_scale_output_init=True)
    weights = []
    for c in (plain, scaled):
        weight = torch.empty(256, 256)
        torch.manual_seed(0)
        c.output_layer_init_method(weight)
        weights.append(weight)
    torch.testing.assert_close(weights[1], weights[0] / 2)


def test_fused_kernels_need_triton(monkeypatch):
    from megatron.hyper_connections.kernels import availability

    monkeypatch.setattr(availability, "HAVE_TRITON", False)
    with pytest.raises(ValueError) as error:
        TransformerConfig(
            **TINY,
            use_hyper_connections=True,
            num_residual_streams=4,
            hyper_connections_fused_kernels=True,
        )
    assert str(error.value).startswith("hyper_connections_fused_kernels=True needs Triton")


# megatron-core 0.20's config carries hyper-connection fields of its own: simulated here by
# giving the installed megatron-core's TransformerConfig a field of the package's name.
SHADOWED = """
import dataclasses
from megatron.core.transformer.transformer_config import TransformerConfig

field = dataclasses.field(default=1)
field.name, field.type, field._field_type = "num_residual_streams", int, dataclasses._FIELD
TransformerConfig.__dataclass_fields__["num_residual_streams"] = field
import megatron.hyper_connections.config
"""


def test_a_field_megatron_core_already_has_is_refused_at_import():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", SHADOWED], capture_output=True, text=True, cwd=repo, timeout=300
    )
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"ImportError: megatron-core [0-9.rc]+'s megatron\.core\.transformer\.transformer_config"
        r"\.TransformerConfig already defines num_residual_streams, which "
        r"megatron\.hyper_connections\.config\.TransformerConfig defines too: this package "
        r"supports megatron-core >=0\.15,<0\.20, whose config has none of its "
        r"hyper-connection fields; install such a megatron-core",
        message,
    ), message
