"""``minorsft demo``: both stages end to end on the bundled default, on CPU.

Runs the real commands as a user would (each stage in its own process, as on a
cluster): stage one scores ``data/default/train.jsonl`` with the bundled tiny model,
stage two trains ``sft``, ``minorsft`` and ``dpo_sft`` from it with the settings in
``configs/demo/``, then stage one scores the held-out target set with each final
model (target-set loss, and deviation from the reference on data it never trained
on). Prints one table and draws the runs with ``minorsft plot``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from minorsft_core import schema
from minorsft_core.plot import plot_runs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "default"
LOSSES = ("sft", "minorsft", "dpo_sft")


def require_checkout() -> None:
    """The demo's settings and data are files of the repository, not of the installed
    package: say so instead of failing halfway through."""
    missing = [str(path) for path in (REPO / "configs" / "demo", DEFAULT_DATA) if not path.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"minorsft demo runs from a source checkout: {', '.join(missing)} not found (configs/ and data/ "
            "are not installed with the package). Clone the repository, `bash scripts/setup-cpu.sh` in it, "
            "and run `.venv/bin/minorsft demo` there."
        )


def run_minorsft(*args: str, log_path: Path) -> float:
    """Run one ``minorsft`` command in a child process; return its wall time. Its output
    goes to ``log_path``; on failure the log's tail is shown and the demo stops."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-m", "minorsft_core.cli", *args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"`minorsft {args[0]}` failed (exit {result.returncode}); log {log_path}:\n{tail}")
    return time.perf_counter() - started


def target_scores(shard_dir: Path) -> dict[str, tuple[float, int]]:
    """sample_id -> (summed answer log-prob, answer tokens) from a stage-one output."""
    scanned = schema.scan_output_dir(shard_dir)
    scores = {}
    for path in scanned.shard_paths:
        table = pq.read_table(path, columns=[schema.SAMPLE_ID, schema.REF_LOGP_SUM, schema.ANSWER_LEN]).to_pydict()
        for sample_id, logp, length in zip(*table.values(), strict=True):
            scores[sample_id] = (logp, length)
    return scores


def target_metrics(model_scores: dict, reference_scores: dict) -> tuple[float, float]:
    """(target loss: mean -logp/m, as sft_loss; target deviation: mean delta/m, Eq. 8)."""
    ids = sorted(reference_scores)
    loss = sum(-model_scores[i][0] / model_scores[i][1] for i in ids) / len(ids)
    drift = sum((model_scores[i][0] - reference_scores[i][0]) / reference_scores[i][1] for i in ids) / len(ids)
    return loss, drift


def run_demo(output: Path, engine: str = "auto", losses: tuple[str, ...] = LOSSES) -> list[dict]:
    output = output.resolve()
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shards = output / "shards"
    print(f"minorsft demo: stage one (engine {engine}) on {DEFAULT_DATA / 'train.jsonl'} ...", flush=True)
    precompute_s = run_minorsft("precompute", "--config", "configs/demo/precompute.yaml", "--engine", engine,
                             "--output", str(shards), "--quiet", log_path=logs / "precompute.log")
    scanned = schema.scan_output_dir(shards)
    reference_target = output / "target" / "reference"
    # Target-set scoring uses the hf engine: 64 rows do not repay a vLLM engine start each.
    run_minorsft("precompute", "--config", "configs/demo/precompute.yaml", "--engine", "hf", "--data",
              str(DEFAULT_DATA / "target.jsonl"), "--output", str(reference_target), "--quiet",
              log_path=logs / "target-reference.log")
    reference_scores = target_scores(reference_target)

    rows = []
    for loss in losses:
        print(f"minorsft demo: stage two, --loss {loss} ...", flush=True)
        run_dir = output / loss
        train_s = run_minorsft("train", "--config", f"configs/demo/{loss}.yaml", "--data", str(shards),
                            "--output", str(run_dir), log_path=logs / f"train-{loss}.log")
        run_minorsft("precompute", "--config", "configs/demo/precompute.yaml", "--engine", "hf",
                  "--model", str(run_dir / "final"), "--data", str(DEFAULT_DATA / "target.jsonl"),
                  "--output", str(output / "target" / loss), "--quiet", log_path=logs / f"target-{loss}.log")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        target_loss, target_deviation = target_metrics(target_scores(output / "target" / loss), reference_scores)
        rows.append({
            "loss_type": loss, "steps": metrics[-1]["step"], "final_loss": metrics[-1]["loss"],
            "final_deviation": metrics[-1]["deviation"],
            "coef_min": min(m["coef_min"] for m in metrics), "coef_max": max(m["coef_max"] for m in metrics),
            "target_loss": target_loss, "target_deviation": target_deviation, "train_s": train_s,
        })
    figure = plot_runs([output / loss for loss in losses], output / "figure.png", title="minorsft demo")
    summary = {"rows_scored": scanned.rows_scored, "rows_rejected": scanned.rows_rejected,
               "precompute_s": precompute_s, "runs": rows}
    (output / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary, output, figure)
    return rows


def print_table(summary: dict, output: Path, figure: Path) -> None:
    print(f"\nstage one: {summary['rows_scored']} rows scored, {summary['rows_rejected']} rejected "
          f"({output / 'shards'}/rejects-*.jsonl), {summary['precompute_s']:.0f} s")
    header = (f"{'loss':<9}{'steps':>6}{'final loss':>12}{'deviation':>11}{'coef range':>16}"
              f"{'target loss':>13}{'target dev':>12}{'train s':>9}")
    print(header)
    print("-" * len(header))
    for row in summary["runs"]:
        coef_range = f"{row['coef_min']:.3f}-{row['coef_max']:.3f}"
        print(f"{row['loss_type']:<9}{row['steps']:>6}{row['final_loss']:>12.4f}{row['final_deviation']:>11.4f}"
              f"{coef_range:>16}{row['target_loss']:>13.4f}{row['target_deviation']:>12.4f}{row['train_s']:>9.0f}")
    print(f"\nruns: {', '.join(str(output / r['loss_type']) for r in summary['runs'])} "
          "(metrics.jsonl, config.yaml, final/)")
    print(f"figure: {figure}\nsummary: {output / 'demo_summary.json'}\nlogs: {output / 'logs'}")
