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

from minorsft_core.atomic import write_text_atomic
from minorsft_core.config import TrainConfig, default_zero_stage, save_config
from minorsft_core.errors import (
    EXIT_DRIFT,
    EXIT_ENGINE,
    EXIT_OK,
    EXIT_PREEMPTED,
    ConfigError,
    ContractError,
    DataError,
    EngineError,
    MinorSFTError,
    exit_code_for,
)
from minorsft_core.model_dir import load_tokenizer
from minorsft_core.schema import ANSWER_LEN, ScannedOutput, describe_differences, model_fingerprint
from train import checkpoints
from train.stage_one import check_tokenizer, scan_stage_one

# What is trained: a resume that changed any of these would continue another run's
# optimizer state on other math or other data. Every other field (micro-batch size,
# gradient checkpointing, guard tolerances, kernels, ZeRO offload JSON, logging and
# saving) changes how, not what, and may differ on resume, as may the world size. The
# ZeRO stage decides the checkpoint's layout: checked against the checkpoint itself.
RESUME_FIXED_FIELDS = ("data", "model", "loss", "beta", "token_normalize", "lr", "weight_decay", "adam_beta1",
                       "adam_beta2", "max_grad_norm", "global_batch_size", "epochs", "max_steps", "warmup_ratio",
                       "seed", "dtype", "reference")


def _say(message: str) -> None:
    print(f"minorsft: {message}", file=sys.stderr, flush=True)


def check_inputs(config: TrainConfig):
    """Everything that can refuse the run without an accelerator. Returns the scanned
    shards and the policy's tokenizer."""
    scanned = scan_stage_one(config.data)
    if Path(config.model).exists() and not Path(config.model, "config.json").exists():
        raise FileNotFoundError(f"--model {config.model}: no config.json; pass a Hugging Face model directory")
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
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
    check_resume(config, scanned)
    return scanned, tokenizer


def resume_record(config: TrainConfig, scanned: ScannedOutput) -> dict:
    """What a checkpoint stores of its run, for ``check_resume``."""
    return {"config": {name: getattr(config, name) for name in RESUME_FIXED_FIELDS},
            "shards": scanned.metadata.run_fields()}


def check_resume(config: TrainConfig, scanned: ScannedOutput) -> None:
    """Refuse to continue the committed checkpoint in ``--output`` with other math or
    other data: a changed field of ``RESUME_FIXED_FIELDS``, or stage-one shards
    re-generated since (their run metadata: data and reference fingerprints,
    tokenizer, template, engine, ...). Nothing committed: nothing to mix."""
    resume = checkpoints.committed(Path(config.output) / "checkpoints")
    if resume is None:
        return
    now = resume_record(config, scanned)
    fresh = (f"To resume, re-run with what it was started with; to start fresh instead, use a new --output "
             f"(or delete {config.output}).")
    diff = describe_differences(resume["config"], now["config"])
    if diff:
        raise ConfigError(f"{config.output} holds a run at step {resume['step']} trained with other values "
                          f"(checkpoint != now):\n{diff}\nThese change what is trained. {fresh}")
    diff = describe_differences(resume["shards"], now["shards"])
    if diff:
        raise ConfigError(f"{config.data}: the stage-one shards differ from those the run in {config.output} was "
                          f"trained on up to step {resume['step']} (re-generated since; checkpoint != now):\n{diff}\n"
                          f"Resuming would mix two data sets. Restore the shards it used. {fresh}")


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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = resolve_options(config, world_size)
        if world_size > 1:
            # Join the group before any check can refuse, so that a refusal on one rank
            # ends every rank with its code instead of leaving the others waiting for a
            # peer that is gone (a launcher then reports only its own 1).
            from train import engine as ds

            ds.init_distributed()
        scanned, tokenizer = _on_every_rank(check_inputs, config)
    except (MinorSFTError, OSError) as err:
        _record_failure(config, exit_code_for(err), err)
        raise
    summary = Path(config.output) / "summary.json"
    if _summary_status(summary) == "completed":
        # Re-running a batch job that already finished must not train again from its
        # last periodic checkpoint and overwrite final/.
        _say(f"{config.output} already holds a completed run ({config.output}/final); nothing to do")
        return EXIT_OK
    try:
        return _train(config, scanned, tokenizer)
    except (MinorSFTError, OSError) as err:  # bad input found late, or the file system (disk full, permissions)
        _record_failure(config, exit_code_for(err), err)
        raise
    except Exception as err:  # the engine failed at run time: a retry may help, bad input would not
        traceback.print_exc()
        _record_failure(config, EXIT_ENGINE, err)
        raise EngineError(f"training failed: {type(err).__name__}: {err}") from err


def resolve_options(config: TrainConfig, world_size: int) -> TrainConfig:
    """``config`` with the ZeRO stage and attention resolved, after the option errors that only the
    launch (how many ranks) or a file the options name reveal. Every rank finds the
    same ones from its own environment, so each exits 2 before anything is loaded,
    without waiting for the others."""
    import importlib.util

    from minorsft_core import attention
    from train.data import Layout

    Layout(config.global_batch_size, config.micro_batch_size, world_size,
           max_tokens=config.max_tokens_per_micro_batch, packed=config.packing)
    ds_json, json_stage = {}, "auto"
    if config.deepspeed:
        try:
            ds_json = json.loads(Path(config.deepspeed).read_text())
            json_stage = ds_json.get("zero_optimization", {}).get("stage", "auto")
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigError(f"--deepspeed {config.deepspeed}: not a readable JSON object ({err})") from err
    # One stage for both: config.yaml records the one that runs. A JSON naming another
    # stage than an explicit --zero-stage is a contradiction, not something to pick from.
    if json_stage == "auto":
        stage = config.zero_stage  # None: default_zero_stage, once the checkpoint (if any) is known
    elif json_stage not in (2, 3):
        raise ConfigError(f"--deepspeed {config.deepspeed}: zero_optimization.stage {json_stage!r}; "
                          "minorsft trains with ZeRO stage 2 or 3")
    elif config.zero_stage not in (None, json_stage):
        raise ConfigError(
            f"--deepspeed {config.deepspeed} sets zero_optimization.stage {json_stage} but --zero-stage is "
            f"{config.zero_stage}: drop one of them, or make them agree")
    else:
        stage = json_stage
    if _uses_fused_adam(ds_json):
        from train import ds_ops

        problem = ds_ops.fused_adam_problem(**ds_ops.fused_adam_facts())
        if problem:
            raise ConfigError(f"on a GPU the optimizer is DeepSpeed's fused Adam, compiled on first use, and it "
                              f"cannot be compiled here: {problem}")
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation: flash_attention_2 needs the flash-attn package; install it, or "
                          "use varlen (PyTorch's own flash varlen kernel) or sdpa")
    return dataclasses.replace(config, zero_stage=stage,
                               attn_implementation=attention.resolve(config.attn_implementation, packing=config.packing))


def _uses_fused_adam(ds_json: dict) -> bool:
    """Whether DeepSpeed will build its fused Adam: on a CUDA GPU (not ROCm), unless the
    user's JSON offloads the optimizer (then its CPU Adam runs)."""
    import torch

    offload = ds_json.get("zero_optimization", {}).get("offload_optimizer")
    offloaded = isinstance(offload, dict) and offload.get("device", "none") in ("cpu", "nvme")
    return torch.cuda.is_available() and torch.version.hip is None and not offloaded


def _on_every_rank(check, config: TrainConfig):
    """``check(config)`` on this rank; if any rank of the group refused, every rank raises
    (the first refusing rank's error, or a copy of it with the same exit code), and rank 0
    records it in summary.json. Without a group it is just ``check(config)``."""
    import torch.distributed as dist

    failure = None
    try:
        result = check(config)
    except Exception as err:  # any failure, so that no rank waits below for one that left
        failure = err
    if not dist.is_initialized():
        if failure is not None:
            raise failure
        return result
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if failure is None else (exit_code_for(failure), str(failure)))
    refused = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if not refused:
        return result
    first_rank, (code, message) = refused[0]
    this_rank = dist.get_rank()
    dist.destroy_process_group()
    if first_rank == this_rank:
        raise failure
    if failure is not None:
        _say(f"this rank also refused: {failure}")
    copy = MinorSFTError(f"rank {first_rank} refused the run: {message}")
    copy.exit_code = code
    raise copy


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
        _write_summary(summary, {"status": "failed", "exit_code": exit_code, "reason": str(err)})
    except OSError:
        pass  # the output directory itself is unusable; the error above already says why


def _write_summary(path: Path, summary: dict) -> None:
    # Replaced atomically: a batch script reading it, or a kill while it is written,
    # never meets a truncated file.
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


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
    checkpoint_root = output / "checkpoints"
    layout = Layout(config.global_batch_size, config.micro_batch_size, world,
                    max_tokens=config.max_tokens_per_micro_batch, packed=config.packing)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_uncommitted(checkpoint_root, config.save_total_limit)  # what a kill left behind
        open_shards(scanned, output / "data-cache")  # build the Arrow cache once, before the others read it
    ds.io_barrier()  # a big data set's cache can take longer than a collective may
    resume = checkpoints.committed(checkpoint_root)
    if config.zero_stage is None:
        config = dataclasses.replace(config, zero_stage=default_zero_stage(world, resume and resume["zero_stage"]))
    if rank == 0:
        save_config(config, output / "config.yaml")  # the stage and attention that run
    dataset = open_shards(scanned, output / "data-cache")
    lengths = sequence_lengths(dataset)
    answer_len = dataset.data.column(ANSWER_LEN).to_numpy()
    steps_per_epoch, total_steps, warmup_steps = plan_steps(config, len(lengths))
    dtype = getattr(torch, resolve_dtype(config.dtype))
    # DeepSpeed's batch keys only have to multiply out; the loop owns accumulation (train.loop).
    ds_config = ds.ds_config(config, micro=layout.global_batch // (layout.accumulation * world),
                             accumulation=layout.accumulation, dtype=dtype)
    _check_resumable_layout(resume, ds_config["zero_optimization"]["stage"])
    ds.prepare_resume(checkpoint_root, resume, ds_config)
    engine = ds.load_policy(config, ds_config, dtype, total_steps=total_steps, warmup_steps=warmup_steps)
    score_reference = None
    if config.reference == "online":
        score_reference = _online_reference(ds.load_reference(
            scanned.metadata.reference_model, ds.reference_ds_config(ds_config), config, dtype))
    start_step = ds.load_checkpoint(engine, checkpoint_root, resume)
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
        save=lambda step: ds.save_checkpoint(engine, checkpoint_root, step, config.save_total_limit,
                                             resume_record(config, scanned)),
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
        _write_summary(output / "summary.json", summary)
    dist.barrier()
    dist.destroy_process_group()
    if status == DRIFTED:
        if rank == 0:
            _say(_drift_message(config, metrics))
        return EXIT_DRIFT
    if status == PREEMPTED:
        if rank == 0:
            _say(f"stopped by signal {stop.signal} after step {last_step}, checkpointed under {checkpoint_root}; "
                 "re-run the same command to resume")
        return EXIT_PREEMPTED
    if rank == 0:
        _say(f"done: {output / 'final'}")
    return EXIT_OK


def _check_resumable_layout(resume: dict | None, zero_stage: int) -> None:
    """The checkpoint's ZeRO stage must be this run's (a ``--deepspeed`` JSON may set it;
    without one the stage follows the checkpoint). Any number of ranks resumes it: on
    another one it is converted to the universal format (``engine.prepare_resume``)."""
    if resume is None:
        return
    if resume["zero_stage"] != zero_stage:
        raise ConfigError(f"the checkpoint to resume ({resume['tag']}) was written with ZeRO-{resume['zero_stage']}, "
                          f"this run uses ZeRO-{zero_stage}: DeepSpeed loads a checkpoint only into the stage that "
                          f"wrote it. Resume with ZeRO-{resume['zero_stage']} (drop --zero-stage, or make it and "
                          "--deepspeed agree with it), or start fresh with a new --output")
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
