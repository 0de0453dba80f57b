"""The training loop: batch -> policy logps -> loss -> backward -> step -> log.

Normalisation (SPEC §2: the step's loss and gradient are the mean over the *global*
batch). DeepSpeed's ``engine.backward`` divides each micro-batch's loss by the
accumulation steps A, and its gradient reduction averages over the W ranks. So a
micro-batch's loss must be ``sum_i l_i / (count / (A * W))``, where ``count`` is
the global batch's sample count (or answer-token count for token-normalised SFT):
then the update's gradient is ``(1 / count) * sum_i grad l_i`` whatever the split.
The counts come from the data plan every rank computes alike; the loss functions
stay pure and take them through ``normalizer``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from minorsft_core import losses
from train.data import Layout, collate, epoch_batches, padding_fraction, split_global_batch
from train.metrics import MetricsLog

COMPLETED, PREEMPTED, DRIFTED = "completed", "preempted", "drifted"

# Per-rank sums reduced once per step: what the logged metrics are means of.
_SUMS = ("loss", "deviation", "coef", "policy_logp", "ref_logp", "answer_tokens", "samples", "stop")


def normalizer(config, rows: np.ndarray, answer_len: np.ndarray, layout: Layout) -> float:
    """What each micro-batch's summed loss is divided by (see the module docstring)."""
    count = float(answer_len[rows].sum()) if config.token_normalize else float(len(rows))
    return count / (layout.accumulation * layout.world)


def compute_loss(config, policy_logps, ref_logp_sum, answer_len, norm) -> torch.Tensor:
    if config.loss == "sft":
        return losses.sft_loss(policy_logps, answer_len, token_normalize=config.token_normalize, normalizer=norm)
    if config.loss == "dpo_sft":
        return losses.dpo_sft_loss(policy_logps, ref_logp_sum, beta=config.beta, normalizer=norm)
    return losses.minorsft_loss(policy_logps, ref_logp_sum, answer_len, beta=config.beta, normalizer=norm)


@dataclasses.dataclass
class Run:
    """What ``fit`` works on, set up by ``train.run``."""

    config: object
    engine: object  # the DeepSpeed policy engine
    dataset: object  # memory-mapped shards
    lengths: np.ndarray  # [num_rows] tokens per row
    answer_len: np.ndarray  # [num_rows]
    layout: Layout
    rank: int
    device: torch.device
    pad_token_id: int
    total_steps: int
    steps_per_epoch: int
    score_reference: Callable | None  # --reference online: MicroBatch -> ref_logp_sum [B]
    save: Callable[[int], None]  # checkpoint at a step (a collective)
    stop_requested: Callable[[], bool]  # SIGTERM/SIGINT seen on this rank


def _micro_stats(config, loss, policy_logps, ref_logp_sum, answer_len) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of ``_SUMS`` and its ``[max coef, -min coef]``, moved to
    the CPU in one transfer (one device sync per micro-batch)."""
    coef = losses.minorsft_coef(policy_logps, ref_logp_sum, beta=config.beta)
    stats = torch.stack([
        loss.detach().double(),
        losses.deviation(policy_logps, ref_logp_sum, answer_len, normalizer=1.0).double(),
        coef.sum().double(), policy_logps.detach().sum().double(), ref_logp_sum.sum().double(),
        answer_len.sum().double(), torch.tensor(float(len(answer_len)), dtype=torch.float64, device=coef.device),
        torch.zeros((), dtype=torch.float64, device=coef.device),  # "stop", set once per step
        coef.max().double(), -coef.min().double(),
    ]).cpu()
    return stats[:len(_SUMS)], stats[len(_SUMS):]


def _global_stats(sums: torch.Tensor, coef_extremes: torch.Tensor) -> tuple[dict, list[float]]:
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(coef_extremes, op=dist.ReduceOp.MAX)
    return dict(zip(_SUMS, sums.tolist(), strict=True)), coef_extremes.tolist()


def fit(run: Run, start_step: int, log: MetricsLog) -> tuple[str, int, dict | None]:
    """Train from ``start_step`` (0: fresh) to ``run.total_steps``; return
    ``(status, last completed step, last metrics)``."""
    config, engine, layout = run.config, run.engine, run.layout
    metrics = None
    epoch, batches = None, None
    for step in range(start_step + 1, run.total_steps + 1):
        if (step - 1) // run.steps_per_epoch != epoch:
            epoch = (step - 1) // run.steps_per_epoch
            batches = epoch_batches(run.lengths, layout.global_batch, config.seed, epoch)
        rows = batches[(step - 1) % run.steps_per_epoch]
        plan = split_global_batch(rows, run.lengths, layout)
        norm = normalizer(config, rows, run.answer_len, layout)
        started = time.perf_counter()
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        coef_extremes = torch.full((2,), -float("inf"), dtype=torch.float64)  # [max, -min]
        micros = plan[run.rank]
        for slot, micro_rows in enumerate(micros):
            batch = collate(run.dataset, micro_rows, run.pad_token_id).to(run.device)
            logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            policy_logps = losses.sequence_logps(logits, batch.input_ids, batch.completion_mask)
            ref_logp_sum = batch.ref_logp_sum if run.score_reference is None else run.score_reference(batch)
            loss = compute_loss(config, policy_logps, ref_logp_sum, batch.answer_len, norm)
            engine.backward(loss)
            micro_sums, micro_extremes = _micro_stats(config, loss, policy_logps, ref_logp_sum, batch.answer_len)
            sums += micro_sums
            coef_extremes = torch.maximum(coef_extremes, micro_extremes)
            if slot < len(micros) - 1:
                engine.step()  # DeepSpeed counts micro-steps; only the window's last one updates
        sums[_SUMS.index("stop")] = float(run.stop_requested())
        total, (coef_max, neg_coef_min) = _global_stats(sums, coef_extremes)
        deviation = total["deviation"] / total["samples"]
        if step == 1 and abs(deviation) > config.drift_tolerance:
            return DRIFTED, 0, {"deviation": deviation}
        lr = engine.get_lr()[0]  # the lr this update uses; the scheduler advances in step()
        engine.step()
        elapsed = time.perf_counter() - started
        real_tokens = int(run.lengths[rows].sum())
        metrics = {
            "step": step,
            "loss": total["loss"] / (layout.accumulation * layout.world),
            "deviation": deviation,
            "coef_mean": total["coef"] / total["samples"],
            "coef_min": -neg_coef_min,
            "coef_max": coef_max,
            "policy_logp_per_token": total["policy_logp"] / total["answer_tokens"],
            "ref_logp_per_token": total["ref_logp"] / total["answer_tokens"],
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "samples_per_s": len(rows) / elapsed,
            "tokens_per_s": real_tokens / elapsed,
            "padding_fraction": padding_fraction(plan, run.lengths),
        }
        log.log(metrics)
        if total["stop"] > 0:
            run.save(step)
            return PREEMPTED, step, metrics
        if step % config.save_steps == 0 and step < run.total_steps:
            run.save(step)
    return COMPLETED, run.total_steps, metrics
