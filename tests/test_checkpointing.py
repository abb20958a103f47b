"""Distributed checkpoints of HC models (``megatron.hyper_connections.checkpointing``).

A checkpoint saved at TP=2 loads at PP=2 (two gloo processes); the HC record in the common
state dict refuses a checkpoint of another variant or stream count before reading any tensor;
a residual checkpoint continues as an HC model with the residual model's logits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron.hyper_connections.checkpointing import (
    HC_RECORD_KEY,
    load_checkpoint,
    save_checkpoint,
)
from tests.distributed import run_distributed
from tests.models import (
    BATCH,
    SEQ,
    VARIANTS,
    build_baseline,
    build_gpt,
    ddp,
    lm_batch,
    logits,
    make_config,
    perturb_hyper_connections,
)


def _hc_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if ".hyper_conn_" in name
    }


# --------------------------------------------------------------------------------------------
# TP=2 (+SP) -> PP=2, two processes


def _logits_step(data: Any, model: torch.nn.Module) -> tuple:
    batch = next(data)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, lambda out: (out.float().sum() * 0.0, {"logits": out.detach().clone()})


def _save_tp2_load_pp2(world_size: int, ckpt_root: str, variant: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.hyper_connections.training.distributed import initialize_distributed

    hc, batch = VARIANTS[variant], lm_batch(seed=5)
    ckpt_dir = f"{ckpt_root}/{variant}"

    initialize_distributed(tensor_model_parallel_size=world_size, seed=1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = make_config(hc, tensor_model_parallel_size=world_size, sequence_parallel=True)
    saved = build_gpt(config, seed=1, parallel_output=False)  # full-vocabulary logits
    perturb_hyper_connections(saved)
    hc_entries = {k: v for k, v in saved.sharded_state_dict().items() if ".hyper_conn_" in k}
    assert hc_entries, "HC parameters are missing from the sharded state dict"
    for key, entry in hc_entries.items():
        # Replicated over TP: TP rank 0 is the main replica that writes it (DP rank 0).
        assert entry.replica_id == (0, tp_rank, 0), f"{key}: replica id {entry.replica_id}"
    with torch.no_grad():
        expected = saved(batch["tokens"], batch["position_ids"], None)
    save_checkpoint([ddp(saved)], ckpt_dir)
    parallel_state.destroy_model_parallel()

    initialize_distributed(pipeline_model_parallel_size=world_size, seed=2)
    last = parallel_state.is_pipeline_last_stage()
    model = build_gpt(
        make_config(hc, pipeline_model_parallel_size=world_size),
        seed=2,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=last,
    )
    load_checkpoint([model], ckpt_dir)
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=_logits_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=True,
        )
    if last:
        torch.testing.assert_close(
            outputs[0]["logits"],
            expected,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"{variant}: logits at PP=2 after loading != saved at TP=2: {m}",
        )
    parallel_state.destroy_model_parallel()


def test_checkpoint_saved_at_tp2_loads_at_pp2(tmp_path: Path) -> None:
    # One set of processes for all variants: spawning dominates the run time.
    run_distributed(_save_tp2_load_pp2_variants, 2, str(tmp_path), ["DHCx4", "mHCx4", "Frac4"])


def _save_tp2_load_pp2_variants(
    rank: int, world_size: int, ckpt_root: str, variants: list[str]
) -> None:
    from megatron.hyper_connections.training.distributed import destroy_distributed

    for variant in variants:
        _save_tp2_load_pp2(world_size, ckpt_root, variant)
    destroy_distributed()


# --------------------------------------------------------------------------------------------
# One process: the HC record, mismatches, residual checkpoints

single_rank = pytest.mark.usefixtures("megatron_single_rank")


@pytest.fixture(scope="module")
def checkpoints(megatron_single_rank, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of a few trained-looking HC models and of megatron-core's residual GPT."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name in ("DHCx2", "DHCx4", "mHCx4"):
        model = build_gpt(make_config(VARIANTS[name]), seed=3)
        perturb_hyper_connections(model)
        paths[name] = root / name
        save_checkpoint(model, paths[name])
    paths["residual"] = root / "residual"
    save_checkpoint(build_baseline(seed=3), paths["residual"])
    return paths


@single_rank
def test_checkpoint_records_the_hyper_connection_configuration(checkpoints) -> None:
    common = dist_checkpointing.load_common_state_dict(str(checkpoints["DHCx4"]))
    assert common["model"][HC_RECORD_KEY] == {
        "use_hyper_connections": True,
        "variant": "dynamic HC",
        "num_residual_streams": 4,
        "num_fracs": 1,
        "hyper_connections_tanh": True,
        "mhc_num_dynamic_alpha_proposals": 1,
        "mhc_h_res_parameterization": "sinkhorn",
    }
    residual = dist_checkpointing.load_common_state_dict(str(checkpoints["residual"]))
    assert HC_RECORD_KEY not in (residual.get("model") or {}), "megatron-core writes no record"
    assert HC_RECORD_KEY not in build_gpt(make_config()).sharded_state_dict(), "HC off: none"


@single_rank
def test_round_trip_restores_the_hyper_connection_parameters(checkpoints) -> None:
    saved = build_gpt(make_config(VARIANTS["DHCx4"]), seed=3)
    perturb_hyper_connections(saved)
    model = build_gpt(make_config(VARIANTS["DHCx4"]), seed=4)
    load_checkpoint([ddp(model)], str(checkpoints["DHCx4"]))
    for name, value in _hc_state(saved).items():
        assert torch.equal(model.get_parameter(name), value), name
    assert torch.equal(logits(model), logits(saved))


# (checkpoint, model variant (None: megatron-core's residual GPT), what the error must say)
MISMATCHES = {
    "streams": ("DHCx2", "DHCx4", "num_residual_streams=2", "num_residual_streams=4"),
    "HC-vs-mHC": ("DHCx4", "mHCx4", "variant='dynamic HC'", "variant='dynamic mHC'"),
    "dynamic-vs-static": ("DHCx4", "SHCx4", "variant='dynamic HC'", "variant='static HC'"),
    "mHC-vs-mHC-lite": (
        "mHCx4",
        "mHCx4-lite",
        "variant='dynamic mHC'",
        "variant='dynamic mHC-lite'; checkpoint has mhc_h_res_parameterization='sinkhorn', the "
        "model has mhc_h_res_parameterization='permutations'",
    ),
    "HC-into-residual": ("DHCx4", None, "variant='dynamic HC'", "variant='residual'"),
}


@single_rank
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatched_checkpoint_is_refused_before_loading_tensors(
    checkpoints, monkeypatch, case
) -> None:
    saved, variant, in_checkpoint, in_model = MISMATCHES[case]
    message = f"checkpoint has {in_checkpoint}, the model has {in_model}"
    if variant is None:  # both values of every recorded field that differs are named
        message += "; checkpoint has num_residual_streams=4, the model has num_residual_streams=1"
    model = build_baseline() if variant is None else build_gpt(make_config(VARIANTS[variant]))
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}

    def no_tensor_reads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("dist_checkpointing.load was called before the HC check")

    monkeypatch.setattr(dist_checkpointing, "load", no_tensor_reads)
    expected = f"cannot load checkpoint {checkpoints[saved]} into this model: {message}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        load_checkpoint([model], checkpoints[saved])
    for name, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[name]), f"{name} changed"


@single_rank
@pytest.mark.parametrize("variant", ["DHCx4", "SHCx2", "mHCx4", "Frac4"])
def test_residual_checkpoint_continues_as_hyper_connection_model(checkpoints, variant) -> None:
    baseline = build_baseline(seed=3)  # the weights in checkpoints["residual"]
    model = build_gpt(make_config(VARIANTS[variant]), seed=99)
    hc_init = _hc_state(model)
    load_checkpoint([model], checkpoints["residual"])

    assert _hc_state(model).keys() == hc_init.keys()
    for name, value in _hc_state(model).items():
        assert torch.equal(value, hc_init[name]), f"{name} left its init"
    for name, value in baseline.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(model.state_dict()[name], value), f"{name} was not loaded"
    expected, got = logits(baseline), logits(model)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, f"{variant}: logits differ from the residual model's by {rel:.2e}"


@single_rank
def test_megatron_style_load_state_dict_checks_the_record(checkpoints) -> None:
    """Loading as megatron's own training loop does (``dist_checkpointing.load``, then
    ``load_state_dict``): the record is dropped when it fits, refused when it does not."""
    model = build_gpt(make_config(VARIANTS["DHCx4"]))
    state = dist_checkpointing.load(
        {"model": model.sharded_state_dict()}, str(checkpoints["DHCx4"])
    )
    assert HC_RECORD_KEY in state["model"]
    model.load_state_dict(state["model"])  # strict

    residual = build_gpt(make_config())  # HC off: megatron-core's model, our load_state_dict
    # megatron-core's default strictness ignores the checkpoint's extra (HC) tensors...
    state = dist_checkpointing.load(
        {"model": residual.sharded_state_dict()}, str(checkpoints["DHCx4"])
    )
    # ...but the record names the mismatch.
    with pytest.raises(ValueError, match="checkpoint has variant='dynamic HC', the model has"):
        residual.load_state_dict(state["model"])
