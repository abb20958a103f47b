"""Hyper-connections under pipeline and data parallelism, in 2 and 4 gloo processes.

Every test trains a tiny HC GPT for a few optimizer steps (megatron's DDP, Adam from
``get_megatron_optimizer``, several microbatches per step through megatron-core's schedules,
``finalize_model_grads`` as the config's ``finalize_model_grads_func``) in a parallel layout and
in the single-rank layout, from the same weights, and requires the same losses:

* PP=2 with the plain 1F1B schedule, with two virtual stages (interleaved) and with recomputed
  HC states, where every stage boundary carries the n-stream state [s, b, n*C];
* DP=2 with the distributed optimizer over the global batch that DP=1 processes alone;
* TP=2 with sequence parallelism and PP=2 together (4 processes).

The single-rank reference runs in the same processes first, every rank on the same data, so its
data-parallel averaging is the identity. Each stage (or virtual stage) is then loaded with its
layers of the reference's initial weights, HC parameters included.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.models import (
    BATCH,
    LAYER_KEY,
    SEQ,
    TINY,
    VARIANTS,
    build_gpt,
    ddp,
    forward_step,
    lm_batch,
    make_config,
    perturb_hyper_connections,
    renumbered,
    snapshot,
    tp_shard,
)

NUM_LAYERS = 4
STEPS = 3
MICROBATCHES = 4
HIDDEN = TINY["hidden_size"]
# A few seconds of work per test, but processes importing megatron on two shared cores can take
# long; a hang (e.g. mismatched p2p) still fails, only later.
TIMEOUT = 300


def _step_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """The global batch of optimizer step ``step``: MICROBATCHES microbatches."""
    return [lm_batch(seed=1000 * (step + 1) + i) for i in range(MICROBATCHES)]


def _optimizer(chunks: list[torch.nn.Module], distributed: bool = False) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=distributed)
    return get_megatron_optimizer(config, chunks)


def _run_step(chunks: list[torch.nn.Module], batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """One forward/backward over ``batches`` with megatron-core's schedule for the current
    parallel state (no pipelining, 1F1B, or interleaved 1F1B with one data iterator per chunk).
    Returns the per-microbatch losses on the last stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    interleaved = len(chunks) > 1
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in chunks] if interleaved else iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    return [float(out["lm loss"]) for out in losses]


def _train(
    chunks: list[torch.nn.Module], batches_of_step: Any, distributed_optimizer: bool = False
) -> tuple[list[list[float]], Any]:
    """STEPS optimizer steps; returns each step's microbatch losses (last stage only) and the
    optimizer."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = _optimizer(chunks, distributed_optimizer)
    losses = []
    for step in range(STEPS):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(_run_step(chunks, batches_of_step(step)))
        update_ok, grad_norm, _ = optimizer.step()
        assert update_ok, f"optimizer step {step} was skipped"
        assert grad_norm is not None and grad_norm > 0, f"step {step}: grad norm {grad_norm}"
    return losses, optimizer


def _reference(hc: dict) -> tuple[dict, dict, list[list[float]]]:
    """The PP=1, TP=1 model trained on every rank alike: (initial weights, final weights,
    per-step losses). Parallel state must already be initialised with TP = PP = 1."""
    bare = build_gpt(make_config(hc, num_layers=NUM_LAYERS), seed=1)
    perturb_hyper_connections(bare)
    initial = snapshot(bare.state_dict())
    model = ddp(bare)
    losses, _ = _train([model], _step_batches)
    return initial, snapshot(bare.state_dict()), losses


def _layer_offset(vp_stage: int | None) -> int:
    """The global index of a stage/chunk's first layer (megatron-core's layout: with virtual
    stages, chunk i of rank r holds layers i * L/vp + r * L/(pp*vp) onwards)."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if vp_stage is None:
        return pp_rank * NUM_LAYERS // pp
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return vp_stage * NUM_LAYERS // vp + pp_rank * NUM_LAYERS // (pp * vp)


def _build_chunks(
    hc: dict, full_weights: dict, vp: int | None, **overrides: Any
) -> tuple[list[torch.nn.Module], dict[str, list[tuple[int, ...]]]]:
    """This rank's model chunks (one per virtual stage, or the one stage), each loaded with its
    layers of ``full_weights`` (HC parameters included) and its TP shard, wrapped in DDP.

    Also returns the shapes of the hidden states that cross stage boundaries on this rank,
    recorded during training: "received" (input of a non-first chunk's first layer) and "sent"
    (output of a non-last chunk)."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = make_config(
        hc,
        num_layers=NUM_LAYERS,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        tensor_model_parallel_size=tp,
        **overrides,
    )
    assert config.variable_seq_lengths, "HC with PP > 1 must let megatron-core's p2p send shapes"
    boundary: dict[str, list[tuple[int, ...]]] = {"received": [], "sent": []}

    def record_received(_layer, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        boundary["received"].append(tuple(hidden_states.shape))

    def record_sent(_model, _args, output):
        boundary["sent"].append(tuple(output.shape))

    chunks = []
    for vp_stage in range(vp) if vp else [None]:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        bare = build_gpt(config, seed=2, pre_process=pre, post_process=post, vp_stage=vp_stage)
        offset = _layer_offset(vp_stage)
        numbers = [layer.layer_number for layer in bare.decoder.layers]
        assert numbers == list(range(offset + 1, offset + 1 + len(numbers))), numbers
        params = dict(bare.named_parameters())
        local = renumbered(full_weights, bare.state_dict(), LAYER_KEY, offset)
        bare.load_state_dict(
            {name: tp_shard(full, params.get(name), tp_rank, tp) for name, full in local.items()}
        )
        if not pre:
            bare.decoder.layers[0].register_forward_pre_hook(record_received, with_kwargs=True)
        if not post:
            bare.register_forward_hook(record_sent)
        chunks.append(ddp(bare))
    return chunks, boundary


def _check_losses(losses: list[list[float]], ref_losses: list[list[float]], what: str) -> None:
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(
            torch.tensor(losses),
            torch.tensor(ref_losses),
            rtol=1e-5,
            atol=0,
            msg=lambda m: f"{what}: microbatch losses of {STEPS} steps differ from PP=1: {m}",
        )
    else:
        assert losses == [[]] * STEPS, f"{what}: only the last stage reports losses: {losses}"


def _check_boundary(boundary: dict, n: int, received: int, sent: int, what: str) -> None:
    """``received``/``sent``: how many boundary crossings this rank should have seen."""
    from megatron.core import parallel_state

    seq = SEQ // parallel_state.get_tensor_model_parallel_world_size()  # sequence parallel
    expected = (seq, BATCH, n * HIDDEN)
    for direction, count in (("received", received), ("sent", sent)):
        shapes = boundary[direction]
        assert len(shapes) == count, f"{what}: {len(shapes)} {direction} states, want {count}"
        assert all(shape == expected for shape in shapes), (
            f"{what}: stage boundary ({direction}) carries {set(shapes)}, want {expected} "
            f"(n={n} streams of hidden size {HIDDEN})"
        )


def _check_final_weights(
    chunks: list[torch.nn.Module], final: dict, vp: int | None, what: str
) -> None:
    """Every parameter (HC ones in particular) ends where the PP=1 run's does."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk, vp_stage in zip(chunks, range(vp) if vp else [None], strict=True):
        params = dict(chunk.module.named_parameters())
        expected = renumbered(final, params, LAYER_KEY, _layer_offset(vp_stage))
        assert any(".hyper_conn_" in name for name in params), f"{what}: no HC parameters"
        for name, param in params.items():
            torch.testing.assert_close(
                param.detach(),
                tp_shard(expected[name], param, tp_rank, tp),
                rtol=0,
                atol=1e-4,  # Adam moves each weight by up to lr = 1e-2 per step
                msg=lambda m, name=name: f"{what}: {name} after {STEPS} steps != PP=1: {m}",
            )


# --------------------------------------------------------------------------------------------
# PP=2, plain 1F1B and interleaved (two virtual stages): the same training as PP=1

# Pipeline layouts: (virtual stages, more config options for the stages only).
LAYOUTS = {
    "1F1B": (None, {}),
    "interleaved": (2, {}),
    # Each stage keeps its own state chain (2 layers = 4 sublayers, blocks of 2): the received
    # state is kept, the next one is rebuilt in backward. Same math as the reference.
    "1F1B-recompute": (
        None,
        dict(recompute_hyper_connections=True, hyper_connections_recompute_block_size=2),
    ),
}


# Multi-token prediction: the MTP block sits on the last stage, after the streams are reduced.
PIPELINE_VARIANTS = {**VARIANTS, "mHCx4-mtp": dict(VARIANTS["mHCx4"], mtp_num_layers=1)}


def _pipeline_vs_single_stage(
    rank: int, world_size: int, variant: str, tp: int, layouts: list[str]
) -> None:
    """The PP=1 reference, then each of ``layouts`` at PP = world_size / tp, in turn."""
    from megatron.core import parallel_state

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    hc = PIPELINE_VARIANTS[variant]
    initialize_distributed(seed=1)  # TP = PP = 1: DP = world_size, the same data everywhere
    initial, final, ref_losses = _reference(hc)
    parallel_state.destroy_model_parallel()

    for layout in layouts:
        vp, options = LAYOUTS[layout]
        what = f"{variant} TP={tp} PP={world_size // tp} {layout}"
        initialize_distributed(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=world_size // tp,
            virtual_pipeline_model_parallel_size=vp,
            seed=2,
        )
        assert parallel_state.get_data_parallel_world_size() == 1
        # Megatron-LM frees each stage output's storage once it is sent (keeping its grad_fn):
        # nothing the HC layers save for backward may be that tensor.
        overrides: dict[str, Any] = dict(deallocate_pipeline_outputs=True, **options)
        if tp > 1:
            overrides.update(sequence_parallel=True)
        if vp:
            # Megatron-LM's p2p setting for the interleaved schedule; the config refuses
            # batched p2p there (see test_interleaved_pipeline_refuses_batched_p2p).
            overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        chunks, boundary = _build_chunks(hc, initial, vp, **overrides)
        losses, _ = _train(chunks, _step_batches)

        _check_losses(losses, ref_losses, what)
        crossings = STEPS * MICROBATCHES
        first = parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage()
        _check_boundary(
            boundary,
            hc["num_residual_streams"],
            received=crossings * (len(chunks) - first),
            sent=crossings * (len(chunks) - last),
            what=what,
        )
        _check_final_weights(chunks, final, vp, what)
        parallel_state.destroy_model_parallel()
    destroy_distributed()


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4"])
def test_pipeline_parallel_matches_single_stage(variant: str) -> None:
    run_distributed(_pipeline_vs_single_stage, 2, variant, 1, list(LAYOUTS), timeout=TIMEOUT)


def test_pipeline_parallel_with_mhc_lite_matches_single_stage() -> None:
    run_distributed(_pipeline_vs_single_stage, 2, "mHCx4-lite", 1, ["1F1B"], timeout=TIMEOUT)


def test_pipeline_parallel_with_mtp_on_the_last_stage_matches_single_stage() -> None:
    run_distributed(_pipeline_vs_single_stage, 2, "mHCx4-mtp", 1, ["1F1B"], timeout=TIMEOUT)


def test_tensor_and_pipeline_parallel_with_sequence_parallel_match_single_rank() -> None:
    run_distributed(_pipeline_vs_single_stage, 4, "mHCx4", 2, ["1F1B"], timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------
# DP=2 with the distributed optimizer == DP=1 on the same global batch


def _data_parallel_vs_single(rank: int, world_size: int, variant: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    hc = VARIANTS[variant]
    initialize_distributed(seed=1)
    assert parallel_state.get_data_parallel_world_size() == world_size
    # DP=1 in effect: every rank processes the whole global batch, so DP averaging is the identity.
    initial, final, ref_losses = _reference(hc)

    # DP=2: each rank processes its share of every global batch.
    share = slice(rank * MICROBATCHES // world_size, (rank + 1) * MICROBATCHES // world_size)
    bare = build_gpt(make_config(hc, num_layers=NUM_LAYERS), seed=2)
    bare.load_state_dict(initial)
    model = ddp(bare, use_distributed_optimizer=True)
    losses, optimizer = _train([model], lambda step: _step_batches(step)[share], True)

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    assert all(isinstance(part, DistributedOptimizer) for part in parts), parts
    torch.testing.assert_close(
        torch.tensor(losses),
        torch.tensor([step[share] for step in ref_losses]),
        rtol=1e-5,
        atol=0,
        msg=lambda m: f"{variant}: DP=2 microbatch losses of {STEPS} steps != DP=1: {m}",
    )
    hc_params = {name: p for name, p in bare.named_parameters() if ".hyper_conn_" in name}
    assert hc_params
    for name, param in hc_params.items():
        assert not torch.equal(param, initial[name]), f"{variant}: {name} did not train"
        torch.testing.assert_close(
            param.detach(),
            final[name],
            rtol=0,
            atol=1e-5,
            msg=lambda m, name=name: f"{variant}: {name} after {STEPS} steps, DP=2 != DP=1: {m}",
        )
    # The distributed optimizer's all-gather leaves both replicas with the same weights.
    flat = torch.cat([param.detach().reshape(-1) for param in bare.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(copies, flat)
    assert all(torch.equal(copies[0], copy) for copy in copies), f"{variant}: replicas differ"
    destroy_distributed()


@pytest.mark.parametrize("variant", ["DHCx4", "mHCx4"])
def test_data_parallel_distributed_optimizer_matches_single_rank(variant: str) -> None:
    run_distributed(_data_parallel_vs_single, 2, variant, timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------
# The config: shapes sent between stages; no batched p2p with the interleaved schedule


PP2 = dict(num_layers=NUM_LAYERS, pipeline_model_parallel_size=2)


def test_pipeline_config_sends_shapes() -> None:
    assert make_config(VARIANTS["mHCx4"], **PP2).variable_seq_lengths
    assert not make_config(VARIANTS["mHCx4"], num_layers=NUM_LAYERS).variable_seq_lengths
    assert not make_config(**PP2).variable_seq_lengths  # HC off: megatron-core's own config


def test_interleaved_pipeline_refuses_batched_p2p() -> None:
    # megatron-core 0.16.1's default batch_p2p_comm=True: with the shape exchange, the
    # interleaved schedule hangs at PP=4 and mixes up forward and backward messages at PP=2.
    interleaved = dict(PP2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"needs batch_p2p_comm=False.*overlap_p2p_comm=True"):
        make_config(VARIANTS["DHCx4"], **interleaved)
    unbatched = dict(interleaved, overlap_p2p_comm=True, batch_p2p_comm=False)
    assert make_config(VARIANTS["DHCx4"], **unbatched).variable_seq_lengths
    assert make_config(**interleaved).batch_p2p_comm  # HC off: megatron-core's own config
