"""Stage one end to end on the tiny fixture model, with the real engines (vLLM's CPU
build, no mocks). vLLM starts once, in one CLI subprocess, whose output several
tests read; the hf runs are cheap and run where each test needs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_records, make_texts, write_jsonl
from tiny_models import save_tiny_model

from minorsft_core import schema
from minorsft_core.config import PrecomputeConfig
from minorsft_core.data import BAD_ROLE, BAD_TYPE, EMPTY_ANSWER, INVALID_JSON, MISSING_FIELD, TOO_LONG
from minorsft_core.errors import EXIT_BAD_INPUT, EXIT_ENGINE, EXIT_USAGE
from precompute.run import main

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 128
COMMON = ["--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-tokens", "1024", "--quiet"]


def cli(*args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "minorsft_core.cli", "precompute", *args]
    if not wait:
        # Background jobs may run side by side (a pool): one thread each, or two
        # OpenMP teams oversubscribe the CI machine's two cores.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def read_output(output: Path) -> pa.Table:
    """Every shard's rows, in chunk order."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(output.glob(schema.SHARD_GLOB))])


def chunk_files(output: Path) -> dict[str, bytes | list[dict]]:
    """Rejects files' bytes and shards' rows, by file name: what must match between runs."""
    files = {p.name: p.read_bytes() for p in output.glob(schema.REJECTS_GLOB)}
    files.update({p.name: pq.read_table(p).to_pylist() for p in output.glob(schema.SHARD_GLOB)})
    return files


# ---- the corpora --------------------------------------------------------------------------


def messages_corpus(path: Path) -> dict[str, int]:
    """Chat records (multi-turn, with and without system) and, among them, bad rows of
    every reject reason. Returns the expected reject counts."""
    good = []
    for k, record in enumerate(make_records(48, seed=3)):
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
        if k % 3 == 0:
            messages = [{"role": "system", "content": "Be brief."}, *messages,
                        {"role": "user", "content": "why?"}, {"role": "assistant", "content": "because."}]
        good.append(json.dumps({"id": record["id"], "messages": messages}))
    user = {"role": "user", "content": "hi?"}
    bad = {
        INVALID_JSON: ['{"messages": [', "not json at all"],
        MISSING_FIELD: [json.dumps({"id": "m0"}), json.dumps({"messages": [{"role": "user"}]}),
                        json.dumps({"messages": [user, {"content": "no role"}]})],
        BAD_TYPE: [json.dumps({"messages": "hello"}), json.dumps({"messages": [user, {"role": "assistant", "content": 7}]})],
        EMPTY_ANSWER: [json.dumps({"messages": [user]}), json.dumps({"messages": [user, {"role": "assistant", "content": " "}]})],
        TOO_LONG: [json.dumps({"messages": [user, {"role": "assistant", "content": "the dog " * 200}]})],
        BAD_ROLE: [json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
                   json.dumps({"messages": [user, {"role": "system", "content": "late"}, {"role": "assistant", "content": "y"}]})],
    }
    lines = list(good)
    for n, line in enumerate(line for lines_ in bad.values() for line in lines_):
        lines.insert(3 + 4 * n, line)  # spread over the chunks, never first (format detection)
    path.write_text("\n".join(lines) + "\n")
    return {reason: len(lines_) for reason, lines_ in bad.items()}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    return path, messages_corpus(path)


VLLM_BATCH_TOKENS = 48  # < MAX_SEQ_LEN: longer prompts are scored in pieces, as large vocabularies need


@pytest.fixture(scope="module")
def vllm_out(tiny_model_dir, chat_data, tmp_path_factory):
    """The one vLLM run of this file: chat corpus, chunks of 16 rows, per-token log-probs,
    at most 48 tokens per engine step (the cap that bounds prompt log-probs' memory)."""
    output = tmp_path_factory.mktemp("vllm") / "out"
    result = cli("--model", str(tiny_model_dir), "--data", str(chat_data[0]), "--output", str(output),
                 "--engine", "vllm", "--enforce-eager", "--chunk-rows", "16", "--store-token-logps",
                 "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-tokens", str(VLLM_BATCH_TOKENS), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result, json.loads((output / "summary-w0.json").read_text())


def hf_config(model, data, output, **overrides) -> PrecomputeConfig:
    options = dict(model=str(model), data=str(data), output=str(output), engine="hf", chunk_rows=16,
                   max_seq_len=MAX_SEQ_LEN, max_batch_tokens=1024, quiet=True)
    return PrecomputeConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def hf_out(tiny_model_dir, chat_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("hf") / "out"
    assert main(hf_config(tiny_model_dir, chat_data[0], output)) == 0
    return output


@pytest.fixture(scope="module")
def hf_packed_out(tiny_model_dir, chat_data, tmp_path_factory):
    """The hf engine with --packing: each batch one padding-free row."""
    output = tmp_path_factory.mktemp("hf-packed") / "out"
    assert main(hf_config(tiny_model_dir, chat_data[0], output, packing=True)) == 0
    return output


# ---- values -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
@torch.no_grad()
def independent_ref_logps(tiny_model_dir, hf_out) -> dict[str, float]:
    """By sample_id: an unbatched fp32 HF forward per sample, log-softmax in float64 by
    hand (not the core's token_logps), summed at the answer tokens."""
    from transformers import AutoModelForCausalLM

    table = read_output(hf_out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sums = []
    for ids, mask in zip(table.column(schema.INPUT_IDS).to_pylist(), table.column(schema.COMPLETION_MASK).to_pylist(),
                         strict=True):
        ids_t = torch.tensor([ids])
        logps = model(input_ids=ids_t).logits[0, :-1].double().log_softmax(-1)
        picked = logps.gather(1, ids_t[0, 1:, None])[:, 0]
        sums.append(float(picked[torch.tensor(mask[1:], dtype=torch.bool)].sum()))
    return dict(zip(table.column(schema.SAMPLE_ID).to_pylist(), sums, strict=True))


@pytest.mark.parametrize("engine", ["vllm", "hf", "hf-packed"])
def test_ref_logp_sum_equals_independent_fp32_forward(engine, request, independent_ref_logps):
    out = {"vllm": lambda: request.getfixturevalue("vllm_out")[0], "hf": lambda: request.getfixturevalue("hf_out"),
           "hf-packed": lambda: request.getfixturevalue("hf_packed_out")}[engine]()
    table = read_output(out)
    assert table.num_rows == 48
    expected = [independent_ref_logps[sample_id] for sample_id in table.column(schema.SAMPLE_ID).to_pylist()]
    np.testing.assert_allclose(table.column(schema.REF_LOGP_SUM).to_numpy(), expected, rtol=0, atol=1e-4)


def test_hf_packed_scores_equal_padded(hf_out, hf_packed_out):
    padded, packed = read_output(hf_out), read_output(hf_packed_out)
    assert padded.column(schema.SAMPLE_ID).to_pylist() == packed.column(schema.SAMPLE_ID).to_pylist()
    np.testing.assert_allclose(packed.column(schema.REF_LOGP_SUM).to_numpy(),
                               padded.column(schema.REF_LOGP_SUM).to_numpy(), rtol=1e-6, atol=1e-5)


def test_engines_agree(vllm_out, hf_out):
    vllm_rows, hf_rows = read_output(vllm_out[0]), read_output(hf_out)
    for column in (schema.SAMPLE_ID, schema.INPUT_IDS, schema.COMPLETION_MASK, schema.ANSWER_LEN):
        assert vllm_rows.column(column).to_pylist() == hf_rows.column(column).to_pylist()
    np.testing.assert_allclose(vllm_rows.column(schema.REF_LOGP_SUM).to_numpy(),
                               hf_rows.column(schema.REF_LOGP_SUM).to_numpy(), rtol=0, atol=1e-4)


def test_summary_times_scoring_apart_from_start_up_and_shutdown(vllm_out):
    """tokens_per_s is the scoring rate: vLLM's start-up (tens of seconds) and shutdown
    (seconds) are reported beside it, not inside it."""
    summary = vllm_out[2]
    assert summary["engine_start_s"] > 1 and summary["engine_close_s"] > 0
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_scored_now"] / summary["scoring_s"], rel=0.02)
    assert summary["scoring_s"] + summary["engine_start_s"] + summary["engine_close_s"] <= summary["wall_s"]
    assert max(len(ids) for ids in read_output(vllm_out[0]).column(schema.INPUT_IDS).to_pylist()) > VLLM_BATCH_TOKENS


def test_token_logps_sum_to_ref_logp_sum(vllm_out):
    table = read_output(vllm_out[0])
    for logps, total, answer_len in zip(table.column(schema.REF_TOKEN_LOGPS).to_pylist(),
                                        table.column(schema.REF_LOGP_SUM).to_pylist(),
                                        table.column(schema.ANSWER_LEN).to_pylist(), strict=True):
        assert len(logps) == answer_len
        assert sum(logps) == pytest.approx(total, abs=1e-4)


# ---- accounting, rejects, logs ------------------------------------------------------------


def test_every_row_accounted_for_with_the_right_reject_reasons(vllm_out, chat_data):
    output, result, summary = vllm_out
    path, expected = chat_data
    scanned = schema.scan_output_dir(output)
    num_rows = len(path.read_text().splitlines())
    assert scanned.rows_scored == 48 and scanned.rows_rejected == sum(expected.values())
    assert scanned.rows_scored + scanned.rows_rejected == num_rows == scanned.metadata.num_input_rows

    rejects = [json.loads(line) for p in sorted(output.glob(schema.REJECTS_GLOB)) for line in p.read_text().splitlines()]
    found: dict[str, int] = {}
    for reject in rejects:
        found[reject["reason"]] = found.get(reject["reason"], 0) + 1
    assert found == expected
    assert [r["id"] for r in rejects if r["id"] is not None] == ["m0"]  # `id` when the row has one
    bad_rows = {r["row"] for r in rejects}
    scored_ids = set(read_output(output).column(schema.SAMPLE_ID).to_pylist())
    assert len(bad_rows) == len(rejects) and len(scored_ids) == 48  # no row twice

    assert summary["rows_scored"] == 48 and summary["rejected_by_reason"] == expected
    assert summary["engine"] == "vllm" and summary["dtype"] == "float32" and summary["tokens_per_s"] > 0
    assert summary["answer_tokens"] == sum(read_output(output).column(schema.ANSWER_LEN).to_pylist())
    assert (output / "config-w0.yaml").exists()
    # --quiet: one log line per chunk
    assert sum("this run): " in line for line in result.stderr.splitlines()) == scanned.metadata.num_chunks


def test_rerun_of_finished_job_changes_nothing(vllm_out, tiny_model_dir, chat_data):
    output = vllm_out[0]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.glob("*-0*")}
    result = cli("--model", str(tiny_model_dir), "--data", str(chat_data[0]), "--output", str(output),
                 "--engine", "vllm", "--enforce-eager", "--chunk-rows", "16", "--store-token-logps", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert before == {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.glob("*-0*")}
    summary = json.loads((output / "summary-w0.json").read_text())
    assert summary["chunks_scored_now"] == 0 and summary["tokens_per_s"] is None
    # Nothing to do, so the engine is never started: a fraction of the first run's time
    # (a ratio, not a bound in seconds, so a loaded machine slows both alike).
    assert summary["wall_s"] < 0.5 * vllm_out[2]["wall_s"]


# ---- refusals and exit codes --------------------------------------------------------------


def test_conflicting_rerun_is_refused(hf_out, tiny_model_dir, chat_data, tmp_path):
    before = chunk_files(hf_out)
    result = cli("--model", str(tiny_model_dir), "--data", str(chat_data[0]), "--output", str(hf_out),
                 "--engine", "hf", "--chunk-rows", "16", "--max-seq-len", "256", "--max-batch-tokens", "1024")
    assert result.returncode == EXIT_BAD_INPUT
    assert "max_seq_len: 256 != 128" in result.stderr and "new --output" in result.stderr

    other_model = save_tiny_model(tmp_path / "other", make_texts(), seed=1)  # same tokenizer, other weights
    with pytest.raises(schema.ContractError, match="reference_fingerprint"):
        main(hf_config(other_model, chat_data[0], hf_out))
    with pytest.raises(schema.ContractError, match="template: 'none' != 'chat'"):
        main(hf_config(tiny_model_dir, chat_data[0], hf_out, template="none"))
    assert chunk_files(hf_out) == before


def test_structural_errors_exit_with_a_clear_message(tiny_model_dir, chat_data, tmp_path):
    model, data = str(tiny_model_dir), str(chat_data[0])
    no_format = tmp_path / "weird.jsonl"
    write_jsonl(no_format, [{"question": "q", "reply": "r"}] * 3)
    cases = [
        (["--model", model, "--data", str(tmp_path / "missing.jsonl")], EXIT_BAD_INPUT, "no such file"),
        (["--model", str(tmp_path), "--data", data], EXIT_BAD_INPUT, "no config.json"),
        (["--model", model, "--data", str(no_format)], EXIT_BAD_INPUT, "cannot tell the record format"),
        (["--model", model, "--data", data, "--num-workers", "2", "--worker-index", "2"], EXIT_USAGE, "worker_index"),
    ]
    for args, code, message in cases:
        result = cli(*args, "--output", str(tmp_path / "out"), "--engine", "hf", *COMMON)
        assert (result.returncode, message in result.stderr) == (code, True), result.stderr[-2000:]


def test_engine_failure_exits_4(tiny_model_dir, chat_data, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli("--model", str(broken), "--data", str(chat_data[0]), "--output", str(tmp_path / "out"),
                 "--engine", "hf", *COMMON)
    assert result.returncode == EXIT_ENGINE, result.stderr[-2000:]
    assert "engine hf failed to start" in result.stderr


# ---- resume and pools ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    """Prompt/completion rows (the other record shape), a few of them broken."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    lines = [json.dumps(r) for r in make_records(1200, seed=5)]
    for row in (7, 500, 1111):
        lines[row] = "{broken"
    path.write_text("\n".join(lines) + "\n")
    return path


BIG = ["--engine", "hf", "--chunk-rows", "8", *COMMON]


@pytest.fixture(scope="module")
def big_k1(tiny_model_dir, big_data, tmp_path_factory):
    """One uninterrupted single-worker run: what every other way of running must equal."""
    output = tmp_path_factory.mktemp("k1") / "out"
    assert main(hf_config(tiny_model_dir, big_data, output, chunk_rows=8)) == 0
    return output


def test_kill_9_then_rerun_equals_uninterrupted_run(tiny_model_dir, big_data, big_k1, tmp_path):
    output = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(big_data), "--output", str(output), *BIG]
    proc = cli(*args, wait=False)
    deadline = time.monotonic() + 120
    while len(list(output.glob(schema.SHARD_GLOB))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    num_chunks = len(list(big_k1.glob(schema.SHARD_GLOB)))
    assert 3 <= len(list(output.glob(schema.SHARD_GLOB))) < num_chunks, "the run finished before the kill"
    with pytest.raises(schema.ContractError, match="incomplete"):
        schema.scan_output_dir(output)

    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert chunk_files(output) == chunk_files(big_k1)
    ids = read_output(output).column(schema.SAMPLE_ID).to_pylist()
    assert len(ids) == len(set(ids)) == 1197
    assert not list(output.glob(".*tmp*"))


def test_pool_of_three_equals_one_job(tiny_model_dir, big_data, big_k1, tmp_path):
    output = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(big_data), "--output", str(output), *BIG, "--num-workers", "3"]
    first_two = [cli(*args, "--worker-index", str(i), wait=False) for i in (0, 1)]
    assert [proc.wait(timeout=300) for proc in first_two] == [0, 0]
    with pytest.raises(schema.ContractError, match="incomplete"):
        schema.scan_output_dir(output)  # worker 2's chunks are missing: stage two refuses

    result = cli(*args, "--worker-index", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    schema.scan_output_dir(output)
    assert chunk_files(output) == chunk_files(big_k1)
    summaries = [json.loads((output / f"summary-w{i}.json").read_text()) for i in range(3)]
    assert sum(s["rows_scored"] + s["rows_rejected"] for s in summaries) == 1200
