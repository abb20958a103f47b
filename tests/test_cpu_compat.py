"""megatron-core on CPU/gloo via `megatron.hyper_connections.cpu_compat`, in real process groups.

Each test runs a tiny GPTModel (megatron's local layer spec, fp32) in 2 processes and checks that
a parallel layout (TP+SP, PP, EP, DP with the distributed optimizer, distributed checkpointing)
reproduces the single-layout numbers.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.models import (
    EXPERT_KEY,
    LAYER_KEY,
    assert_grads_close,
    build_gpt,
    ddp,
    ddp_step,
    lm_batch,
    main_grads,
    make_config,
    renumbered,
    snapshot,
    tp_shard,
    train_step,
)


def _gpt(pre_process: bool = True, post_process: bool = True, **config: Any) -> torch.nn.Module:
    """megatron-core's own GPTModel (this module tests the compat layer, not HC)."""
    from megatron.core.models.gpt import GPTModel

    return build_gpt(
        make_config(**config),
        seed=None,
        model_cls=GPTModel,
        pre_process=pre_process,
        post_process=post_process,
    )


# --------------------------------------------------------------------------------------------
# TP=2 + sequence parallel == TP=1


def _tp_vs_single(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    batch = lm_batch(seed=7)

    # Reference: TP=1 (so DP=2, same batch on both ranks -> DP averaging is the identity).
    initialize_distributed(tensor_model_parallel_size=1, seed=1)
    ref = ddp(_gpt(num_layers=2))
    ref_loss = ddp_step(ref, batch)
    ref_weights = snapshot(ref.module.state_dict())
    ref_grads = main_grads(ref)
    parallel_state.destroy_model_parallel()

    initialize_distributed(tensor_model_parallel_size=world_size, seed=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    bare = _gpt(num_layers=2, tensor_model_parallel_size=world_size, sequence_parallel=True)
    params = dict(bare.named_parameters())
    bare.load_state_dict(
        {
            name: tp_shard(full, params.get(name), tp_rank, world_size)
            for name, full in ref_weights.items()
        }
    )
    model = ddp(bare)
    loss = ddp_step(model, batch)

    torch.testing.assert_close(
        loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m: f"TP=2+SP loss != TP=1 loss: {m}"
    )
    ln_name = "decoder.layers.0.input_layernorm.weight"
    assert getattr(params[ln_name], "sequence_parallel", False), "LN should be marked SP"
    expected = {n: tp_shard(g, params[n], tp_rank, world_size) for n, g in ref_grads.items()}
    assert_grads_close(
        main_grads(model), expected, lambda n: f"grad of {n} differs between TP=2+SP and TP=1"
    )
    destroy_distributed()


def test_tensor_parallel_with_sequence_parallel_matches_single_rank() -> None:
    run_distributed(_tp_vs_single, 2)


# --------------------------------------------------------------------------------------------
# PP=2 with the 1F1B schedule == PP=1


def _pp_vs_single(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    num_layers, batches = 4, [lm_batch(seed=11), lm_batch(seed=12)]

    initialize_distributed(pipeline_model_parallel_size=1, seed=1)
    ref = ddp(_gpt(num_layers=num_layers))
    ref.config.finalize_model_grads_func = finalize_model_grads
    ref_losses = train_step(ref, batches)
    ref_weights = snapshot(ref.module.state_dict())
    ref_grads = main_grads(ref)
    parallel_state.destroy_model_parallel()

    initialize_distributed(pipeline_model_parallel_size=world_size, seed=2)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    offset = parallel_state.get_pipeline_model_parallel_rank() * num_layers // world_size
    bare = _gpt(
        num_layers=num_layers,
        pipeline_model_parallel_size=world_size,
        pre_process=first,
        post_process=last,
    )
    bare.load_state_dict(renumbered(ref_weights, bare.state_dict(), LAYER_KEY, offset))
    model = ddp(bare)
    model.config.finalize_model_grads_func = finalize_model_grads
    losses = train_step(model, batches)

    if last:
        assert len(losses) == len(batches), f"expected one loss per microbatch, got {losses}"
        torch.testing.assert_close(
            torch.tensor(losses),
            torch.tensor(ref_losses),
            rtol=1e-5,
            atol=0,
            msg=lambda m: f"PP=2 microbatch losses != PP=1: {m}",
        )
    else:
        assert losses == [], f"only the last stage reports losses, got {losses}"
    expected = renumbered(ref_grads, dict(bare.named_parameters()), LAYER_KEY, offset)
    assert_grads_close(
        main_grads(model), expected, lambda n: f"grad of {n} differs between PP=2 and PP=1"
    )
    destroy_distributed()


def test_pipeline_parallel_schedule_matches_single_stage() -> None:
    run_distributed(_pp_vs_single, 2)


# --------------------------------------------------------------------------------------------
# EP=2 MoE with the all-to-all token dispatcher == EP=1

MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_token_dispatcher_type="alltoall",
    # megatron's SequentialMLP adds expert biases in place to a custom autograd Function's output,
    # which autograd rejects (megatron-core 0.16.1, transformer/mlp.py MLP.forward).
    add_bias_linear=False,
)


def _ep_vs_single(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    batch = lm_batch(seed=21)  # the same on both ranks: EP=2 then sees every token twice

    initialize_distributed(expert_model_parallel_size=1, seed=1)
    ref = ddp(_gpt(**MOE))
    ref_loss = ddp_step(ref, batch)
    ref_weights = snapshot(ref.module.state_dict())
    ref_grads = main_grads(ref)
    parallel_state.destroy_model_parallel()

    initialize_distributed(expert_model_parallel_size=world_size, seed=2)
    offset = parallel_state.get_expert_model_parallel_rank() * MOE["num_moe_experts"] // world_size
    bare = _gpt(expert_model_parallel_size=world_size, **MOE)
    bare.load_state_dict(renumbered(ref_weights, bare.state_dict(), EXPERT_KEY, offset))
    model = ddp(bare)
    loss = ddp_step(model, batch)

    torch.testing.assert_close(
        loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m: f"EP=2 loss != EP=1 loss: {m}"
    )
    expected = renumbered(ref_grads, dict(bare.named_parameters()), EXPERT_KEY, offset)
    assert_grads_close(
        main_grads(model), expected, lambda n: f"grad of {n} differs between EP=2 and EP=1"
    )
    destroy_distributed()


def test_expert_parallel_all_to_all_matches_single_rank() -> None:
    run_distributed(_ep_vs_single, 2)


# --------------------------------------------------------------------------------------------
# DP=2 with megatron's DDP and distributed optimizer


def _dp_training(rank: int, world_size: int, overlap_grad_reduce: bool) -> list[float]:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    initialize_distributed(seed=3)
    assert parallel_state.get_data_parallel_world_size() == world_size
    model = ddp(
        _gpt(num_layers=2),
        use_distributed_optimizer=True,
        overlap_grad_reduce=overlap_grad_reduce,
        bucket_size=4096,  # several buckets, so overlapped reduction really interleaves
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0),
        [model],
    )
    batches = [lm_batch(seed=100 + 2 * rank), lm_batch(seed=101 + 2 * rank)]  # per-DP-rank data
    mean_losses = []
    for _ in range(4):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = torch.tensor(sum(train_step(model, batches)) / len(batches))
        torch.distributed.all_reduce(loss)
        mean_losses.append(loss.item() / world_size)
        update_ok, grad_norm, _ = optimizer.step()
        assert update_ok, "optimizer step was skipped"
        assert grad_norm is not None and torch.isfinite(torch.tensor(grad_norm)), grad_norm

    # The distributed optimizer's all-gather must leave every DP replica with equal weights.
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "DP replicas diverged"
    destroy_distributed()
    return mean_losses


@pytest.mark.parametrize("overlap_grad_reduce", [False, True])
def test_data_parallel_distributed_optimizer_trains(overlap_grad_reduce: bool) -> None:
    losses = run_distributed(_dp_training, 2, overlap_grad_reduce)[0]
    assert all(torch.isfinite(torch.tensor(losses))), f"non-finite loss: {losses}"
    assert all(b < a for a, b in itertools.pairwise(losses)), f"loss did not decrease: {losses}"


# --------------------------------------------------------------------------------------------
# dist_checkpointing save/load round trip at TP=2


def _checkpoint_round_trip(rank: int, world_size: int, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    batch = lm_batch(seed=5)

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(batch["tokens"], batch["position_ids"], None)

    initialize_distributed(tensor_model_parallel_size=world_size, seed=1)
    saved = _gpt(tensor_model_parallel_size=world_size, sequence_parallel=True)
    dist_checkpointing.save(saved.sharded_state_dict(), ckpt_dir)

    torch.manual_seed(99)  # a fresh model with different weights
    tensor_parallel.model_parallel_cuda_manual_seed(99)
    loaded = _gpt(tensor_model_parallel_size=world_size, sequence_parallel=True)
    assert not torch.equal(logits(loaded), logits(saved)), "fresh model should differ"
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), ckpt_dir))
    assert torch.equal(logits(loaded), logits(saved)), "logits changed across save/load"
    destroy_distributed()


def test_dist_checkpointing_round_trip_tensor_parallel(tmp_path: Path) -> None:
    # megatron's torch_dist writer calls psutil unconditionally (filesystem_async._process_memory).
    pytest.importorskip("psutil", reason="megatron-core's dist_checkpointing.save needs psutil")
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    run_distributed(_checkpoint_round_trip, 2, str(ckpt_dir))


# --------------------------------------------------------------------------------------------
# megatron's RNG tracker on the CPU generator


def _rng_streams(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import tensor_parallel

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    initialize_distributed(tensor_model_parallel_size=world_size, seed=5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger(tensor_parallel.random.__name__).addHandler(handler)
    outer = torch.get_rng_state()
    with tracker.fork():
        forked = torch.rand(4)
    assert not warnings, f"fork() should not warn about the CPU RNG on CPU: {warnings}"
    assert torch.equal(torch.get_rng_state(), outer), "fork() did not restore the outer RNG"
    with tracker.fork():
        assert not torch.equal(torch.rand(4), forked), "the forked stream did not advance"
    shared = torch.rand(4)

    tensor_parallel.model_parallel_cuda_manual_seed(5)
    with tracker.fork():
        assert torch.equal(torch.rand(4), forked), "re-seeding did not reproduce the stream"
    destroy_distributed()
    return forked, shared


def test_rng_tracker_forks_per_tensor_parallel_rank() -> None:
    (forked0, shared0), (forked1, shared1) = run_distributed(_rng_streams, 2)
    assert not torch.equal(forked0, forked1), "TP ranks must get distinct model-parallel streams"
    assert torch.equal(shared0, shared1), "the default (data-parallel) stream must be shared"


# --------------------------------------------------------------------------------------------
# the run_distributed helper itself: a failing rank must fail the test, not hang it


def _rank1_raises(rank: int, world_size: int) -> None:
    torch.distributed.init_process_group("gloo")
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    torch.distributed.barrier()  # rank 0 would wait here forever


def test_run_distributed_reports_a_failing_rank() -> None:
    with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 failed.*deliberate failure"):
        run_distributed(_rank1_raises, 2, timeout=60)


# --------------------------------------------------------------------------------------------
# enable_cpu_megatron(): idempotent, and untouched torch when CUDA is available


def _enable_semantics(rank: int, world_size: int) -> None:
    from torch.overrides import _get_current_function_mode_stack

    from megatron.hyper_connections import cpu_compat

    original = torch.cuda.current_device
    torch.cuda.is_available = lambda: True  # pretend a GPU is present
    cpu_compat.enable_cpu_megatron()
    assert torch.cuda.current_device is original, "patched torch.cuda although CUDA 'available'"
    assert not _get_current_function_mode_stack(), "pushed a torch function mode with CUDA"

    torch.cuda.is_available = lambda: False
    cpu_compat.enable_cpu_megatron()
    patched, modes = torch.cuda.current_device, list(_get_current_function_mode_stack())
    cpu_compat.enable_cpu_megatron()
    assert torch.cuda.current_device is patched, "second call re-patched"
    assert list(_get_current_function_mode_stack()) == modes and len(modes) == 1, modes
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_enable_cpu_megatron_is_idempotent_and_noop_with_cuda() -> None:
    run_distributed(_enable_semantics, 1)


def _set_up_twice(rank: int, world_size: int) -> list[str]:
    """The trainer's set-up twice in one process, with what cpu_compat logged meanwhile."""
    import logging

    from torch.overrides import _get_current_function_mode_stack

    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname}: {record.getMessage()}")

    logging.getLogger("megatron.hyper_connections.cpu_compat").addHandler(Collect())
    # Importing the package changes nothing: only the set-up enables the layer.
    assert torch.cuda.current_device.__module__ == "torch.cuda", "enabled before the set-up"
    assert not _get_current_function_mode_stack()
    for seed in (1, 2):
        initialize_distributed(seed=seed)
        assert torch.cuda.current_device() == torch.device("cpu")
        assert len(_get_current_function_mode_stack()) == 1
        destroy_distributed()
    return messages


def test_set_up_enables_the_cpu_layer_and_logs_it_once() -> None:
    (messages,) = run_distributed(_set_up_twice, 1)
    assert len(messages) == 1, messages
    assert messages[0].startswith("WARNING: no CUDA device: megatron-core runs on the CPU")
    assert "megatron.hyper_connections.cpu_compat" in messages[0]
