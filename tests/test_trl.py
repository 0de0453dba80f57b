"""MinorSFT inside TRL (train/trl.py) with the real TRL SFTTrainer: the same steps as
`minorsft train`, the reference columns reaching the loss, and the refusals."""

from __future__ import annotations

import shutil

import datasets
import pytest
import torch
from conftest import STAGE_ONE_ROWS, make_texts
from train_fixtures import perturbed_copy, run_train

from minorsft_core.errors import ConfigError, ContractError
from minorsft_core.schema import ANSWER_LEN, REF_LOGP_SUM, SAMPLE_ID
from train.metrics import read_metrics
from train.trl import DriftError, MinorSFTConfig, MinorSFTTrainer, load_shards

BETA = 0.04
LR = 1e-3
N = STAGE_ONE_ROWS  # samples = one global batch: every step sees every sample, in both trainers
STEPS = 2  # two epochs of one step: the second checks the lr schedule's decay too
# Compared with metrics.jsonl; TRL names the learning rate `learning_rate`. Tolerance: fp32
# log-probs move by ~1e-6 nats with a micro-batch's padded width, which differs between
# TRL's random micro-batches and minorsft train's length-sorted ones.
STEP_METRICS = ("loss", "deviation", "coef_mean", "coef_min", "coef_max", "policy_logp_per_token",
                "ref_logp_per_token", "grad_norm")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as `run_train` gives `minorsft train` (OMP_NUM_THREADS=1): the tiny
    model gains nothing from two, and on a busy 2-core machine two threads made each TRL step
    4x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minorsft_train_run(data, policy, tmp_path_factory):
    """`minorsft train`: one rank, micro-batches of 4, accumulation 2, no warm-up."""
    output = tmp_path_factory.mktemp("minorsft-train")
    result = run_train("--data", data, "--model", policy, "--output", output, "--global-batch-size", N,
                       "--micro-batch-size", 4, "--max-steps", STEPS, "--beta", BETA, "--lr", LR,
                       "--warmup-ratio", 0, "--dtype", "float32", "--drift-tolerance", 100, "--coef-tolerance", 1)
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def _config(output, **overrides) -> MinorSFTConfig:
    """The optimizer and schedule of `minorsft train`: AdamW (0.9, 0.999, eps 1e-8, no weight
    decay), clipping at 1.0, linear decay from the peak with no warm-up; fp32."""
    settings = dict(output_dir=str(output), per_device_train_batch_size=N, gradient_accumulation_steps=1,
                    max_steps=STEPS, learning_rate=LR, beta=BETA, lr_scheduler_type="linear", warmup_steps=0,
                    weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                    bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                    dataloader_num_workers=0, disable_tqdm=True)
    return MinorSFTConfig(**{**settings, **overrides})


def _trainer(model, data, output, **overrides) -> MinorSFTTrainer:
    return MinorSFTTrainer(str(model), args=_config(output, **overrides),
                           train_dataset=load_shards(data, cache_dir=output / "cache"))


def _step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "deviation" in entry]


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("micro, accumulation", [(N, 1), (N // 2, 2)])
def test_steps_equal_minorsft_train(minorsft_train_run, data, policy, tmp_path, micro, accumulation):
    trainer = _trainer(policy, data, tmp_path, per_device_train_batch_size=micro,
                       gradient_accumulation_steps=accumulation, drift_tolerance=100, coef_tolerance=1)
    trainer.train()
    logged, expected = _step_logs(trainer), read_metrics(minorsft_train_run / "metrics.jsonl")
    assert [entry["step"] for entry in logged] == [m["step"] for m in expected] == list(range(1, STEPS + 1))
    for got, want in zip(logged, expected, strict=True):
        for key in STEP_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
        assert got["learning_rate"] == pytest.approx(want["lr"], rel=1e-9)
    assert expected[0]["coef_max"] - expected[0]["coef_min"] > 1e-2  # the coefficients really vary
    trained = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    reference, initial = _weights(minorsft_train_run / "final"), _weights(policy)
    assert trained.keys() == reference.keys()
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 5e-4  # the steps moved them
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=0, atol=1e-5)


def test_step_one_deviation_is_zero_when_the_model_is_the_reference(tiny_model_dir, data, tmp_path):
    trainer = _trainer(tiny_model_dir, data, tmp_path, max_steps=1, per_device_train_batch_size=N // 2,
                       gradient_accumulation_steps=2)
    trainer.train()
    (first,) = _step_logs(trainer)
    # fp32: only the padded-batch vs one-sample-at-a-time forward differs between the stages
    assert abs(first["deviation"]) < 1e-6
    assert first["coef_min"] == pytest.approx(1.0, abs=1e-6) and first["coef_max"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy_logp_per_token"] == pytest.approx(first["ref_logp_per_token"], abs=1e-6)


def test_drift_guard_refuses_shards_from_another_reference(tiny_model_dir, data, tmp_path):
    other = perturbed_copy(tiny_model_dir, tmp_path / "other", scale=0.1)  # |D| ~ 0.4 on these shards
    trainer = _trainer(other, data, tmp_path / "run", per_device_train_batch_size=N // 2,
                       gradient_accumulation_steps=2)  # default drift_tolerance 0.1
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(DriftError, match=r"mean \|delta_i\|/m_i 0\.\d+ nats/token > --drift-tolerance 0\.1"):
        trainer.train()
    assert trainer.state.global_step == 0
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was updated before the guard stopped training"


def test_refuses_a_tokenizer_other_than_the_shards(data, tmp_path):
    from tiny_models import save_tiny_model

    other = save_tiny_model(tmp_path / "other", make_texts(seed=3), seed=0)
    with pytest.raises(ContractError, match="tokenizer .* differs from the one stage one used"):
        _trainer(other, data, tmp_path)


def test_reference_columns_survive_remove_unused_columns_and_the_collator(tiny_model_dir, data, tmp_path):
    trainer = _trainer(tiny_model_dir, data, tmp_path, per_device_train_batch_size=3)
    assert trainer.args.remove_unused_columns
    batches = list(trainer.get_train_dataloader())
    assert set(batches[0]) == {"input_ids", "attention_mask", "completion_mask", "answer_len", "ref_logp_sum"}
    assert batches[0]["ref_logp_sum"].dtype == torch.float64
    shards = datasets.Dataset.from_parquet([str(p) for p in sorted(data.glob("shard-*.parquet"))],
                                           cache_dir=str(tmp_path / "plain"))
    stored = sorted(zip(shards[REF_LOGP_SUM], shards[ANSWER_LEN], strict=True))
    seen = sorted((r, m) for b in batches for r, m in zip(b["ref_logp_sum"].tolist(), b["answer_len"].tolist(),
                                                         strict=True))
    assert seen == stored  # every sample once, its float64 reference sum bit-exact
    for batch in batches:
        assert torch.equal(batch["completion_mask"].sum(1).float(), batch["answer_len"])


def test_load_shards_checks_the_directory_as_minorsft_train_does(data, tmp_path):
    loaded = load_shards(data, cache_dir=tmp_path / "cache")
    assert loaded.column_names == [SAMPLE_ID, "input_ids", "completion_mask", ANSWER_LEN, REF_LOGP_SUM]
    assert len(loaded) == N
    incomplete = shutil.copytree(data, tmp_path / "incomplete")
    sorted(incomplete.glob("shard-*.parquet"))[-1].unlink()
    with pytest.raises(ContractError, match="incomplete, 1 of 2 chunks missing"):
        load_shards(incomplete, cache_dir=tmp_path / "cache")


def test_refuses_a_data_set_without_stage_one_metadata(tiny_model_dir, data, tmp_path):
    loaded = load_shards(data, cache_dir=tmp_path / "cache")
    plain = datasets.Dataset.from_dict(loaded.to_dict())
    with pytest.raises(ContractError, match="does not come from .*load_shards"):
        MinorSFTTrainer(str(tiny_model_dir), args=_config(tmp_path), train_dataset=plain)
    # what `datasets` transforms keep, the trainer still accepts
    MinorSFTTrainer(str(tiny_model_dir), args=_config(tmp_path), train_dataset=loaded.shuffle(seed=1).select(range(4)))


@pytest.mark.parametrize("overrides, field", [
    ({"loss": "minor_sft"}, "loss"),
    ({"beta": 0.0}, "beta"),
    ({"loss": "minorsft", "token_normalize": True}, "token_normalize"),
    ({"packing": True}, "packing"),
    ({"max_length": 512}, "max_length"),
    ({"dataset_kwargs": {}}, "dataset_kwargs"),
])
def test_config_refuses_what_would_change_the_scored_samples_or_the_loss(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        MinorSFTConfig(output_dir=str(tmp_path), bf16=False, **overrides)


def test_config_defaults_are_the_papers_and_parse_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    config = MinorSFTConfig(output_dir=str(tmp_path), bf16=False)  # TRL's bf16 default needs a GPU
    assert (config.loss, config.beta, config.learning_rate, config.drift_tolerance) == ("minorsft", 0.04, 2e-5, 0.1)
    (parsed,) = HfArgumentParser(MinorSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bf16", "false", "--loss", "sft", "--beta", "0.1", "--token_normalize", "true"])
    assert (parsed.loss, parsed.beta, parsed.token_normalize) == ("sft", 0.1, True)


@pytest.mark.slow
@pytest.mark.parametrize("ranks, micro, deepspeed", [
    (2, 2, None),  # DDP (gloo): the normaliser counts both ranks' samples
    (1, 4, "configs/deepspeed/zero3.json"),  # DeepSpeed ZeRO-3: the engine must not divide by the accumulation again
], ids=["ddp-2-ranks", "deepspeed-zero3"])
def test_launched_runs_with_accumulation_equal_minorsft_train(minorsft_train_run, data, policy, tmp_path, ranks,
                                                              micro, deepspeed):
    import json
    import os
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from train_fixtures import REPO, run_to_end

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    script = Path(__file__).with_name("trl_ranks.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    args = [str(data), str(policy), str(tmp_path), str(micro), "2", *([str(REPO / deepspeed)] if deepspeed else [])]
    result = run_to_end([torchrun, "--standalone", f"--nproc_per_node={ranks}", str(script), *args], env=env,
                        timeout=400, cwd=None)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = [e for e in json.loads((tmp_path / "log_history.json").read_text()) if "deviation" in e]
    expected = read_metrics(minorsft_train_run / "metrics.jsonl")
    assert len(logged) == len(expected) == STEPS
    for got, want in zip(logged, expected, strict=True):
        for key in STEP_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    trained = load_file(tmp_path / "final" / "model.safetensors")
    reference = load_file(minorsft_train_run / "final" / "model.safetensors")
    assert trained.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=0, atol=1e-5)


def test_nothing_else_imports_trl():
    """TRL is an optional extra: only train/trl.py may import it, and the benchmark's
    TRL peer (run as a script, never imported by minorsft)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    importers = {str(path.relative_to(root)) for folder in ("minorsft_core", "precompute", "train", "benchmarks",
                                                              "scripts", "data")
                 for path in (root / folder).rglob("*.py")
                 if re.search(r"^\s*(import trl\b|from trl\b)", path.read_text(), flags=re.M)}
    assert importers == {"train/trl.py", "benchmarks/trl_peer.py"}


@pytest.mark.slow
def test_docs_page_trains_minorsft_on_the_bundled_default(tmp_path, monkeypatch):
    """docs/trl.md's two blocks as written, outputs under tmp_path; stage one with the HF
    engine, which skips vLLM's ~30 s start-up on this tiny model."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from train_fixtures import REPO

    page = (REPO / "docs" / "trl.md").read_text().replace("runs/trl", str(tmp_path))
    (bash,) = re.findall(r"```bash\n(.*?)```", page, flags=re.S)
    (stage_one,) = [line for line in bash.splitlines() if "minorsft precompute" in line]
    command = stage_one.replace(".venv/bin/minorsft", str(Path(sys.executable).with_name("minorsft"))).split()
    result = subprocess.run([*command, "--engine", "hf"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    (python,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    monkeypatch.chdir(REPO)
    namespace = {}
    exec(python, namespace)
    trainer = namespace["trainer"]
    logged = _step_logs(trainer)  # past step 1: the guard (default tolerance) accepted the reference
    assert trainer.state.global_step == trainer.state.max_steps == 20 and len(logged) == 4
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert logged[-1]["deviation"] > 0.5 and logged[-1]["coef_mean"] < 1  # off the reference, weights < 1
    assert (tmp_path / "minorsft" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("amp", [False, True], ids=["bf16-weights", "amp"])
def test_benchmark_peer_trains_in_the_precision_it_is_asked(data, policy, tmp_path, amp):
    """benchmarks/trl_peer.py in bf16: a model loaded in bf16, or with --amp fp32 weights under
    bf16 autocast (the scheme DeepSpeed's bf16 uses), every step counted; --amp without bf16
    is refused."""
    import json
    import subprocess
    import sys

    from train_fixtures import REPO, train_env

    command = [sys.executable, str(REPO / "benchmarks" / "trl_peer.py"), "--model", str(policy), "--data", str(data),
               "--output", str(tmp_path / "out"), "--global-batch-size", "4", "--micro-batch-size", "2",
               "--steps", "2", "--dtype", "bfloat16", *(["--amp"] if amp else [])]
    result = subprocess.run(command, cwd=REPO, env=train_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["weights_dtype"] == ("torch.float32" if amp else "torch.bfloat16")
    assert len(report["steps"]) == 2 and all(step["tokens"] > 0 for step in report["steps"])
    if amp:
        refused = subprocess.run([*command, "--dtype", "float32"], cwd=REPO, env=train_env(CUDA_VISIBLE_DEVICES=""),
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "--amp is bf16 autocast over fp32 weights" in refused.stderr
