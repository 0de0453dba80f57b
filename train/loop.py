"""The training loop: batch -> policy logps -> loss -> backward -> step -> log.

Normalisation (SPEC §2: the step's loss and gradient are the mean over the *global*
batch). A step's micro-batch count per rank may vary (``--max-tokens-per-micro-batch``),
so the loop, not DeepSpeed's fixed ``gradient_accumulation_steps``, owns the
accumulation window: it marks the last micro-batch as the boundary and asks
``engine.backward`` not to divide by the accumulation steps. The gradient reduction
averages over the W ranks. So a micro-batch's loss must be ``sum_i l_i / (count / W)``,
where ``count`` is the global batch's sample count (or answer-token count for
token-normalised SFT): then the update's gradient is ``(1 / count) * sum_i grad l_i``
whatever the split. The counts come from the data plan every rank computes alike; the
loss functions stay pure and take them through ``normalizer``.
"""

from __future__ import annotations

import dataclasses
import sys
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
_SUMS = ("loss", "deviation", "abs_deviation", "coef", "policy_logp", "ref_logp", "answer_tokens", "samples", "stop")
# Per-rank extremes reduced with MAX (minima negated).
_EXTREMES = ("coef_max", "neg_coef_min", "abs_deviation_max")


def normalizer(config, rows: np.ndarray, answer_len: np.ndarray, layout: Layout) -> float:
    """What each micro-batch's summed loss is divided by (see the module docstring)."""
    count = float(answer_len[rows].sum()) if config.token_normalize else float(len(rows))
    return count / layout.world


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
    """This micro-batch's share of ``_SUMS`` and its ``_EXTREMES``, left on the device:
    the step's stats cross to the host once, after their all-reduce (``_global_stats``),
    so no micro-batch waits for the device to finish before the next is launched."""
    coef = losses.minorsft_coef(policy_logps, ref_logp_sum, beta=config.beta)
    abs_deviation = (policy_logps.detach() - ref_logp_sum).abs() / answer_len  # [B] |delta_i| / m_i
    stats = torch.stack([
        loss.detach().double(),
        losses.deviation(policy_logps, ref_logp_sum, answer_len, normalizer=1.0).double(),
        abs_deviation.sum().double(),
        coef.sum().double(), policy_logps.detach().sum().double(), ref_logp_sum.sum().double(),
        # filled on the device: torch.tensor(x, device=cuda) would be a blocking host-to-device copy
        answer_len.sum().double(), torch.full((), float(len(answer_len)), dtype=torch.float64, device=coef.device),
        torch.zeros((), dtype=torch.float64, device=coef.device),  # "stop", set once per step
        coef.max().double(), -coef.min().double(), abs_deviation.max().double(),
    ])
    return stats[:len(_SUMS)], stats[len(_SUMS):]


def _global_stats(sums: torch.Tensor, extremes: torch.Tensor) -> tuple[dict, dict]:
    """All-reduce the step's stats (device tensors: NCCL reduces only those), then bring
    them to the host: the one device sync of the step's statistics."""
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    sums, extremes = sums.cpu(), extremes.cpu()
    return dict(zip(_SUMS, sums.tolist(), strict=True)), dict(zip(_EXTREMES, extremes.tolist(), strict=True))


def agreement_with_reference(total: dict, extreme: dict) -> dict:
    """The metrics of how the policy relates to the reference over a batch: Eq. 8's
    deviation, per-sample |delta_i| / m_i, and the coefficients w_i."""
    return {
        "deviation": total["deviation"] / total["samples"],
        "abs_deviation": total["abs_deviation"] / total["samples"],
        "abs_deviation_max": extreme["abs_deviation_max"],
        "coef_mean": total["coef"] / total["samples"],
        "coef_min": -extreme["neg_coef_min"],
        "coef_max": extreme["coef_max"],
    }


def parity_failures(config, metrics: dict) -> list[str]:
    """Why step 1 must not train, from its metrics (empty: go on).

    Before the first update the policy is the reference, so every delta_i measures how
    far the trainer's forward disagrees with stage one's on sample i. Per-sample
    statistics, not the signed batch mean: bf16 disagreement has both signs and
    cancels in the mean while still making each coefficient w_i noisy.
    """
    failures = []
    if metrics["abs_deviation"] > config.drift_tolerance:
        failures.append(f"mean |delta_i|/m_i {metrics['abs_deviation']:.4f} nats/token > --drift-tolerance "
                        f"{config.drift_tolerance}")
    coef_spread = max(metrics["coef_max"] - 1.0, 1.0 - metrics["coef_min"])
    if coef_spread > config.coef_tolerance:
        failures.append(f"max |w_i - 1| {coef_spread:.4f} > --coef-tolerance {config.coef_tolerance}")
    return failures


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
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=run.device)
        extremes = torch.full((len(_EXTREMES),), -float("inf"), dtype=torch.float64, device=run.device)
        micros = plan[run.rank]
        for slot, micro_rows in enumerate(micros):
            batch = collate(run.dataset, micro_rows, run.pad_token_id, packed=config.packing).to(run.device)
            engine.set_gradient_accumulation_boundary(slot == len(micros) - 1)  # this rank's window ends here
            policy_logps = engine(**batch.inputs.as_kwargs())  # [B] fp32, see logp_head
            ref_logp_sum = batch.ref_logp_sum if run.score_reference is None else run.score_reference(batch)
            loss = compute_loss(config, policy_logps, ref_logp_sum, batch.answer_len, norm)
            engine.backward(loss, scale_wrt_gas=False)  # `norm` already divides (module docstring)
            micro_sums, micro_extremes = _micro_stats(config, loss, policy_logps, ref_logp_sum, batch.answer_len)
            sums += micro_sums
            extremes = torch.maximum(extremes, micro_extremes)
            if slot < len(micros) - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        sums[_SUMS.index("stop")] = float(run.stop_requested())
        total, extreme = _global_stats(sums, extremes)
        agreement = agreement_with_reference(total, extreme)
        if step == 1:
            if run.rank == 0:
                print(f"minorsft: step-1 parity with stage one (policy = reference): |delta|/m mean "
                      f"{agreement['abs_deviation']:.2e} max {agreement['abs_deviation_max']:.2e} nats/token, "
                      f"coef {agreement['coef_min']:.4f}..{agreement['coef_max']:.4f}", file=sys.stderr, flush=True)
            if parity_failures(config, agreement):
                return DRIFTED, 0, agreement
        lr = engine.get_lr()[0]  # the lr this update uses; the scheduler advances in step()
        engine.step()
        elapsed = time.perf_counter() - started
        real_tokens = int(run.lengths[rows].sum())
        metrics = {
            "step": step,
            "loss": total["loss"] / layout.world,
            **agreement,
            "policy_logp_per_token": total["policy_logp"] / total["answer_tokens"],
            "ref_logp_per_token": total["ref_logp"] / total["answer_tokens"],
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "samples_per_s": len(rows) / elapsed,
            "tokens_per_s": real_tokens / elapsed,
            "padding_fraction": padding_fraction(plan, run.lengths, packed=config.packing),
        }
        log.log(metrics)
        if total["stop"] > 0:
            run.save(step)
            return PREEMPTED, step, metrics
        if step % config.save_steps == 0 and step < run.total_steps:
            run.save(step)
    return COMPLETED, run.total_steps, metrics
