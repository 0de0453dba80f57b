"""Stage-one output for the trainer's tests and benchmark, built from the core alone
(render with ``SampleRenderer``, score with an HF fp32 forward through
``sequence_logps``, write with ``write_shard``), so stage two is tested without
depending on stage one's code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import torch

from minorsft_core import schema
from minorsft_core.data import SampleRenderer
from minorsft_core.losses import sequence_logps

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def score(model, samples) -> list[float]:
    """Reference log-prob sums, one unpadded fp32 forward per sample."""
    out = []
    for sample in samples:
        ids = torch.tensor([sample.input_ids])
        logits = model(input_ids=ids).logits
        out.append(float(sequence_logps(logits, ids, torch.tensor([sample.completion_mask]))[0]))
    return out


def write_stage_one_output(model_dir: Path, records: list[dict], output: Path, *, chunk_rows: int = 1000,
                           reference_fingerprint: str | None = None, rejected_rows: int = 0,
                           ref_offset_per_token: list[float] | None = None) -> Path:
    """Score ``records`` with the model in ``model_dir`` into ``output`` as stage one would.

    ``rejected_rows`` pretends the last N input rows were rejected (too long), so the
    directory is complete with rejects. ``reference_fingerprint`` overrides the real one
    (to build mixed-reference directories). ``ref_offset_per_token[i]`` adds
    ``offset * answer_len`` to record i's reference log-prob (a stage one that disagrees).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    renderer = SampleRenderer(tokenizer, data_format="prompt_completion", max_seq_len=512)
    output.mkdir(parents=True, exist_ok=True)
    num_input_rows = len(records) + rejected_rows
    run_fields = dict(
        reference_model=str(model_dir),
        reference_fingerprint=reference_fingerprint or schema.model_fingerprint(model_dir),
        tokenizer_fingerprint=schema.tokenizer_fingerprint(tokenizer),
        template="chat", max_seq_len=512, truncate_answer=False, engine="hf",
        engine_version="test", dtype="float32", data_fingerprint="test-data", data_format="prompt_completion",
        num_input_rows=num_input_rows, chunk_rows=chunk_rows, with_token_logps=False,
    )
    for chunk in range(max(1, -(-num_input_rows // chunk_rows))):
        start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, num_input_rows)
        samples = [renderer.render(row, records[row]) for row in range(start, min(stop, len(records)))]
        rejects = [row for row in range(start, stop) if row >= len(records)]
        table = pa.table({
            schema.SAMPLE_ID: [s.sample_id for s in samples],
            schema.INPUT_IDS: [s.input_ids for s in samples],
            schema.COMPLETION_MASK: [s.completion_mask for s in samples],
            schema.ANSWER_LEN: [s.answer_len for s in samples],
            schema.REF_LOGP_SUM: [logp + (ref_offset_per_token[start + k] * s.answer_len if ref_offset_per_token else 0)
                                   for k, (s, logp) in enumerate(zip(samples, score(model, samples), strict=True))],
        })
        if rejects:
            schema.rejects_path(output, chunk).write_text(
                "".join(f'{{"row": {row}, "reason": "too_long", "detail": "test"}}\n' for row in rejects))
        meta = schema.ShardMetadata(**run_fields, chunk_index=chunk, rows_scored=len(samples),
                                    rows_rejected=len(rejects))
        schema.write_shard(schema.shard_path(output, chunk), table, meta)
    return output


def perturbed_copy(model_dir: Path, output: Path, *, scale: float, seed: int = 7) -> Path:
    """``model_dir`` with Gaussian noise added to every weight: a policy that is not the
    reference, with the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(output)
    return output


def train_command(*args, ranks: int = 1) -> list[str]:
    """``minorsft train ARGS`` alone, or under torchrun with ``ranks`` processes."""
    minorsft = str(Path(sys.executable).with_name("minorsft"))
    if ranks == 1:
        return [minorsft, "train", *map(str, args)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", f"--nproc_per_node={ranks}", minorsft, "train", *map(str, args)]


def run_train(*args, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_to_end(train_command(*args, ranks=ranks), env=train_env(), timeout=timeout)


def train_env(**extra: str) -> dict[str, str]:
    # A test process that ran a trainer in-process (the TRL tests) holds RANK/MASTER_PORT
    # of its own group: a child inheriting them would join, or collide on, that port.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_to_end(command: list[str], *, env: dict[str, str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=...)``, except that
    on a timeout every process the command started is killed, not the command alone."""
    process = subprocess.Popen(command, cwd=popen.pop("cwd", REPO), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process_tree(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def end_process_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` (started with ``start_new_session=True``) and all it started.

    The process group holds what the command started directly; torchrun starts each rank
    in a session of its own, so the ranks are found as descendants as well. Left running
    they would hold memory and ports for the rest of the test session."""
    import psutil  # a dependency of deepspeed

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.communicate()
