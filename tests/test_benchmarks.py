"""The benchmark table's ratios (the benchmarks themselves run by hand: docs quote them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from run_all import table  # noqa: E402


def test_ratios_are_to_each_stages_baseline():
    precompute = [{"engine": "hf", "tokens_per_s": 100.0}, {"engine": "vllm", "tokens_per_s": 250.0}]
    train = {name: {"step_s": s, "tokens_per_s": 1 / s, "peak_mib": m}
             for name, s, m in (("sft", 2.0, 1000.0), ("minorsft", 2.04, 1010.0))}
    rows = {(measure, variant): ratio for measure, variant, _, ratio in table(precompute, train)}
    assert rows[("stage one tokens/s", "vllm")] == 2.5
    assert rows[("stage two s/step", "minorsft")] == 1.02
    assert rows[("stage two peak MiB", "minorsft")] == 1.01
    assert rows[("stage two tokens/s", "sft")] == 1.0


def test_stage_two_rates_leave_out_step_one_and_passes_count_every_step():
    from bench_train import step_stats

    steps = [{"seconds": 10.0, "tokens": 100, "padding_fraction": 0.2},  # warm-up, left out of the rate
             {"seconds": 2.0, "tokens": 400, "padding_fraction": 0.1},
             {"seconds": 3.0, "tokens": 600, "padding_fraction": 0.0}]
    stats = step_stats(steps, wall_s=20.0, peak_mib=512.0)
    assert stats["tokens_per_s"] == 200.0 and stats["step_s"] == 2.5
    assert stats["pass_s"] == 15.0 and stats["wall_s"] == 20.0 and stats["padding"] == pytest.approx(0.1)
