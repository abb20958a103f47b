"""tools/plot_stability.py and the report writer of tools/demo.py, on synthetic logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import demo
import plot_stability

SUBLAYERS = [f"layer_{k:02d}_{kind}" for k in range(4) for kind in ("attn", "mlp")]


def _write_log(directory: Path, hc: bool, with_h_res: bool = False, growth: float = 1.0) -> Path:
    """A synthetic scalars.jsonl like the entry point's: log every 10 iterations, validation
    every 20."""
    directory.mkdir(parents=True)
    lines = []
    for iteration in range(10, 61, 10):
        record = {
            "iteration": iteration,
            "lm loss": 5.0 - iteration / 20,
            "learning-rate": 1e-3,
            "tokens-per-second": 1000.0 + iteration,
        }
        if hc:
            for direction in ("forward", "backward"):
                for statistic in ("per_token", "mean_matrix"):
                    family = f"hyper-connections/{direction}_gain/composite_{statistic}"
                    values = {
                        name: growth ** (iteration / 10) * (1 + index / 10)
                        for index, name in enumerate(SUBLAYERS)
                    }
                    record.update({f"{family}/{n}": v for n, v in values.items()})
                    record[f"{family}/max"] = max(values.values())
            if with_h_res:
                for name in SUBLAYERS:
                    record[f"hyper-connections/h_res/{name}"] = [
                        [0.7 if i == j else 0.1 for j in range(4)] for i in range(4)
                    ]
        lines.append(json.dumps(record))
        if iteration % 20 == 0:
            lines.append(
                json.dumps({"iteration": iteration, "lm loss validation": 4.5 - iteration / 30})
            )
    (directory / "scalars.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_plot_stability_writes_non_empty_pngs(tmp_path, capsys):
    residual = _write_log(tmp_path / "residual", hc=False)
    dhc = _write_log(tmp_path / "dhc", hc=True, growth=1.5)
    mhc = _write_log(tmp_path / "mhc", hc=True, with_h_res=True)
    out = tmp_path / "plots"
    code = plot_stability.main(
        [
            f"--run=residual={residual}",
            f"--run=dhc={dhc}",
            f"--run=mhc={mhc / 'scalars.jsonl'}",
            "--output-dir",
            str(out),
            "--heatmap-layers",
            "0,3",
        ]
    )
    assert code == 0
    written = {p.name for p in out.glob("*.png")}
    assert written == {"loss.png", "composite_gain.png", "h_res_mhc.png"}
    for path in out.glob("*.png"):
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG")
    # dhc has gains but no matrices: its heatmaps are skipped with a note
    assert "dhc: no H_res matrices" in capsys.readouterr().out


def test_plot_stability_skips_gains_of_residual_runs(tmp_path, capsys):
    residual = _write_log(tmp_path / "residual", hc=False)
    paths = plot_stability.plot_runs(
        {"residual": plot_stability.load_scalars(residual)}, tmp_path / "plots", [0]
    )
    assert [p.name for p in paths] == ["loss.png"]
    assert "no composite gains" in capsys.readouterr().out


def test_plot_stability_skips_an_incomplete_last_line_and_names_a_broken_one(tmp_path, capsys):
    run = _write_log(tmp_path / "killed", hc=False)
    log = run / "scalars.jsonl"
    complete = plot_stability.load_scalars(run)
    with log.open("a", encoding="utf-8") as file:
        file.write('{"iteration": 70, "lm lo')  # a run killed while writing its record
    code = plot_stability.main([f"--run=killed={run}", "--output-dir", str(tmp_path / "plots")])
    assert code == 0
    assert (tmp_path / "plots" / "loss.png").is_file()
    err = capsys.readouterr().err
    assert f"warning: {log}: skipped its incomplete last line" in err
    assert plot_stability.load_scalars(run) == complete

    lines = log.read_text(encoding="utf-8").splitlines()
    log.write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n", encoding="utf-8")
    code = plot_stability.main([f"--run=killed={run}", "--output-dir", str(tmp_path / "plots")])
    assert code == 2
    assert f"error: killed: {log} line 2 is not a JSON record" in capsys.readouterr().err


def test_report_has_a_table_with_the_four_runs(tmp_path):
    results = []
    for name, (label, _) in demo.VARIANTS.items():
        records = plot_stability.load_scalars(
            _write_log(tmp_path / name, hc=name != "residual", growth=1.2)
        )
        parameters = {
            "residual": 1_000_000,
            "dhc": 1_010_000,
            "mhc": 1_012_000,
            "mhc-lite": 1_015_000,
        }[name]
        results.append(demo.summarize(name, label, records, parameters))
    figure = tmp_path / "plots" / "loss.png"
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG")
    report = demo.write_report(tmp_path, results, [figure], settings="synthetic")
    text = report.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 5  # header and four runs
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "residual baseline",
        "DHC x4",
        "mHC x4",
        "mHC-lite x4",
    ]
    residual, dhc, mhc, lite = rows[1:]
    assert "1,000,000" in residual and "+0.00%" in residual and "no HC" in residual
    assert "+1.00%" in dhc and "+1.20%" in mhc and "+1.50%" in lite
    assert "2.5000" in residual  # final validation loss 4.5 - 60 / 30
    assert f"{1.2**6 * 1.7:.4f}" in dhc  # largest composite gain, last sublayer, last log
    assert "1,040" in mhc  # median tokens/s over the logs after the first
    assert "![loss](plots/loss.png)" in text


def test_the_tools_read_the_tags_the_monitor_writes(tmp_path, capsys):
    """The stability scalars and H_res matrices of 2 layers with n = 4, as the pretraining monitor
    writes them to scalars.jsonl, are what the plots and the report find."""
    import argparse

    import torch

    from megatron.hyper_connections.training import monitoring

    generator = torch.Generator().manual_seed(3)
    writer = monitoring.ScalarWriter(
        argparse.Namespace(tensorboard_dir=None, save=str(tmp_path), wandb_project=None), 0
    )
    summary = monitoring.StabilitySummary()
    for iteration in (10, 20):
        summaries = {
            index: monitoring.h_res_summary(0.5 * torch.randn(16, 2, 4, 4, generator=generator))
            for index in range(4)
        }
        scalars = monitoring.stability_scalars(summaries, with_log_amax=True)
        writer.write(iteration, scalars, monitoring.h_res_matrices(summaries))
        summary.update(iteration, scalars)
    writer.close()
    # The documented tag format (README, monitoring's docstring).
    assert "hyper-connections/forward_gain/composite_per_token/layer_01_mlp" in scalars
    assert "hyper-connections/backward_gain/h_res_mean_matrix/max" in scalars

    records = plot_stability.load_scalars(tmp_path)
    for statistic in ("per_token", "mean_matrix"):
        quantity = monitoring.gain_quantity("forward", "composite", statistic)
        assert plot_stability.sublayers(records, quantity) == [0, 1, 2, 3]
    paths = plot_stability.plot_runs({"hc": records}, tmp_path / "plots", heatmap_layers=[0, 1])
    assert [p.name for p in paths] == ["composite_gain.png", "h_res_hc.png"]  # no loss logged
    assert "no H_res" not in capsys.readouterr().out

    result = demo.summarize("hc", "HC x4", records, None)
    composite_max = "hyper-connections/{}_gain/composite_{}/max"
    assert result.max_forward_gain == max(
        r[composite_max.format("forward", "per_token")] for r in records
    )
    assert result.max_backward_gain_mean_matrix == max(
        r[composite_max.format("backward", "mean_matrix")] for r in records
    )
    # The console summary names the sublayer and iteration of the largest composite gain.
    sublayers = ["layer_00_attn", "layer_00_mlp", "layer_01_attn", "layer_01_mlp"]
    tag = "hyper-connections/forward_gain/composite_per_token/{}"
    largest = max((r[tag.format(s)], r["iteration"], s) for r in records for s in sublayers)
    assert summary.largest[("composite forward gain", "per_token")] == largest
