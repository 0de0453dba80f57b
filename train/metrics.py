"""Rank 0's step log: ``OUTPUT/metrics.jsonl`` (one JSON line per optimizer step), a
progress bar, and TensorBoard / W&B when installed and asked for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minorsft_core.atomic import write_text_atomic

# External checks read these keys; every line has exactly them.
METRIC_KEYS = (
    "step", "loss", "deviation", "abs_deviation", "abs_deviation_max", "coef_mean", "coef_min", "coef_max", "policy_logp_per_token",
    "ref_logp_per_token", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "padding_fraction",
)


def read_metrics(path: str | Path) -> list[dict]:
    """The logged steps. Every complete line ends with a newline: a last line without one
    is a write cut short by a kill (never a step that was checkpointed: a step's line is
    flushed before its checkpoint is taken), so it is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


class MetricsLog:
    """Writes on rank 0, does nothing elsewhere; ``resume_step`` drops lines of steps a
    killed run logged after its last checkpoint (they are about to be redone)."""

    def __init__(self, output: Path, *, enabled: bool, total_steps: int, resume_step: int, config):
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self._sinks = []
        if not enabled:
            return
        kept = [m for m in read_metrics(self.path) if m["step"] <= resume_step]
        # Replaced, never truncated in place: a kill during the rewrite keeps the old log.
        write_text_atomic(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self._file = open(self.path, "a")
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stderr)
        if config.tensorboard:
            self._sinks.append(_tensorboard(output))
        if config.wandb:
            self._sinks.append(_wandb(config))
        self._sinks = [sink for sink in self._sinks if sink is not None]

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        assert tuple(metrics) == METRIC_KEYS, f"metric keys {tuple(metrics)} != {METRIC_KEYS}"
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", dev=f"{metrics['deviation']:+.4f}",
                              lr=f"{metrics['lr']:.2e}")
        for sink in self._sinks:
            sink(metrics)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._file.close()


def _warn(message: str) -> None:
    print(f"minorsft: warning: {message}", file=sys.stderr)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _warn("--tensorboard given but tensorboard is not installed (pip install tensorboard); skipping it")
        return None
    writer = SummaryWriter(str(output / "tensorboard"))

    def sink(metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, metrics["step"])
        writer.flush()

    return sink


def _wandb(config):
    try:
        import wandb
    except ImportError:
        _warn("--wandb given but wandb is not installed (pip install wandb); skipping it")
        return None
    import dataclasses

    run = wandb.init(project="minorsft", config=dataclasses.asdict(config), resume="allow")

    def sink(metrics: dict) -> None:
        run.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    return sink
