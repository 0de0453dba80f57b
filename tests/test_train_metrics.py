"""`--tensorboard` writes the same scalars as metrics.jsonl; a sink that is not installed
(`--wandb` here) is a warning, and metrics.jsonl is still written."""

from __future__ import annotations

import json
import sys
import types

import pytest

from train.metrics import METRIC_KEYS, MetricsLog, read_metrics


def _config(**flags):
    return types.SimpleNamespace(**{"tensorboard": False, "wandb": False, **flags})


def _metrics(step: int) -> dict:
    return {key: (step if key == "step" else 0.5 * step + k) for k, key in enumerate(METRIC_KEYS)}


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, enabled=True, total_steps=3, resume_step=0, config=_config(tensorboard=True))
    for step in (1, 2, 3):
        log.log(_metrics(step))
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [_metrics(s) for s in (1, 2, 3)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in METRIC_KEYS if k != "step"}
    deviation = [(e.step, e.value) for e in events.Scalars("train/deviation")]
    assert deviation == [(s, pytest.approx(_metrics(s)["deviation"])) for s in (1, 2, 3)]


def test_missing_sink_is_a_warning_not_a_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises
    log = MetricsLog(tmp_path, enabled=True, total_steps=1, resume_step=0, config=_config(wandb=True))
    log.log(_metrics(1))
    log.close()
    assert "--wandb given but wandb is not installed" in capsys.readouterr().err
    assert read_metrics(tmp_path / "metrics.jsonl") == [_metrics(1)]


def test_resume_replaces_the_log_and_ignores_a_line_cut_short_by_a_kill(tmp_path):
    """A run killed while appending step 4 left half a line; it resumes from step 2."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_metrics(s)) + "\n" for s in (1, 2, 3)) + json.dumps(_metrics(4))[:20])
    before = tmp_path / "before.jsonl"
    before.hardlink_to(path)
    log = MetricsLog(tmp_path, enabled=True, total_steps=4, resume_step=2, config=_config())
    log.close()
    assert read_metrics(path) == [_metrics(1), _metrics(2)]
    # Renamed over, never truncated in place: a kill during the rewrite keeps the old log.
    assert before.read_text().startswith(json.dumps(_metrics(1)))
    assert len(read_metrics(before)) == 3
