"""`minorsft train` for real: DeepSpeed on CPU (gloo), fp32, one rank (ZeRO-2, the
one-rank default) and two (torchrun, ZeRO-3), so the one-against-two-rank comparisons
also hold the two stages to each other. Each run is a module-scoped fixture shared by
the assertions about it.

The first multi-rank run on a fresh machine JIT-builds DeepSpeed's CPU comm op
(~80 s, cached under ~/.cache afterwards)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import STAGE_ONE_ROWS, make_records
from train_fixtures import REPO, run_to_end, run_train, score, train_command, write_stage_one_output

from minorsft_core.data import SampleRenderer
from minorsft_core.errors import EXIT_DRIFT, EXIT_PREEMPTED
from minorsft_core.schema import ANSWER_LEN, REF_LOGP_SUM, SAMPLE_ID
from train.metrics import METRIC_KEYS, read_metrics

pytestmark = pytest.mark.slow

BETA = 0.04
N = STAGE_ONE_ROWS  # samples = one global batch, so step 1 sees every sample
TIMING_KEYS = {"samples_per_s", "tokens_per_s"}


def _common(data, policy, output, *extra):
    return ["--data", data, "--model", policy, "--output", output, "--global-batch-size", N, "--max-steps", 2,
            "--beta", BETA, "--lr", 1e-3, "--warmup-ratio", 0, "--dtype", "float32", "--drift-tolerance", 100,
            "--coef-tolerance", 1,
            *extra]


def _ok(result: subprocess.CompletedProcess, code: int = 0):
    assert result.returncode == code, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def full_batch_run(data, policy, tmp_path_factory):
    """World 1 x micro 8 x accumulation 1."""
    output = tmp_path_factory.mktemp("w1")
    _ok(run_train(*_common(data, policy, output, "--micro-batch-size", N)))
    return output


@pytest.fixture(scope="module")
def two_rank_run(data, policy, tmp_path_factory):
    """World 2 x micro 2 x accumulation 2 on the same global batches."""
    output = tmp_path_factory.mktemp("w2")
    result = _ok(run_train(*_common(data, policy, output, "--micro-batch-size", 2), ranks=2, timeout=400))
    assert "2 ranks x 2 accumulation x 2 micro" in result.stderr
    return output


def _weights(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def independent(data, policy):
    """``(logp, ref, m)`` per sample: the policy's answer log-probs from a plain HF fp32
    forward of each sample alone, and the shards' ``ref_logp_sum`` and ``answer_len``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = pa.concat_tables([pq.read_table(path) for path in sorted(data.glob("shard-*.parquet"))])
    by_id = {sid: (ref, m) for sid, ref, m in zip(table[SAMPLE_ID].to_pylist(), table[REF_LOGP_SUM].to_pylist(),
                                                  table[ANSWER_LEN].to_pylist(), strict=True)}
    renderer = SampleRenderer(AutoTokenizer.from_pretrained(policy), data_format="prompt_completion")
    samples = [renderer.render(k, r) for k, r in enumerate(make_records(N, seed=5))]
    logp = score(AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval(), samples)
    return logp, [by_id[s.sample_id][0] for s in samples], [by_id[s.sample_id][1] for s in samples]


def test_step_one_metrics_equal_spec_from_an_independent_forward(full_batch_run, independent):
    metrics = read_metrics(full_batch_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(tuple(m) == METRIC_KEYS for m in metrics)
    logp, ref, m = independent
    delta = [a - b for a, b in zip(logp, ref, strict=True)]
    coef = [2 / (1 + math.exp(BETA * d)) for d in delta]  # 2 sigma(-beta delta)
    first = metrics[0]
    assert first["deviation"] == pytest.approx(sum(d / k for d, k in zip(delta, m, strict=True)) / N, abs=1e-6)
    assert abs(first["deviation"]) > 1e-3  # the policy really is not the reference
    assert first["loss"] == pytest.approx(
        sum(w * -lp / k for w, lp, k in zip(coef, logp, m, strict=True)) / N, rel=1e-6)
    assert first["coef_mean"] == pytest.approx(sum(coef) / N, rel=1e-6)
    assert first["coef_min"] == pytest.approx(min(coef), rel=1e-6)
    assert first["coef_max"] == pytest.approx(max(coef), rel=1e-6)
    assert first["policy_logp_per_token"] == pytest.approx(sum(logp) / sum(m), rel=1e-6)
    assert first["ref_logp_per_token"] == pytest.approx(sum(ref) / sum(m), rel=1e-6)
    assert first["lr"] == pytest.approx(1e-3)
    assert 0 <= first["padding_fraction"] < 1 and first["grad_norm"] > 0


def test_final_model_loads_and_differs_from_the_initial_one(full_batch_run, policy):
    from transformers import AutoTokenizer

    final = full_batch_run / "final"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (final / name).exists(), name
    AutoTokenizer.from_pretrained(final)
    trained, initial = _weights(final), _weights(policy)
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in trained)
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 1e-4
    summary = json.loads((full_batch_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2
    assert (full_batch_run / "config.yaml").exists()


def test_rerunning_a_completed_run_changes_nothing(full_batch_run, data, policy):
    before = (full_batch_run / "final" / "model.safetensors").read_bytes()
    result = _ok(run_train(*_common(data, policy, full_batch_run, "--micro-batch-size", N)))
    assert "already holds a completed run" in result.stderr
    assert (full_batch_run / "final" / "model.safetensors").read_bytes() == before


def test_two_ranks_with_accumulation_equal_one_rank_full_batch(full_batch_run, two_rank_run):
    one, two = read_metrics(full_batch_run / "metrics.jsonl"), read_metrics(two_rank_run / "metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "deviation", "coef_mean", "coef_min", "coef_max", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    w1, w2 = _weights(full_batch_run / "final"), _weights(two_rank_run / "final")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def packed_two_rank_run(data, policy, tmp_path_factory):
    """World 2, packed rows, micro-batches filled to a token budget (varying sample counts)."""
    output = tmp_path_factory.mktemp("w2-packed")
    result = _ok(run_train(*_common(data, policy, output, "--packing", "--max-tokens-per-micro-batch", PACK_BUDGET),
                           ranks=2, timeout=400))
    assert f"2 ranks x micro-batches of <= {PACK_BUDGET} tokens, packed" in result.stderr
    return output


# Tokens: micro-batches of 2, 2, 3 and 1 of the `data` fixture's samples (61-100 tokens),
# so one rank runs 5 samples, the other 3.
PACK_BUDGET = 250


def test_packed_token_budget_run_on_two_ranks_equals_padded_full_batch(full_batch_run, packed_two_rank_run):
    """Packing and token-budget micro-batches change how the global batch is run, not
    what is trained: the per-step losses, metrics and final weights of one rank with
    one padded micro-batch. ``--attn-implementation auto`` ran the packed rows under
    ``varlen`` (one sdpa per sample on CPU) and the padded batch under sdpa."""
    import yaml

    for run, attention in ((full_batch_run, "sdpa"), (packed_two_rank_run, "varlen")):
        assert yaml.safe_load((run / "config.yaml").read_text())["attn_implementation"] == attention
    one, packed = read_metrics(full_batch_run / "metrics.jsonl"), read_metrics(packed_two_rank_run / "metrics.jsonl")
    assert len(one) == len(packed) == 2
    for a, b in zip(one, packed, strict=True):
        for key in ("loss", "deviation", "coef_mean", "coef_min", "coef_max", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert b["padding_fraction"] == 0 < a["padding_fraction"]
    w1, w2 = _weights(full_batch_run / "final"), _weights(packed_two_rank_run / "final")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-5)


def _tied_copy(model_dir: Path, output: Path) -> Path:
    """``model_dir`` with its output head tied to the input embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = True
    state = _weights(model_dir)
    state.pop("lm_head.weight")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(output)
    return output


def test_tied_head_under_zero3_on_two_ranks_equals_the_full_logits_path(data, policy, tmp_path):
    """The hidden-state head gathers the partitioned, tied output weight through
    DeepSpeed (external parameter): 2 ranks of it equal 1 rank of plain logits."""
    tied = _tied_copy(policy, tmp_path / "tied")
    _ok(run_train(*_common(data, tied, tmp_path / "logits", "--micro-batch-size", N, "--logp-head", "logits")))
    _ok(run_train(*_common(data, tied, tmp_path / "head", "--micro-batch-size", 2), ranks=2, timeout=400))
    logits, head = read_metrics(tmp_path / "logits" / "metrics.jsonl"), read_metrics(tmp_path / "head" / "metrics.jsonl")
    assert len(logits) == len(head) == 2
    for a, b in zip(logits, head, strict=True):
        for key in ("loss", "deviation", "abs_deviation", "coef_min", "coef_max", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    w_logits, w_head = _weights(tmp_path / "logits" / "final"), _weights(tmp_path / "head" / "final")
    assert torch.equal(w_head["lm_head.weight"], w_head["model.embed_tokens.weight"])  # still tied
    for key in w_logits:
        torch.testing.assert_close(w_head[key], w_logits[key], rtol=0, atol=1e-5)


def test_deepspeed_launcher_zero2_json_and_checkpointing_equal_zero3(two_rank_run, data, policy, tmp_path):
    """The `deepspeed` launcher as the README shows it (no --no_local_rank), with the shipped
    ZeRO-2 JSON and gradient checkpointing: the same two steps as torchrun + ZeRO-3."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    minorsft = str(Path(sys.executable).with_name("minorsft"))
    args = _common(data, policy, tmp_path, "--micro-batch-size", 2, "--deepspeed",
                   REPO / "configs/deepspeed/zero2.json", "--gradient-checkpointing")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    result = _ok(run_to_end([deepspeed, "--num_gpus", "2", "--master_port", str(port), minorsft, "train",
                             *map(str, args)], env=env, timeout=400))
    assert "ZeRO-2" in result.stderr + result.stdout
    # Under this launcher DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and
    # never removes it; the trainer unlinks the names once every rank has mapped them.
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leftovers, leftovers
    zero3, zero2 = read_metrics(two_rank_run / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert len(zero3) == len(zero2) == 2
    for a, b in zip(zero3, zero2, strict=True):
        for key in ("loss", "deviation", "coef_mean", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_token_normalized_sft_divides_by_the_global_token_count(data, policy, independent, tmp_path):
    """Two ranks x two accumulation steps: the answer lengths differ between micro-batches,
    so only the global token count gives sum_i -logp_i / sum_i m_i."""
    _ok(run_train(*_common(data, policy, tmp_path, "--micro-batch-size", 2, "--loss", "sft", "--token-normalize"),
                  ranks=2, timeout=400))
    logp, _, m = independent
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == pytest.approx(-sum(logp) / sum(m), rel=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_online_reference_equals_precomputed(full_batch_run, data, policy, tmp_path, stage):
    """The frozen reference engine: partitioned under ZeRO-3, whole (stage 0) beside a
    ZeRO-2 policy, which DeepSpeed would refuse to build without an optimizer."""
    _ok(run_train(*_common(data, policy, tmp_path, "--micro-batch-size", N, "--reference", "online",
                           "--zero-stage", stage)))
    precomputed, online = read_metrics(full_batch_run / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert len(precomputed) == len(online) == 2
    for a, b in zip(precomputed, online, strict=True):
        for key in set(METRIC_KEYS) - TIMING_KEYS:
            # fp32 noise: the shards were scored one unpadded sample at a time, online in padded batches
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_drift_guard_stops_before_the_first_update(data, policy, tmp_path):
    args = _common(data, policy, tmp_path, "--micro-batch-size", 4)
    args[args.index("--drift-tolerance") + 1] = 1e-4
    result = _ok(run_train(*args), EXIT_DRIFT)
    assert "> --drift-tolerance 0.0001" in result.stderr and "--model is not the reference" in result.stderr
    assert "step-1 parity with stage one" in result.stderr
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints" / "latest").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "drifted" and summary["last_metrics"]["abs_deviation"] > 1e-4


def test_parity_guard_refuses_per_sample_disagreement_that_cancels_in_the_mean(tiny_model_dir, tmp_path):
    """A stage one off by +-0.3 nats/token on alternate samples: the signed mean of
    delta/m is 0 (the old guard passed it), every coefficient is off 1 by about 0.1."""
    offsets = [0.3 if k % 2 else -0.3 for k in range(N)]
    shards = write_stage_one_output(tiny_model_dir, make_records(N, seed=5), tmp_path / "shards",
                                    ref_offset_per_token=offsets)
    result = _ok(run_train("--data", shards, "--model", tiny_model_dir, "--output", tmp_path / "out",
                           "--global-batch-size", N, "--micro-batch-size", 4, "--max-steps", 1,
                           "--dtype", "float32"), EXIT_DRIFT)
    assert "> --drift-tolerance 0.1" in result.stderr and "score stage one in the dtype you train in" in result.stderr
    report = json.loads((tmp_path / "out" / "summary.json").read_text())["last_metrics"]
    assert abs(report["deviation"]) < 1e-4  # cancels: what the old signed-mean guard tested
    assert report["abs_deviation"] == pytest.approx(0.3, abs=1e-4)
    assert report["abs_deviation_max"] == pytest.approx(0.3, abs=1e-4)


# ---- preemption -----------------------------------------------------------------------------

RESUME_STEPS = 24  # enough that SIGTERM after step 3 lands well before the end


def _resume_args(data, model, output):
    # Packed: resuming restores a packed run exactly too (the padded path differs in collate only).
    return ["--data", data, "--model", model, "--output", output, "--global-batch-size", 2, "--micro-batch-size", 1,
            "--max-steps", RESUME_STEPS, "--lr", 1e-3, "--dtype", "float32", "--save-steps", 8,
            "--save-total-limit", 2, "--packing"]


@pytest.fixture(scope="module")
def uninterrupted_run(data, tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    _ok(run_train(*_resume_args(data, tiny_model_dir, output)))
    return output


def test_checkpoints_are_kept_up_to_the_limit(uninterrupted_run):
    kept = sorted(p.name for p in (uninterrupted_run / "checkpoints").glob("step-*"))
    assert kept == ["step-00000008", "step-00000016"]


def test_sigterm_checkpoints_and_a_rerun_resumes_exactly(data, tiny_model_dir, uninterrupted_run, tmp_path):
    args = _resume_args(data, tiny_model_dir, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(train_command(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(read_metrics(tmp_path / "metrics.jsonl")) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-4000:]
    stopped_at = json.loads((tmp_path / "summary.json").read_text())["step"]
    assert 3 <= stopped_at < RESUME_STEPS and "re-run the same command to resume" in stderr
    assert (tmp_path / "checkpoints" / f"step-{stopped_at:08d}").is_dir()

    result = _ok(run_train(*args))
    assert f"resuming at step {stopped_at}" in result.stderr
    expected, resumed = read_metrics(uninterrupted_run / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, RESUME_STEPS + 1))
    for a, b in zip(expected, resumed, strict=True):
        for key in set(METRIC_KEYS) - TIMING_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (b["step"], key)
    w_expected, w_resumed = _weights(uninterrupted_run / "final"), _weights(tmp_path / "final")
    for key in w_expected:
        torch.testing.assert_close(w_resumed[key], w_expected[key], rtol=0, atol=1e-6)


def test_policy_is_loaded_partitioned(tiny_model_dir, monkeypatch):
    """ZeRO-3 loading through HfDeepSpeedConfig: the module's own tensors are empty
    placeholders, each rank holds only its partition."""
    import torch.distributed as dist

    from minorsft_core.config import TrainConfig
    from train import engine

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored (absent) after the test
    engine.init_distributed()
    try:
        config = TrainConfig(data="d", model=str(tiny_model_dir), output="o", global_batch_size=2, zero_stage=3)
        ds = engine.ds_config(config, micro=1, accumulation=2, dtype=torch.float32)
        model = engine.load_partitioned(config.model, ds, config, torch.float32)
        assert all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())
    finally:
        dist.destroy_process_group()
