"""The benchmark table's ratios (the benchmarks themselves run by hand: docs quote them)."""

from __future__ import annotations

import sys
from pathlib import Path

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
