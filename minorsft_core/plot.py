"""``minorsft plot``: the paper's Figure 1 view of several training runs.

Reads each run directory's ``metrics.jsonl`` (one line per optimizer step) and
``config.yaml`` (the resolved config stage two saves) and draws deviation (Eq. 8),
loss and the mean MinorSFT coefficient against step, one line per run, labelled by
loss type and hyper-parameters. matplotlib is imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

PANELS = (
    ("deviation", "deviation D (nats / answer token, Eq. 8)"),
    ("loss", "training loss"),
    ("coef_mean", "mean coefficient w = 2·sigmoid(-beta·delta)"),
)


def read_run(run_dir: str | os.PathLike) -> tuple[str, list[dict]]:
    """(label, metrics rows) of one run directory; FileNotFoundError names what is missing."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; is this a `minorsft train --output` directory?")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise FileNotFoundError(f"{metrics_path}: empty; the run has not finished a step yet")
    return run_label(run_dir), rows


def run_label(run_dir: Path) -> str:
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return run_dir.name
    config = yaml.safe_load(config_path.read_text())
    label = f"{config['loss']} lr={config['lr']:g}"
    if config["loss"] != "sft":
        label += f" beta={config['beta']:g}"
    return label


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the runs on one figure with three panels and save it as ``out`` (PNG/PDF/SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(run_dir) for run_dir in run_dirs]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for axis, (key, ylabel) in zip(axes, PANELS, strict=True):
        for label, rows in runs:
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=label, marker="." if len(points) < 40 else None)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0].axhline(0.0, color="black", linewidth=0.6)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
