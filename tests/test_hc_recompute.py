"""The mHC paper's recomputation of states inside GPTModel: same gradients, less memory."""

import pytest
import torch

from megatron.hyper_connections.saved_memory import saved_tensor_bytes
from tests.models import BATCH, SEQ, VARIANTS, build_gpt, lm_batch, lm_loss, make_config

pytestmark = pytest.mark.usefixtures("megatron_single_rank")


def _loss_and_grads(config) -> tuple[float, dict, float]:
    model = build_gpt(config, seed=5)
    with torch.no_grad():  # HC parameters off their init, so that every path matters
        for name, param in model.named_parameters():
            if ".hyper_conn_" in name:
                param.add_(0.1 * torch.randn_like(param))
    batch = lm_batch(seed=3)
    loss, saved = saved_tensor_bytes(lambda: lm_loss(model, batch), exclude=model.parameters())
    loss.backward()
    unit = 4 * SEQ * BATCH * config.hidden_size
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.item(), grads, saved / unit


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4"])
@pytest.mark.parametrize("block_size", [None, 1, 3, 8])
def test_state_recompute_gives_the_same_gradients_and_saves_memory(variant, block_size):
    options = dict(num_layers=4, hidden_dropout=0.1)
    loss_ref, grads_ref, units_ref = _loss_and_grads(make_config(VARIANTS[variant], **options))
    config = make_config(
        VARIANTS[variant],
        recompute_hyper_connections=True,
        hyper_connections_recompute_block_size=block_size,
        **options,
    )
    loss, grads, units = _loss_and_grads(config)
    assert loss == loss_ref
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    n, sublayers = 4, 2 * config.num_layers
    size = block_size or 2 * n  # the default: one kept state per n layers
    rebuilt = sublayers - -(-sublayers // size)  # states not kept
    print(f"{variant} block {size}: {units_ref:.1f} -> {units:.1f} units saved for backward")
    assert units_ref - units == pytest.approx(n * rebuilt, abs=0.5)
