"""Multi-token prediction with hyper-connections: the MTP block (megatron-core's, residual
layers) reads the decoder's reduced single-stream output, so an HC model with MTP is the
residual model with MTP at init, MTP losses included."""

import math

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel as MCoreGPTModel
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig as MCoreConfig

from megatron.hyper_connections import get_hyper_connection_spec
from tests.models import (
    TINY,
    VARIANTS,
    build_gpt,
    lm_batch,
    lm_loss,
    make_config,
    perturb_hyper_connections,
)

pytestmark = pytest.mark.usefixtures("megatron_single_rank")

MTP = dict(mtp_num_layers=2)


def _step(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(LM loss, the MTP losses megatron-core tracks, gradients) of one training step."""
    MTPLossLoggingHelper.tracker.clear()
    model.train()
    loss = lm_loss(model, lm_batch(seed=3))
    loss.backward()
    tracker = MTPLossLoggingHelper.tracker
    # megatron-core 0.16 keeps them as "values", later releases as "loss_values".
    mtp_losses = tracker.get("loss_values", tracker.get("values")).clone()
    MTPLossLoggingHelper.tracker.clear()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), mtp_losses, grads


@pytest.mark.parametrize("variant", ["DHCx4", "SHCx2", "mHCx4", "Frac4"])
def test_hyper_connection_model_with_mtp_is_the_residual_model_at_init(variant: str) -> None:
    residual = build_gpt(MCoreConfig(**TINY, **MTP), seed=5, model_cls=MCoreGPTModel)
    model = build_gpt(make_config(VARIANTS[variant], **MTP), seed=5)
    assert len(model.mtp.layers) == MTP["mtp_num_layers"]
    loss, mtp_losses, grads = _step(model)
    ref_loss, ref_mtp_losses, ref_grads = _step(residual)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert (mtp_losses > 0).all(), mtp_losses
    torch.testing.assert_close(mtp_losses, ref_mtp_losses, rtol=1e-5, atol=0)
    for name, ref_grad in ref_grads.items():  # the MTP losses' gradients included
        torch.testing.assert_close(
            grads[name], ref_grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4"])
def test_gradients_reach_every_parameter_with_mtp(variant: str) -> None:
    model = build_gpt(make_config(VARIANTS[variant], **MTP), seed=5)
    perturb_hyper_connections(model)
    _, _, grads = _step(model)
    missing = [name for name, grad in grads.items() if grad is None or not grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert any(name.startswith("mtp.") for name in grads)
    assert any(".hyper_conn_" in name for name in grads)


def test_mtp_block_of_hyper_connection_layers_is_refused() -> None:
    config = make_config(VARIANTS["DHCx4"], **MTP)
    hc_layers = TransformerBlockSubmodules(
        layer_specs=[get_hyper_connection_spec(get_gpt_layer_local_spec())]
    )
    spec = get_gpt_mtp_block_spec(config, hc_layers, use_transformer_engine=False)
    with pytest.raises(ValueError, match=r"^mtp_block_spec has hyper-connection layers; "):
        build_gpt(config, mtp_block_spec=spec)


# --------------------------------------------------------------------------------------------
# The trainer's --mtp-num-layers


def _train_both(rank: int, world_size: int, runs: dict[str, list[str]]) -> None:
    from megatron.hyper_connections.training.pretrain import main

    for argv in runs.values():
        main(argv)


def test_trainer_trains_hc_with_mtp_from_the_residual_models_loss(tmp_path) -> None:
    import json

    from megatron.hyper_connections.training.monitoring import JSONL_FILE
    from tests.distributed import run_distributed

    common = [
        *("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"),
        *("--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "4"),
        *("--lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0"),
        *("--mtp-num-layers", "1", "--position-embedding-type", "rope"),
        *("--data-cache-path", str(tmp_path / "cache")),
    ]
    variants = {
        "residual": [],
        "DHCx4": ["--use-hyper-connections", "--num-residual-streams", "4"],
        "mHCx4-lite": [
            *("--use-hyper-connections", "--num-residual-streams", "4"),
            *("--use-manifold-hyper-connections", "--mhc-h-res-parameterization", "permutations"),
        ],
    }
    runs = {
        name: [*common, *flags, "--save", str(tmp_path / name)] for name, flags in variants.items()
    }
    run_distributed(_train_both, 1, runs, timeout=300)

    def losses(name: str) -> list[float]:
        lines = (tmp_path / name / JSONL_FILE).read_text().splitlines()
        return [json.loads(line)["lm loss"] for line in lines if '"lm loss"' in line]

    residual = losses("residual")
    assert len(residual) == 4 and all(math.isfinite(loss) for loss in residual)
    for name in ("DHCx4", "mHCx4-lite"):
        hc = losses(name)
        assert len(hc) == 4 and all(math.isfinite(loss) for loss in hc), hc
        # HC is the residual network at init: the first step's loss is the same.
        assert hc[0] == pytest.approx(residual[0], rel=1e-5), (name, hc, residual)
        assert hc[-1] < hc[0], f"{name}: loss does not fall: {hc}"
