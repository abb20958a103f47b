"""Megatron-LM's own trainer with hyper-connections: ``megatron.hyper_connections.megatron_lm``.

Each run is ``torchrun --nproc-per-node 2 -m megatron.hyper_connections.megatron_lm.pretrain_gpt``
with gloo on the CPU, ``--mock-data`` and a tiny GPT, in two layouts: pipeline parallel 2 and
tensor parallel 2 with sequence parallelism; residual, DHC x4 and mHC x4, 10 iterations with a
checkpoint at 5 and 10. Dropout is on; ``--no-bias-dropout-fusion`` makes the residual model draw
its dropout masks as the HC layers do (Megatron-LM's fused bias-dropout-add draws other ones).

- iteration 1's loss of HC and mHC equals the residual model's (same seed: HC is the residual
  network at initialisation), and their losses are finite and fall;
- the stability metrics of every sublayer, from both pipeline stages, are in Megatron-LM's
  TensorBoard event files at its ``--log-interval`` (mHC's gains about 1);
- a run resumed from the checkpoint of iteration 5 logs the uninterrupted run's losses;
- a residual checkpoint loads into an mHC model, which continues with the residual model's
  loss; a checkpoint of another HC configuration is refused, naming the flags and values;
- the flags of Megatron-LM's ``examples/gpt3/train_gpt3_175b_distributed.sh``, shrunk, with the
  HC flags and the CPU settings, train.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.megatron_lm import CPU_FLAGS, assert_ran, finite, needs_trainer, scalars, torchrun

pytestmark = needs_trainer

ENTRY_POINT = ["-m", "megatron.hyper_connections.megatron_lm.pretrain_gpt"]
ITERATIONS = 10
LOG_INTERVAL = 5
LAYOUTS = {
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "tp2sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}
VARIANTS = {
    "residual": [],
    "dhc": ["--use-hyper-connections", "--num-residual-streams", "4"],
    "mhc": [
        *("--use-hyper-connections", "--num-residual-streams", "4"),
        *("--use-manifold-hyper-connections", "--log-mhc-amax"),
    ],
}
SUBLAYERS = ["layer_00_attn", "layer_00_mlp", "layer_01_attn", "layer_01_mlp"]


def _flags(run: Path, layout: str, variant: str) -> list[str]:
    return [
        *("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"),
        *("--seq-length", "32", "--max-position-embeddings", "32"),
        *("--micro-batch-size", "2", "--global-batch-size", "4"),
        *("--train-iters", str(ITERATIONS), "--lr", "1e-2", "--lr-warmup-iters", "2"),
        *("--log-interval", str(LOG_INTERVAL), "--eval-interval", str(ITERATIONS)),
        *("--eval-iters", "1", "--no-bias-dropout-fusion"),
        *("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"),
        *("--save", str(run / "save"), "--save-interval", "5"),
        *("--tensorboard-dir", str(run / "tb")),
        *CPU_FLAGS,
        *LAYOUTS[layout],
        *VARIANTS[variant],
    ]


def _train(run: Path, layout: str, variant: str, *extra: str) -> subprocess.CompletedProcess:
    run.mkdir(parents=True, exist_ok=True)
    return torchrun(ENTRY_POINT, [*_flags(run, layout, variant), *extra], run / "log.txt")


def _checkpoint_of(save: Path, iteration: int, into: Path) -> Path:
    """A load directory holding only ``save``'s checkpoint of ``iteration``."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(save / name, into / name)
    (into / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return into


def _losses(run: Path) -> dict[int, float]:
    return scalars(run / "tb")["lm loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every layout and variant, trained for ``ITERATIONS``: (layout, variant) -> run dir."""
    root = tmp_path_factory.mktemp("megatron_lm")
    done = {}
    for layout in LAYOUTS:
        for variant in VARIANTS:
            run = root / f"{layout}-{variant}"
            assert_ran(_train(run, layout, variant))
            done[layout, variant] = run
    return done


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["dhc", "mhc"])
def test_first_loss_is_the_residual_models_then_finite_and_falling(runs, layout, variant):
    residual, hc = _losses(runs[layout, "residual"]), _losses(runs[layout, variant])
    assert sorted(hc) == list(range(1, ITERATIONS + 1))
    assert hc[1] == pytest.approx(residual[1], rel=1e-6, abs=0.0)
    losses = [hc[i] for i in sorted(hc)]
    assert finite(losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["dhc", "mhc"])
def test_stability_metrics_are_in_tensorboard_at_the_log_interval(runs, layout, variant):
    logged = scalars(runs[layout, variant] / "tb")
    for direction in ("forward", "backward"):
        for matrix in ("h_res", "composite"):
            for statistic in ("mean_matrix", "per_token"):
                for sublayer in [*SUBLAYERS, "max"]:
                    tag = f"hyper-connections/{direction}_gain/{matrix}_{statistic}/{sublayer}"
                    assert sorted(logged.get(tag, {})) == [5, 10], tag
    composite = logged["hyper-connections/forward_gain/composite_per_token/layer_00_attn"]
    assert finite(list(composite.values()))
    if variant == "mhc":  # doubly stochastic H_res: every gain is about 1, log_amax about 0
        assert all(v == pytest.approx(1.0, abs=1e-3) for v in composite.values()), composite
        for sublayer in SUBLAYERS:
            log_amax = logged[f"hyper-connections/log_amax/{sublayer}"]
            assert all(v == pytest.approx(0.0, abs=1e-3) for v in log_amax.values())
    else:
        assert not any(tag.startswith("hyper-connections/log_amax") for tag in logged)


def test_residual_runs_log_no_stability_metrics(runs):
    for layout in LAYOUTS:
        logged = scalars(runs[layout, "residual"] / "tb")
        assert "lm loss" in logged
        assert not any(tag.startswith("hyper-connections/") for tag in logged)


def test_resumed_run_continues_with_the_same_losses(runs, tmp_path):
    reference = runs["pp2", "mhc"]
    load = _checkpoint_of(reference / "save", 5, tmp_path / "load")
    assert_ran(_train(tmp_path / "resumed", "pp2", "mhc", "--load", str(load)))
    resumed, uninterrupted = _losses(tmp_path / "resumed"), _losses(reference)
    assert sorted(resumed) == list(range(6, ITERATIONS + 1))
    assert resumed == pytest.approx({i: uninterrupted[i] for i in resumed}, rel=1e-6, abs=0.0)


def test_residual_checkpoint_continues_as_mhc_with_the_same_loss(runs, tmp_path):
    residual = runs["pp2", "residual"]
    load = _checkpoint_of(residual / "save", 5, tmp_path / "load")
    run = _train(tmp_path / "mhc", "pp2", "mhc", "--load", str(load), "--no-load-optim")
    assert_ran(run)
    continued = _losses(tmp_path / "mhc")
    # The HC parameters at their initialisation: the residual model's weights and loss.
    assert continued[6] == pytest.approx(_losses(residual)[6], rel=1e-6, abs=0.0)
    assert finite(list(continued.values()))


def test_checkpoint_of_another_hc_configuration_is_refused(runs, tmp_path):
    load = _checkpoint_of(runs["pp2", "mhc"] / "save", 5, tmp_path / "load")
    run = _train(tmp_path / "dhc", "pp2", "dhc", "--load", str(load))
    assert run.returncode != 0
    assert (
        "it was saved by a dynamic mHC model and this run builds a dynamic HC one "
        "(--use-manifold-hyper-connections: use_manifold_hyper_connections=True in the "
        "checkpoint, False in this run)"
    ) in run.stdout
    assert " iteration        1/" not in run.stdout  # refused before training


def _batch_size_schedule() -> tuple[list[str], set[float]]:
    """The example script's batch sizes as the trainer's release writes them, and the batch
    sizes they give: core_v0.19.0's --step-batch-size-schedule (its --global-batch-size beside
    it is left out: Megatron-LM 0.19 refuses the two together), else core_v0.16.1's
    --global-batch-size (its --rampup-batch-size is left out: Megatron-LM 0.16 refuses it with
    --train-iters)."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    if "--step-batch-size-schedule" in parser._option_string_actions:
        return ["--step-batch-size-schedule", "0:2 512:4"], {2.0, 4.0}
    return ["--global-batch-size", "4"], {4.0}


# The flags of Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh, group by group, with
# the sizes shrunk; besides, --initial-loss-scale starts fp16's loss scale low enough for a
# 10-iteration run to step.
EXAMPLE_175B = {
    "GPT_MODEL_ARGS": [
        *("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"),
        *("--seq-length", "64", "--max-position-embeddings", "64", "--attention-backend", "auto"),
    ],
    "TRAINING_ARGS": [
        *("--micro-batch-size", "1", "--train-iters", str(ITERATIONS), "--weight-decay", "0.1"),
        *("--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006"),
        *("--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine"),
        *("--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "8"),
    ],
    "MODEL_PARALLEL_ARGS": [
        *("--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"),
    ],
    "DATA_ARGS": [  # mock data and its tokenizer in place of GPT-2's vocabulary and a corpus
        *("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256"),
        *("--split", "949,50,1"),
    ],
    "EVAL_AND_LOGGING_ARGS": [
        *("--log-interval", str(LOG_INTERVAL), "--save-interval", "5"),
        *("--eval-interval", "5", "--eval-iters", "1"),
    ],
}


def test_megatron_lm_example_launch_script_flags_train_with_mhc(tmp_path):
    checkpoints, logs = tmp_path / "checkpoints", tmp_path / "tb"
    flags = [flag for group in EXAMPLE_175B.values() for flag in group]
    batch_size_flags, batch_sizes = _batch_size_schedule()
    flags += batch_size_flags
    flags += ["--save", str(checkpoints), "--load", str(checkpoints)]
    flags += ["--tensorboard-dir", str(logs), "--initial-loss-scale", "4096"]
    flags += [*VARIANTS["mhc"], *CPU_FLAGS]
    assert_ran(torchrun(ENTRY_POINT, flags, tmp_path / "log.txt"))
    logged = scalars(logs)
    losses = list(logged["lm loss"].values())
    assert len(losses) >= ITERATIONS - 2 and finite(losses), losses  # fp16 may skip a step
    assert set(logged["batch-size"].values()) == batch_sizes
    assert sorted(logged["hyper-connections/forward_gain/composite_per_token/max"]) == [5, 10]
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "10"


# --------------------------------------------------------------------------------------------
# The checkpoint check on its own (no training)


def _saved(tmp_path: Path, **hc_args) -> Path:
    """A Megatron-LM ``torch``-format checkpoint directory holding only its saved arguments."""
    import torch

    (tmp_path / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    saved = {"args": argparse.Namespace(num_layers=2, **hc_args)}
    torch.save(saved, tmp_path / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    return tmp_path


def _run_args(load: Path, **flags) -> argparse.Namespace:
    defaults = dict(load=str(load), no_load_optim=False, finetune=False)
    return argparse.Namespace(**{**defaults, **flags})


def _config(**hc):
    from megatron.hyper_connections import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **hc)


MHC = dict(use_hyper_connections=True, num_residual_streams=4, use_manifold_hyper_connections=True)


def test_check_load_accepts_the_same_configuration_and_a_missing_checkpoint(tmp_path):
    from megatron.hyper_connections.megatron_lm.checkpointing import check_load

    assert check_load(_run_args(_saved(tmp_path, **MHC)), _config(**MHC)) is False
    assert check_load(_run_args(tmp_path / "empty"), _config(**MHC)) is False
    # Options that may change between runs are not compared.
    assert (
        check_load(
            _run_args(tmp_path), _config(**MHC, mhc_sinkhorn_iters=5, hyper_connections_dropout=0.1)
        )
        is False
    )


def test_check_load_names_every_differing_flag_and_both_values(tmp_path):
    from megatron.hyper_connections.megatron_lm.checkpointing import check_load

    load = _saved(tmp_path, **MHC)
    with pytest.raises(ValueError) as refused:
        check_load(_run_args(load), _config(use_hyper_connections=True, num_residual_streams=2))
    assert str(refused.value) == (
        f"cannot load {load / 'iter_0000003'}: it was saved by a dynamic mHC model and this run "
        f"builds a dynamic HC one (--num-residual-streams: num_residual_streams=4 in the "
        f"checkpoint, 2 in this run; --use-manifold-hyper-connections: "
        f"use_manifold_hyper_connections=True in the checkpoint, False in this run); run with "
        f"the flags it was saved with"
    )
    with pytest.raises(ValueError, match="--use-hyper-connections: use_hyper_connections=True in"):
        check_load(_run_args(load), _config())


def test_check_load_lets_a_residual_checkpoint_start_an_hc_model_without_its_optimizer(
    tmp_path,
):
    from megatron.hyper_connections.megatron_lm.checkpointing import check_load

    load = _saved(tmp_path)  # Megatron-LM's own arguments: no HC field at all
    assert check_load(_run_args(load), _config()) is False
    with pytest.raises(ValueError, match="optimizer state has none of them: add --no-load-optim"):
        check_load(_run_args(load), _config(**MHC))
    assert check_load(_run_args(load, no_load_optim=True), _config(**MHC)) is True
    assert check_load(_run_args(load, finetune=True), _config(**MHC)) is True


def test_hc_flags_come_from_the_declarations_and_skip_megatron_lms_own(tmp_path):
    from megatron.training.arguments import add_megatron_arguments

    from megatron.hyper_connections.megatron_lm.arguments import add_arguments
    from megatron.hyper_connections.options import flag_of, hyper_connection_options

    parser = add_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(["--use-hyper-connections", "--num-residual-streams", "4"])
    for field, _ in hyper_connection_options():
        assert flag_of(field.name) in parser._option_string_actions
        expected = {"use_hyper_connections": True, "num_residual_streams": 4}
        assert getattr(args, field.name) == expected.get(field.name, field.default)
    assert args.log_mhc_amax is False
    add_arguments(parser)  # again: every flag exists now, and is skipped


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--multi-latent-attention", True),
        ("--heterogeneous-layers-config-path", "layers.json"),
        ("--yaml-cfg", "model.yaml"),
    ],
)
def test_transformer_config_refuses_flags_that_build_no_hc_model(flag, value):
    from megatron.hyper_connections.megatron_lm.arguments import transformer_config

    args = argparse.Namespace(use_hyper_connections=True, **{flag[2:].replace("-", "_"): value})
    with pytest.raises(ValueError, match=f"--use-hyper-connections is not supported with {flag}="):
        transformer_config(args)
