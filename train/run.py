"""``minorsft train``: check the inputs, set up DeepSpeed, resume, train, save.

Order matters: every check that can refuse the run (stage-one output incomplete or
inconsistent, tokenizer mismatch, changed config on resume) runs before any
accelerator work, so a bad job fails in seconds, not after loading a 70B model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import yaml

from minorsft_core.cli import EXIT_BAD_INPUT, EXIT_DRIFT, EXIT_ENGINE, EXIT_IO, EXIT_OK, EXIT_PREEMPTED
from minorsft_core.config import TrainConfig, save_config
from minorsft_core.data import DataError
from minorsft_core.schema import (
    ANSWER_LEN,
    ContractError,
    ScannedOutput,
    describe_differences,
    model_fingerprint,
)
from train.stage_one import check_tokenizer, scan_stage_one

# Fields that may change between a run and its resume without changing what is trained.
_OPERATIONAL_FIELDS = {"save_steps", "save_total_limit", "tensorboard", "wandb", "output"}


def _say(message: str) -> None:
    print(f"minorsft: {message}", file=sys.stderr, flush=True)


def check_inputs(config: TrainConfig):
    """Everything that can refuse the run without an accelerator. Returns the scanned
    shards and the policy's tokenizer."""
    from transformers import AutoTokenizer

    scanned = scan_stage_one(config.data)
    if Path(config.model).exists() and not Path(config.model, "config.json").exists():
        raise FileNotFoundError(f"--model {config.model}: no config.json; pass a Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except OSError as err:  # not a directory here and not resolvable as a hub id
        raise FileNotFoundError(f"--model {config.model}: cannot load its tokenizer ({err})") from err
    meta = scanned.metadata
    check_tokenizer(tokenizer, meta, model=config.model, data=config.data)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise DataError(f"{config.model}: the tokenizer has neither a pad nor an eos token to pad batches with")
    if config.reference == "online":
        reference = Path(meta.reference_model)
        if not reference.is_dir() or model_fingerprint(reference) != meta.reference_fingerprint:
            raise ContractError(
                f"--reference online scores with the reference stage one used, {reference}, but it is "
                "missing here or its weights changed since (fingerprint differs). Make it available "
                "unchanged, or train with the precomputed reference."
            )
    check_resume_config(config)
    return scanned, tokenizer


def check_resume_config(config: TrainConfig) -> None:
    saved_path = Path(config.output) / "config.yaml"
    if not saved_path.exists():
        return
    saved = {k: v for k, v in yaml.safe_load(saved_path.read_text()).items() if k not in _OPERATIONAL_FIELDS}
    current = {k: v for k, v in dataclasses.asdict(config).items() if k not in _OPERATIONAL_FIELDS}
    diff = describe_differences(saved, current)
    if diff:
        raise ContractError(
            f"{config.output} holds a run with a different config (saved != now):\n{diff}\n"
            "Resuming would mix two runs. Re-run with the saved options, or use a new --output."
        )


def plan_steps(config: TrainConfig, num_rows: int) -> tuple[int, int, int]:
    """``(steps per epoch, total steps, warm-up steps)``."""
    steps_per_epoch = num_rows // config.global_batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{config.data}: {num_rows} samples, fewer than one global batch of "
                        f"{config.global_batch_size}; lower --global-batch-size")
    total = config.max_steps or max(1, math.floor(config.epochs * steps_per_epoch))
    return steps_per_epoch, total, math.ceil(config.warmup_ratio * total)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None


def main(config: TrainConfig) -> int:
    try:
        scanned, tokenizer = check_inputs(config)
    except (ContractError, DataError, FileNotFoundError) as err:
        _record_failure(config, EXIT_BAD_INPUT, err)
        raise
    except OSError as err:
        _record_failure(config, EXIT_IO, err)
        raise
    summary = Path(config.output) / "summary.json"
    if _summary_status(summary) == "completed":
        # Re-running a batch job that already finished must not train again from its
        # last periodic checkpoint and overwrite final/.
        _say(f"{config.output} already holds a completed run ({config.output}/final); nothing to do")
        return EXIT_OK
    try:
        return _train(config, scanned, tokenizer)
    except (ContractError, DataError, FileNotFoundError) as err:
        _record_failure(config, EXIT_BAD_INPUT, err)
        raise
    except Exception as err:  # the engine failed at run time: a retry may help, bad input would not
        traceback.print_exc()
        _record_failure(config, EXIT_ENGINE, err)
        return EXIT_ENGINE


def _summary_status(path: Path) -> str | None:
    return json.loads(path.read_text())["status"] if path.exists() else None


def _record_failure(config: TrainConfig, exit_code: int, err: BaseException) -> None:
    """Write ``summary.json`` for a run that failed, so a batch script can branch on it:
    launchers such as torchrun report any rank's failure as their own exit code 1.
    Rank 0 writes it; a completed run's summary is never replaced."""
    summary = Path(config.output) / "summary.json"
    if os.environ.get("RANK", "0") != "0" or _summary_status(summary) == "completed":
        return
    try:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"status": "failed", "exit_code": exit_code, "reason": str(err)}, indent=2)
                           + "\n")
    except OSError:
        pass  # the output directory itself is unusable; the error above already says why


def _train(config: TrainConfig, scanned: ScannedOutput, tokenizer) -> int:
    import torch
    import torch.distributed as dist

    from minorsft_core.batching import resolve_dtype
    from train import engine as ds
    from train.data import Layout, open_shards, sequence_lengths
    from train.loop import COMPLETED, DRIFTED, PREEMPTED, Run, fit
    from train.metrics import MetricsLog

    started = time.time()
    output = Path(config.output)
    stop = _StopFlag()
    rank, world, device = ds.init_distributed()
    layout = Layout(config.global_batch_size, config.micro_batch_size, world,
                    max_tokens=config.max_tokens_per_micro_batch, packed=config.packing)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        save_config(config, output / "config.yaml")
        open_shards(scanned, output / "data-cache")  # build the Arrow cache once, before the others read it
    dist.barrier()
    dataset = open_shards(scanned, output / "data-cache")
    lengths = sequence_lengths(dataset)
    answer_len = dataset.data.column(ANSWER_LEN).to_numpy()
    steps_per_epoch, total_steps, warmup_steps = plan_steps(config, len(lengths))
    dtype = getattr(torch, resolve_dtype(config.dtype))
    # DeepSpeed's batch keys only have to multiply out; the loop owns accumulation (train.loop).
    ds_config = ds.ds_config(config, micro=layout.global_batch // (layout.accumulation * world),
                             accumulation=layout.accumulation, dtype=dtype)
    engine = ds.load_policy(config, ds_config, dtype, total_steps=total_steps, warmup_steps=warmup_steps)
    score_reference = None
    if config.reference == "online":
        score_reference = _online_reference(ds.load_reference(
            scanned.metadata.reference_model, ds.reference_ds_config(ds_config), config, dtype))
    checkpoints = output / "checkpoints"
    start_step = ds.load_checkpoint(engine, checkpoints)
    if rank == 0:
        _say(f"{'resuming at step ' + str(start_step) if start_step else 'starting'}: {len(lengths)} samples, "
             f"{total_steps} steps of {layout.global_batch} = {_split(layout)}, {'packed' if layout.packed else 'padded'}"
             f", loss {config.loss}, ZeRO-{ds_config['zero_optimization']['stage']}, {dtype}")
    log = MetricsLog(output, enabled=rank == 0, total_steps=total_steps, resume_step=start_step, config=config)
    run = Run(
        config=config, engine=engine, dataset=dataset, lengths=lengths, answer_len=answer_len, layout=layout,
        rank=rank, device=device, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        score_reference=score_reference,
        save=lambda step: ds.save_checkpoint(engine, checkpoints, step, config.save_total_limit),
        stop_requested=stop,
    )
    try:
        status, last_step, metrics = fit(run, start_step, log)
    finally:
        log.close()
    if status == COMPLETED:
        ds.save_final(engine, tokenizer, output / "final")
    summary = {
        "status": status, "exit_code": {COMPLETED: EXIT_OK, PREEMPTED: EXIT_PREEMPTED, DRIFTED: EXIT_DRIFT}[status],
        "step": last_step, "total_steps": total_steps, "last_metrics": metrics,
        "world_size": world, "gradient_accumulation_steps": None if layout.max_tokens else layout.accumulation, "dtype": str(dtype),
        "samples": len(lengths), "rows_rejected_by_stage_one": scanned.rows_rejected,
        "reference_fingerprint": scanned.metadata.reference_fingerprint, "seconds": time.time() - started,
        "final_model": str(output / "final") if status == COMPLETED else None,
        "peak_memory_mib": _peak_memory_mib(),
    }
    if rank == 0:
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    if status == DRIFTED:
        if rank == 0:
            _say(_drift_message(config, metrics))
        return EXIT_DRIFT
    if status == PREEMPTED:
        if rank == 0:
            _say(f"stopped by signal {stop.signal} after step {last_step}, checkpointed under {checkpoints}; "
                 "re-run the same command to resume")
        return EXIT_PREEMPTED
    if rank == 0:
        _say(f"done: {output / 'final'}")
    return EXIT_OK


def _split(layout) -> str:
    if layout.max_tokens:
        return f"{layout.world} ranks x micro-batches of <= {layout.max_tokens} tokens"
    return f"{layout.world} ranks x {layout.accumulation} accumulation x {layout.micro} micro"


def _peak_memory_mib() -> float:
    """This rank's peak: accelerator memory allocated on GPU, resident set size on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def _drift_message(config: TrainConfig, agreement: dict) -> str:
    from train.loop import parity_failures

    return (
        f"step 1: the policy disagrees with stage one's reference ({'; '.join(parity_failures(config, agreement))}; "
        f"signed mean delta/m {agreement['deviation']:+.4f}); stopped before the first update. Before training the "
        "policy is the reference, so this measures how differently the two stages score the same samples. "
        "Likely causes: --model is not the reference the shards were scored with; a tokenizer, chat template or "
        "dtype mismatch between the stages. bf16 scoring differs per sample (docs/train.md, parity table): score "
        "stage one in the dtype you train in, or with `--engine hf` (the trainer's own head), or in float32. If the "
        "policy deliberately differs from the reference (continuing from a fine-tuned checkpoint), raise "
        "--drift-tolerance and --coef-tolerance."
    )


def _online_reference(reference_engine):
    import torch

    @torch.no_grad()
    def score(batch):
        return reference_engine(**batch.inputs.as_kwargs()).double()

    return score
