"""Residual vs. HC vs. mHC vs. mHC-lite on a CPU: train the same small GPT four times.

    python tools/demo.py                      # runs/demo/report.md and its figures
    python tools/demo.py --output-dir runs/demo --train-iters 60

The four runs (residual baseline, dynamic HC, mHC and mHC-lite, each with n = 4) go through
the real entry point, ``python -m megatron.hyper_connections.training.pretrain``, one after
the other, with the same seed, data (the embedded corpus), model size and iterations. Then
``tools/plot_stability.py`` draws the figures and ``report.md`` puts validation loss, the
largest composite gains, throughput and parameter counts side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plot_stability

from megatron.hyper_connections.training.monitoring import gain_quantity, stability_tag

# Small enough for a 2-core CPU: the four runs take a few minutes in all.
MODEL_FLAGS = [
    "--num-layers", "4",
    "--hidden-size", "128",
    "--num-attention-heads", "4",
    "--seq-length", "128",
    "--micro-batch-size", "8",
    "--lr", "2e-3",
    "--lr-decay-style", "cosine",
    "--num-workers", "0",
]  # fmt: skip

# name -> (label, flags)
VARIANTS = {
    "residual": ("residual baseline", []),
    "dhc": (
        "DHC x4",
        ["--use-hyper-connections", "--num-residual-streams", "4"],
    ),
    "mhc": (
        "mHC x4",
        [
            "--use-hyper-connections",
            "--num-residual-streams", "4",
            "--use-manifold-hyper-connections",
        ],
    ),
    "mhc-lite": (
        "mHC-lite x4",
        [
            "--use-hyper-connections",
            "--num-residual-streams", "4",
            "--use-manifold-hyper-connections",
            "--mhc-h-res-parameterization", "permutations",
        ],
    ),
}  # fmt: skip


@dataclass
class RunResult:
    """What the report says about one run."""

    name: str
    label: str
    parameters: int | None
    final_validation_loss: float | None
    best_validation_loss: float | None
    final_train_loss: float | None
    max_forward_gain: float | None  # composite, per token, largest over sublayers and time
    max_backward_gain: float | None
    max_forward_gain_mean_matrix: float | None
    max_backward_gain_mean_matrix: float | None
    tokens_per_second: float | None  # median over log intervals after the first
    seconds: float | None = None  # wall time of the run's process


def training_flags(args: argparse.Namespace) -> list[str]:
    return [
        *MODEL_FLAGS,
        "--train-iters", str(args.train_iters),
        "--lr-warmup-iters", str(max(1, args.train_iters // 10)),
        "--log-interval", str(args.log_interval),
        "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters),
        "--seed", str(args.seed),
    ]  # fmt: skip


def summarize(
    name: str, label: str, records: plot_stability.Records, parameters: int | None
) -> RunResult:
    """The report's numbers from a run's ``scalars.jsonl`` records."""
    _, validation = plot_stability.series(records, "lm loss validation")
    _, speeds = plot_stability.series(records, "tokens-per-second")
    speeds = sorted(speeds[1:] or speeds)  # the first interval includes warm-up

    def largest_composite_gain(direction: str, statistic: str) -> float | None:
        """Over sublayers (the logged max) and over the log intervals."""
        tag = stability_tag(gain_quantity(direction, "composite", statistic))
        return plot_stability.max_value(records, tag)

    return RunResult(
        name=name,
        label=label,
        parameters=parameters,
        final_validation_loss=validation[-1] if validation else None,
        best_validation_loss=min(validation) if validation else None,
        final_train_loss=plot_stability.last_value(records, "lm loss"),
        max_forward_gain=largest_composite_gain("forward", "per_token"),
        max_backward_gain=largest_composite_gain("backward", "per_token"),
        max_forward_gain_mean_matrix=largest_composite_gain("forward", "mean_matrix"),
        max_backward_gain_mean_matrix=largest_composite_gain("backward", "mean_matrix"),
        tokens_per_second=speeds[len(speeds) // 2] if speeds else None,
    )


def _number(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def report_markdown(
    results: Sequence[RunResult],
    figures: Sequence[str | Path] = (),
    settings: str = "",
    wall_seconds: float | None = None,
) -> str:
    """The report: one table with the runs side by side, then the figures (paths relative to
    the report)."""
    baseline = next((r.parameters for r in results if r.parameters), None)
    lines = ["# Residual vs. HC vs. mHC vs. mHC-lite: demo report", ""]
    if settings:
        lines += [settings, ""]
    lines += [
        "| run | parameters | overhead | final val loss | best val loss | final train loss "
        "| max composite fwd gain (per token / mean matrix) | max composite bwd gain "
        "(per token / mean matrix) | tokens/s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.parameters is None:
            parameters, overhead = "n/a", "n/a"
        else:
            parameters = f"{r.parameters:,}"
            overhead = f"{100 * (r.parameters / baseline - 1):+.2f}%" if baseline else "n/a"
        if r.max_forward_gain is None:
            forward = backward = "— (no HC)"
        else:
            forward = f"{_number(r.max_forward_gain)} / {_number(r.max_forward_gain_mean_matrix)}"
            backward = (
                f"{_number(r.max_backward_gain)} / {_number(r.max_backward_gain_mean_matrix)}"
            )
        lines.append(
            f"| {r.label} | {parameters} | {overhead} | {_number(r.final_validation_loss)} "
            f"| {_number(r.best_validation_loss)} | {_number(r.final_train_loss)} "
            f"| {forward} | {backward} | {_number(r.tokens_per_second, ',.0f')} "
            f"| {_number(r.seconds, '.0f')} |"
        )
    lines += [
        "",
        "Overhead: parameters relative to the first run. Gains: forward (max absolute row sum) "
        "and backward (max absolute column sum) gain of the composite residual mixing "
        "P_l = H_res[2L-1] ... H_res[l], largest over sublayers and log intervals; 1 means the "
        "mixing neither amplifies nor damps the residual stream. Tokens/s: median over the log "
        "intervals after the first.",
    ]
    if wall_seconds is not None:
        lines += ["", f"Total wall time of the demo: {wall_seconds:.0f} s."]
    for figure in figures:
        figure = Path(figure)
        lines += ["", f"![{figure.stem}]({figure.as_posix()})"]
    return "\n".join(lines) + "\n"


def write_report(
    output_dir: str | Path,
    results: Sequence[RunResult],
    figures: Sequence[str | Path] = (),
    settings: str = "",
    wall_seconds: float | None = None,
) -> Path:
    """``report.md`` in ``output_dir`` (figures given relative to it or inside it)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    relative = [
        Path(f).resolve().relative_to(output_dir.resolve())
        if Path(f).resolve().is_relative_to(output_dir.resolve())
        else Path(f)
        for f in figures
    ]
    path = output_dir / "report.md"
    path.write_text(report_markdown(results, relative, settings, wall_seconds), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Running


def count_parameters(flags: Sequence[str]) -> int:
    """The number of parameters of the model ``flags`` describe (built in a subprocess)."""
    output = subprocess.run(
        [sys.executable, __file__, "--count-parameters", "--", *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(output.strip().splitlines()[-1])


def _print_parameter_count(flags: Sequence[str]) -> None:
    from megatron.hyper_connections.training.checks import parse_args
    from megatron.hyper_connections.training.factories import transformer_config
    from megatron.hyper_connections.training.pretrain import megatron_parallel_state, model_chunks

    args = parse_args(list(flags))
    with megatron_parallel_state(args):
        chunks = model_chunks(args, transformer_config(args))
        unique = {id(p): p for chunk in chunks for p in chunk.parameters()}
        print(sum(p.numel() for p in unique.values()))


def train(run_dir: Path, flags: Sequence[str], log: Path) -> float:
    """One run through the real entry point, its console in ``log``; returns its wall time."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run appends to an existing scalars.jsonl
    run_dir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "megatron.hyper_connections.training.pretrain",
        *flags,
        "--tensorboard-dir",
        str(run_dir),
    ]
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--heatmap-layers", default="0,3")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--count-parameters"]:
        _print_parameter_count(argv[2:] if argv[1:2] == ["--"] else argv[1:])
        return 0
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    started = time.perf_counter()
    base = training_flags(args)
    results = []
    for name in args.variants.split(","):
        label, variant_flags = VARIANTS[name]
        flags = [*base, *variant_flags]
        print(f"[demo] {label}: training ...", flush=True)
        seconds = train(output_dir / name, flags, output_dir / f"{name}.log")
        parameters = count_parameters(flags)
        result = summarize(name, label, plot_stability.load_scalars(output_dir / name), parameters)
        result.seconds = seconds
        print(
            f"[demo] {label}: {seconds:.0f} s, final validation loss "
            f"{_number(result.final_validation_loss)}, {parameters:,} parameters",
            flush=True,
        )
        results.append(result)
    runs = {r.label: plot_stability.load_scalars(output_dir / r.name) for r in results}
    layers = [int(x) for x in args.heatmap_layers.split(",") if x.strip()]
    figures = plot_stability.plot_runs(runs, output_dir / "plots", layers)
    settings = (
        f"Same seed ({args.seed}), data (embedded corpus) and {args.train_iters} iterations for "
        f"every run; model and schedule flags: `{' '.join(base)}`."
    )
    report = write_report(
        output_dir, results, figures, settings, wall_seconds=time.perf_counter() - started
    )
    print(f"[demo] wrote {report} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
