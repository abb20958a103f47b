"""Hyper-connections under tensor parallelism with sequence parallelism, two gloo processes."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.models import (
    VARIANTS,
    assert_grads_close,
    build_gpt,
    ddp,
    ddp_step,
    lm_batch,
    lm_loss,
    main_grads,
    make_config,
    perturb_hyper_connections,
    snapshot,
    tp_shard,
)


def _tp2_sp_vs_tp1(rank: int, world_size: int, variant: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    hc = VARIANTS[variant]
    batch = lm_batch(seed=7)

    # TP=1 reference (DP=2 on the same batch: DP averaging is the identity). HC parameters are
    # perturbed off their init so that every coefficient path is exercised.
    initialize_distributed(tensor_model_parallel_size=1, seed=1)
    reference = build_gpt(make_config(hc), seed=1)
    perturb_hyper_connections(reference)
    reference = ddp(reference)
    ref_loss = ddp_step(reference, batch)
    ref_weights = snapshot(reference.module.state_dict())
    ref_grads = main_grads(reference)
    parallel_state.destroy_model_parallel()

    initialize_distributed(tensor_model_parallel_size=world_size, seed=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = make_config(hc, tensor_model_parallel_size=world_size, sequence_parallel=True)
    bare = build_gpt(config, seed=2)
    params = dict(bare.named_parameters())
    bare.load_state_dict(
        {
            name: tp_shard(full, params.get(name), tp_rank, world_size)
            for name, full in ref_weights.items()
        }
    )
    model = ddp(bare)
    model.config.finalize_model_grads_func = finalize_model_grads
    loss = ddp_step(model, batch)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    expected = {n: tp_shard(g, params[n], tp_rank, world_size) for n, g in ref_grads.items()}
    assert_grads_close(
        main_grads(model), expected, lambda n: f"{variant}: grad of {n}, TP=2+SP vs TP=1"
    )

    # Optimizer steps on different data per step: replicated HC parameters must stay equal
    # on both tensor-parallel ranks, which holds only if their gradients were all-reduced.
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1), [model]
    )
    for step in range(3):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        lm_loss(model, lm_batch(seed=100 + step)).backward()
        finalize_model_grads([model])
        assert optimizer.step()[0]
    hc_params = {
        name: param for name, param in model.module.named_parameters() if ".hyper_conn_" in name
    }
    assert hc_params
    for name, param in hc_params.items():
        copies = [torch.empty_like(param) for _ in range(world_size)]
        torch.distributed.all_gather(
            copies, param.detach(), group=parallel_state.get_tensor_model_parallel_group()
        )
        assert torch.equal(copies[0], copies[1]), f"{variant}: {name} drifted across TP ranks"
        assert not torch.equal(param, ref_weights[name]), f"{variant}: {name} did not train"
    destroy_distributed()


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4", "mHCx4-lite", "Frac4"])
def test_tensor_parallel_with_sequence_parallel_matches_single_rank(variant):
    run_distributed(_tp2_sp_vs_tp1, 2, variant)
