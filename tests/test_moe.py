"""Mixture-of-experts GPTs with hyper-connections: training with megatron-core's optimizer,
expert parallelism (EP=2 in two gloo processes) against EP=1, and what is refused."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.models import (
    EXPERT_KEY,
    VARIANTS,
    assert_grads_close,
    build_gpt,
    ddp,
    ddp_step,
    lm_batch,
    main_grads,
    make_config,
    perturb_hyper_connections,
    renumbered,
    snapshot,
    train_step,
)

MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_token_dispatcher_type="alltoall",
    # megatron-core's expert MLP adds its bias in place on a view, which autograd rejects.
    add_bias_linear=False,
)
MOE_VARIANTS = ["DHCx4", "mHCx4"]


def _moe_gpt(variant: str, **overrides: Any) -> torch.nn.Module:
    model = build_gpt(make_config(VARIANTS[variant], **MOE, **overrides), seed=None)
    perturb_hyper_connections(model, seed=5, scale=0.05)
    return model


# --------------------------------------------------------------------------------------------
# training with megatron-core's optimizer, one process


@pytest.mark.usefixtures("megatron_single_rank")
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_with_hyper_connections_trains(variant: str) -> None:
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron.hyper_connections.transformer_layer import HyperConnectionTransformerLayer

    torch.manual_seed(3)
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    model = ddp(_moe_gpt(variant))
    layers = model.module.decoder.layers
    assert all(isinstance(layer, HyperConnectionTransformerLayer) for layer in layers)
    assert all(isinstance(layer.mlp, MoELayer) for layer in layers)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0), [model]
    )
    hc_before = {
        name: p.detach().clone()
        for name, p in model.module.named_parameters()
        if "hyper_conn" in name
    }
    batch = lm_batch(seed=31)  # a fixed batch: the loss must fall on it step after step
    losses = []
    for _ in range(5):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses.extend(train_step(model, [batch]))
        update_ok, grad_norm, _ = optimizer.step()
        assert update_ok, "optimizer step was skipped"
        assert grad_norm is not None and torch.isfinite(torch.tensor(grad_norm)), grad_norm

    assert all(torch.isfinite(torch.tensor(losses))), f"non-finite loss: {losses}"
    assert all(b < a for a, b in itertools.pairwise(losses)), f"loss did not decrease: {losses}"
    params = dict(model.module.named_parameters())
    for name, before in hc_before.items():
        assert not torch.equal(params[name].detach(), before), f"{name} was not updated"
    for name in ("router.weight", "experts.local_experts.0.linear_fc1.weight"):
        expert_params = [p for n, p in params.items() if name in n]
        assert expert_params and all(p.main_grad.abs().sum() > 0 for p in expert_params), name


# --------------------------------------------------------------------------------------------
# EP=2 with the all-to-all dispatcher == EP=1, with hyper-connections


def _ep_vs_single(rank: int, world_size: int, variants: list[str]) -> None:
    from megatron.core import parallel_state

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    batch = lm_batch(seed=21)  # the same on both ranks: EP=2 then sees every token twice
    for variant in variants:
        # Reference: EP=1 (DP=2 with the same batch on both ranks, so DP averaging is exact).
        initialize_distributed(expert_model_parallel_size=1, seed=1)
        ref = ddp(_moe_gpt(variant))
        ref_loss = ddp_step(ref, batch)
        ref_weights = snapshot(ref.module.state_dict())
        ref_grads = main_grads(ref)
        parallel_state.destroy_model_parallel()

        initialize_distributed(expert_model_parallel_size=world_size, seed=2)
        num_experts = MOE["num_moe_experts"]
        offset = parallel_state.get_expert_model_parallel_rank() * num_experts // world_size
        bare = _moe_gpt(variant, expert_model_parallel_size=world_size)
        assert len(bare.decoder.layers[0].mlp.experts.local_experts) == num_experts // world_size
        bare.load_state_dict(renumbered(ref_weights, bare.state_dict(), EXPERT_KEY, offset))
        model = ddp(bare)
        loss = ddp_step(model, batch)

        torch.testing.assert_close(
            loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m, v=variant: f"{v}: EP=2 loss: {m}"
        )
        expected = renumbered(ref_grads, dict(bare.named_parameters()), EXPERT_KEY, offset)
        grads = main_grads(model)
        assert any("hyper_conn" in name for name in grads)
        assert_grads_close(
            grads, expected, lambda n, v=variant: f"{v}: grad of {n} differs, EP=2 vs EP=1"
        )
        parallel_state.destroy_model_parallel()
    destroy_distributed()


def test_expert_parallel_with_hyper_connections_matches_single_rank() -> None:
    run_distributed(_ep_vs_single, 2, MOE_VARIANTS, timeout=180)
