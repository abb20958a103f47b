"""PNG figures from the ``scalars.jsonl`` logs of one or several pretraining runs.

    python tools/plot_stability.py --run residual=runs/demo/residual --run mhc=runs/demo/mhc \
        --output-dir runs/demo/plots --heatmap-layers 0,3

``--run NAME=PATH``: PATH is a run's TensorBoard directory (or ``--save`` directory) holding
``scalars.jsonl``, or the file itself. Figures (those without data are skipped with a note):

- ``loss.png``: training and validation loss of all runs;
- ``composite_gain.png``: forward and backward gain of the composite P_l per sublayer over
  training, one line per sublayer, one row per run with hyper-connections, log-scale y;
- ``h_res_<run>.png``: heatmaps of the token-averaged H_res of the attention and MLP sublayers
  of the ``--heatmap-layers`` at the last logged iteration, when the log holds the matrices
  (``hyper-connections/h_res/<sublayer>``: a nested list [n][n]).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

# The tags are the pretraining monitor's own.
from megatron.hyper_connections.training.monitoring import (
    H_RES,
    JSONL_FILE,
    gain_quantity,
    per_sublayer,
    read_scalar_records,
    stability_tag,
    sublayer_name,
)

Records = list[dict]


def load_scalars(path: str | Path) -> Records:
    """The records of a ``scalars.jsonl`` (or of the one in directory ``path``), by iteration.
    An incomplete last line (a run killed while writing it) is skipped with a warning; a broken
    line before it raises ``ValueError`` naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL_FILE
    records, incomplete = read_scalar_records(path)
    if incomplete is not None:
        print(
            f"warning: {path}: skipped its incomplete last line (a run stopped while writing "
            f"it?): {incomplete[:60]!r}",
            file=sys.stderr,
        )
    return sorted(records, key=lambda record: record["iteration"])


def series(records: Records, tag: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of the records that have ``tag``."""
    points = [(r["iteration"], r[tag]) for r in records if isinstance(r.get(tag), (int, float))]
    return [i for i, _ in points], [v for _, v in points]


def sublayers(records: Records, quantity: str) -> list[int]:
    """The indices of the sublayers whose ``quantity`` (see ``gain_quantity``) is logged, in
    network order."""
    return sorted({index for record in records for index in per_sublayer(record, quantity)})


def last_value(records: Records, tag: str) -> float | None:
    _, values = series(records, tag)
    return values[-1] if values else None


def max_value(records: Records, tag: str) -> float | None:
    _, values = series(records, tag)
    return max(values) if values else None


def mean_value(records: Records, tag: str) -> float | None:
    _, values = series(records, tag)
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------
# Figures


def plot_loss(runs: dict[str, Records], path: Path) -> Path | None:
    """Training (solid) and validation (dashed, markers) loss of every run on one figure."""
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for index, (name, records) in enumerate(runs.items()):
        color = f"C{index}"
        for tag, style, label in (
            ("lm loss", dict(linestyle="-"), "train"),
            ("lm loss validation", dict(linestyle="--", marker="o"), "validation"),
        ):
            iterations, values = series(records, tag)
            if iterations:
                ax.plot(iterations, values, color=color, label=f"{name} {label}", **style)
                drawn = True
    if not drawn:
        plt.close(fig)
        print(f"note: no loss in the logs, {path.name} skipped")
        return None
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_composite_gains(
    runs: dict[str, Records], path: Path, statistic: str = "per_token"
) -> Path | None:
    """Forward / backward gain of the composite per sublayer over training (log y): one row per
    run with hyper-connections, one line per sublayer."""
    with_gains = {
        name: records
        for name, records in runs.items()
        if sublayers(records, gain_quantity("forward", "composite", statistic))
    }
    if not with_gains:
        print(f"note: no composite gains in the logs (no hyper-connections), {path.name} skipped")
        return None
    fig, axes = plt.subplots(
        len(with_gains), 2, figsize=(12, 3.6 * len(with_gains)), squeeze=False, sharex=True
    )
    for row, (name, records) in enumerate(with_gains.items()):
        for col, direction in enumerate(("forward", "backward")):
            ax = axes[row][col]
            quantity = gain_quantity(direction, "composite", statistic)
            indices = sublayers(records, quantity)
            colors = plt.get_cmap("viridis")
            for k, index in enumerate(indices):
                iterations, values = series(records, stability_tag(quantity, index))
                ax.plot(
                    iterations,
                    values,
                    color=colors(k / max(len(indices) - 1, 1)),
                    label=sublayer_name(index),
                    linewidth=1.2,
                )
            ax.set_yscale("log")
            _readable_log_axis(ax)
            ax.set_title(f"{name}: composite {direction} gain ({statistic.replace('_', ' ')})")
            ax.grid(True, which="both", alpha=0.3)
            if row == len(with_gains) - 1:
                ax.set_xlabel("iteration")
            if col == 1:
                ax.legend(fontsize=6, ncol=2, loc="best")
    return _save(fig, path)


def _readable_log_axis(ax: plt.Axes) -> None:
    """Log y that spans at least 0.5 .. 2 (mHC's gains sit at 1) with plain tick labels."""
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 2.0))
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def h_res_matrices(records: Records) -> tuple[int, dict[int, list[list[float]]]] | None:
    """(iteration, {sublayer index: matrix}) of the last record holding H_res matrices, else
    None."""
    for record in reversed(records):
        matrices = {
            index: value
            for index, value in per_sublayer(record, H_RES).items()
            if isinstance(value, list)
        }
        if matrices:
            return record["iteration"], matrices
    return None


def plot_h_res_heatmaps(
    name: str, records: Records, layers: Sequence[int], path: Path
) -> Path | None:
    """Heatmaps of the token-averaged H_res of the attention and MLP of ``layers``."""
    found = h_res_matrices(records)
    if found is None:
        tag = stability_tag(H_RES, "<sublayer>")
        print(f"note: {name}: no H_res matrices in the log ('{tag}'), heatmaps skipped")
        return None
    iteration, matrices = found
    # Sublayer 2k is the attention of layer k, 2k + 1 its MLP.
    cells = [
        (index, matrices.get(index)) for layer in layers for index in (2 * layer, 2 * layer + 1)
    ]
    missing = [sublayer_name(index) for index, m in cells if m is None]
    if missing:
        print(f"note: {name}: no H_res logged for {', '.join(missing)}")
    cells = [cell for cell in cells if cell[1] is not None]
    if not cells:
        return None
    columns = 2
    rows = math.ceil(len(cells) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.8 * rows), squeeze=False)
    bound = max(abs(v) for _, m in cells for row in m for v in row) or 1.0
    image = None
    for ax, (index, matrix) in zip(axes.flat, cells, strict=False):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound)
        size = len(matrix)
        for i in range(size):
            for j in range(len(matrix[i])):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(sublayer_name(index))
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(f"{name}: token-averaged H_res at iteration {iteration}")
    return _save(fig, path, tight=False)


def _save(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(
    runs: dict[str, Records],
    output_dir: str | Path,
    heatmap_layers: Sequence[int] = (),
    statistic: str = "per_token",
) -> list[Path]:
    """All figures of ``runs`` (name -> records) into ``output_dir``; returns the PNGs written."""
    output_dir = Path(output_dir)
    written = [
        plot_loss(runs, output_dir / "loss.png"),
        plot_composite_gains(runs, output_dir / "composite_gain.png", statistic),
    ]
    if heatmap_layers:
        for name, records in runs.items():
            if not sublayers(records, gain_quantity("forward", "composite", statistic)):
                continue  # a residual run has no H_res
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            written.append(
                plot_h_res_heatmaps(name, records, heatmap_layers, output_dir / f"h_res_{safe}.png")
            )
    return [path for path in written if path is not None]


# --------------------------------------------------------------------------------------------
# Command line


def _run_argument(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(path)


def _layers_argument(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layers, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        type=_run_argument,
        metavar="NAME=DIR",
        help="a run's name and its TensorBoard directory (or scalars.jsonl); repeat for several",
    )
    parser.add_argument("--output-dir", default="plots", help="where the PNGs go")
    parser.add_argument(
        "--heatmap-layers",
        type=_layers_argument,
        default=[],
        metavar="0,3",
        help="layers whose H_res (attention and MLP) to draw as heatmaps",
    )
    parser.add_argument(
        "--statistic",
        choices=("per_token", "mean_matrix"),
        default="per_token",
        help="composite gain statistic: mean over tokens, or gain of the token-averaged matrix",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = {}
    for name, path in args.run:
        if name in runs:
            print(f"error: run name {name!r} given twice", file=sys.stderr)
            return 2
        file = path / JSONL_FILE if path.is_dir() else path
        if not file.is_file():
            print(f"error: {name}: no {file}", file=sys.stderr)
            return 2
        try:
            runs[name] = load_scalars(file)
        except ValueError as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            return 2
    for path in plot_runs(runs, args.output_dir, args.heatmap_layers, args.statistic):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
