"""`minorsft plot` renders runs into one figure, labelled from their saved configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from minorsft_core.plot import plot_runs, read_run


def _fake_run(path, loss, lr, slope):
    """A run directory as stage two leaves it (metrics.jsonl + config.yaml)."""
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"loss": loss, "lr": lr, "beta": 0.04}))
    rows = [{"step": s, "loss": 2.0 - 0.05 * s, "deviation": slope * s, "coef_mean": 1.0 - slope * s / 10}
            for s in range(1, 21)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_renders_runs(tmp_path):
    from matplotlib.image import imread

    runs = [_fake_run(tmp_path / "sft", "sft", 1e-5, 0.05), _fake_run(tmp_path / "minor", "minorsft", 2e-5, 0.02)]
    assert read_run(runs[0])[0] == "sft lr=1e-05"
    assert read_run(runs[1])[0] == "minorsft lr=2e-05 beta=0.04"
    out = plot_runs(runs, tmp_path / "fig.png", title="test")
    image = imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 900
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_cli_errors_name_the_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minorsft_core.cli", "plot", str(tmp_path), "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True,
    )
    assert result.returncode == 3 and "no metrics.jsonl" in result.stderr and str(tmp_path) in result.stderr


def test_plot_cli_writes_file(tmp_path):
    run = _fake_run(tmp_path / "r", "dpo_sft", 2e-5, 0.03)
    result = subprocess.run(
        [sys.executable, "-m", "minorsft_core.cli", "plot", str(run), "--out", str(tmp_path / "f.png")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_empty_metrics(tmp_path):
    run = _fake_run(tmp_path / "r", "sft", 1e-5, 0.0)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="empty"):
        read_run(run)
