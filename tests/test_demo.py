"""`minorsft demo`, the README's main job: both stages end to end on the bundled default,
exactly as a user runs it (real vLLM CPU engine when installed, real DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "minorsft_core.cli", "demo", "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result.stdout


def test_demo_accounts_for_every_row(demo_run):
    output, stdout = demo_run
    summary = json.loads((output / "demo_summary.json").read_text())
    lines = [line for line in (REPO / "data/default/train.jsonl").read_text().splitlines() if line.strip()]
    assert summary["rows_scored"] + summary["rows_rejected"] == len(lines)
    assert summary["rows_rejected"] == 4  # the bundled set's deliberately bad rows
    reasons = sorted(json.loads(line)["reason"] for path in (output / "shards").glob("rejects-*.jsonl")
                     for line in path.read_text().splitlines())
    assert reasons == ["bad_role", "empty_answer", "empty_answer", "invalid_json"]
    assert f"{summary['rows_scored']} rows scored, 4 rejected" in stdout


def test_demo_trains_each_loss(demo_run):
    output, stdout = demo_run
    runs = {r["loss_type"]: r for r in json.loads((output / "demo_summary.json").read_text())["runs"]}
    assert set(runs) == {"sft", "minorsft", "dpo_sft"}
    for loss, row in runs.items():
        assert row["steps"] > 10 and loss in stdout
        metrics = [json.loads(line) for line in (output / loss / "metrics.jsonl").read_text().splitlines()]
        assert abs(metrics[0]["deviation"]) < 1e-3  # stage one and stage two agree at step 1
        assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns
        assert 0 < row["coef_min"] <= row["coef_max"] < 2
        assert (output / loss / "final" / "model.safetensors").exists()
        assert row["target_loss"] > 0
    assert (output / "figure.png").stat().st_size > 10_000


def test_demo_outside_a_checkout_says_it_needs_one(tmp_path):
    """Installed as a wheel installs it (the packages only), the demo refuses clearly."""
    import shutil

    site = tmp_path / "site"
    for package in ("minorsft_core", "precompute", "train"):  # pyproject's [tool.setuptools] packages
        shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; from minorsft_core import demo; assert demo.__file__.startswith(sys.argv[1]), demo.__file__; "
            "from minorsft_core.cli import main; sys.argv[1:] = ['demo', '--output', 'out']; main()")
    result = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert result.returncode == 3, result.stderr[-3000:]
    assert "minorsft demo runs from a source checkout" in result.stderr
    assert not (tmp_path / "out").exists()
