"""Config dataclasses: YAML + CLI overrides, validation naming the field, every shipped
config loads, and the CLI stays cheap to import."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minorsft_core.config import PrecomputeConfig, TrainConfig, load_config, save_config
from minorsft_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {
    PrecomputeConfig: {"model": "m", "data": "d.jsonl", "output": "o"},
    TrainConfig: {"model": "m", "data": "d", "output": "o"},
}


def _stage_of(path: Path):
    """configs/**/precompute*.yaml configure stage one; every other YAML stage two."""
    return PrecomputeConfig if path.name.startswith("precompute") else TrainConfig


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads(path):
    cls = _stage_of(path)
    overrides = {k: v for k, v in REQUIRED[cls].items() if k != "model"}
    config = load_config(cls, path, overrides)
    assert config.model


def test_paper_settings():
    configs = {
        name: load_config(TrainConfig, REPO / f"configs/qwen2-7b-instruct/{name}.yaml", REQUIRED[TrainConfig])
        for name in ("minorsft", "sft", "dpo_sft")
    }
    assert (configs["minorsft"].beta, configs["minorsft"].lr) == (0.04, 2e-5)
    assert (configs["dpo_sft"].beta, configs["dpo_sft"].lr) == (0.04, 2e-5)
    assert configs["sft"].lr == 1e-5
    for config in configs.values():
        assert (config.global_batch_size, config.warmup_ratio, config.epochs) == (64, 0.1, 1.0)


@pytest.mark.parametrize("path", sorted((REPO / "configs/deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_configs_parse(path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert f"zero{stage}" in path.name


def test_cli_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: sft\nlr: 1e-5\nglobal_batch_size: 8\n")
    config = load_config(TrainConfig, path, {**REQUIRED[TrainConfig], "lr": 3e-5, "beta": None})
    assert (config.loss, config.lr, config.global_batch_size, config.beta) == ("sft", 3e-5, 8, 0.04)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "kto"}, "loss: 'kto' is not one of"),
        ({"lr": -1}, "lr: must be > 0"),
        ({"global_batch_size": 10, "micro_batch_size": 4}, "global_batch_size: 10 is not a multiple"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"token_normalize": True}, "token_normalize: only for --loss sft"),
        ({"zero_stage": 1}, "zero_stage: 1 is not one of"),
        ({"global_batch_size": "many"}, "global_batch_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, {**REQUIRED[TrainConfig], **overrides})


def test_missing_required_and_unknown_fields(tmp_path):
    with pytest.raises(ConfigError, match="output: required"):
        load_config(PrecomputeConfig, None, {"model": "m", "data": "d"})
    with pytest.raises(ConfigError, match="worker_index: 3 not in 0..2"):
        load_config(PrecomputeConfig, None, {**REQUIRED[PrecomputeConfig], "num_workers": 3, "worker_index": 3})
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown fields \['learning_rate'\]"):
        load_config(TrainConfig, path, REQUIRED[TrainConfig])


def test_saved_config_loads_back(tmp_path):
    config = load_config(TrainConfig, None, {**REQUIRED[TrainConfig], "max_steps": 7})
    save_config(config, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == config


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_is_cheap():
    """`import minorsft_core` and its CLI, contract and data modules pull in no torch at all
    (so no vllm, deepspeed or torch.distributed); the losses import torch (which itself
    registers torch.distributed) but never vllm or deepspeed, and never call collectives."""
    light = _modules_after("import minorsft_core, minorsft_core.cli, minorsft_core.schema, minorsft_core.data, "
                           "minorsft_core.config")
    assert not {"torch", "vllm", "deepspeed", "transformers"} & light
    with_losses = _modules_after("import minorsft_core.losses")
    assert not {"vllm", "deepspeed", "transformers"} & with_losses
    assert "torch.distributed" not in (REPO / "minorsft_core/losses.py").read_text()


def test_stages_raise_typed_errors_and_never_import_the_command():
    """Errors and exit codes live in the ground floor (minorsft_core.errors); the stages
    stand on it and only the command maps errors to codes, so no stage imports the CLI."""
    import ast

    for path in sorted([*REPO.glob("precompute/*.py"), *REPO.glob("train/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "minorsft_core.cli", f"{path.relative_to(REPO)} imports the CLI"
    from minorsft_core import errors

    assert errors.exit_code_for(ConfigError("x")) == errors.EXIT_USAGE
    assert errors.exit_code_for(errors.DataError("x")) == errors.exit_code_for(errors.ContractError("x")) == 3
    assert errors.exit_code_for(FileNotFoundError("x")) == errors.EXIT_BAD_INPUT
    assert errors.exit_code_for(PermissionError("x")) == errors.exit_code_for(OSError(28, "full")) == errors.EXIT_IO
    assert errors.exit_code_for(RuntimeError("x")) == errors.EXIT_ENGINE


def test_cli_help_and_usage_errors():
    help_out = subprocess.run([sys.executable, "-m", "minorsft_core.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "precompute" in help_out.stdout and "train" in help_out.stdout
    commands = help_out.stdout.split("Commands:", 1)[1]
    assert "Figure 1 view" in commands and "..." not in commands  # no command summary cut short
    bad = subprocess.run(
        [sys.executable, "-m", "minorsft_core.cli", "train", "--data", "d", "--model", "m", "--output", "o",
         "--loss", "kto"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "loss: 'kto' is not one of" in bad.stderr


def test_train_accepts_deepspeed_launchers_local_rank(tmp_path):
    """The `deepspeed` launcher inserts --local_rank=K before the subcommand; it must not be
    a usage error (the launcher itself runs in tests/test_train_integration.py)."""
    result = subprocess.run(
        [sys.executable, "-m", "minorsft_core.cli", "--local_rank=1", "train", "--data", str(tmp_path / "none"),
         "--model", "m", "--output", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 3 and "no such directory" in result.stderr


def test_file_system_errors_have_their_own_exit_code(tmp_path, tiny_model_dir):
    """An output path that is a file is neither bad input nor an engine failure: exit 6."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "why", "completion": "because"}\n')
    (tmp_path / "out").write_text("a file, not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "minorsft_core.cli", "precompute", "--model", str(tiny_model_dir), "--data", str(data),
         "--output", str(tmp_path / "out"), "--engine", "hf", "--max-seq-len", "256", "--max-batch-tokens", "256"],
        capture_output=True, text=True,
    )
    assert result.returncode == 6, result.stderr[-2000:]
    assert "re-run the same command" in result.stderr


@pytest.mark.parametrize("command, config_cls", [("precompute", PrecomputeConfig), ("train", TrainConfig)])
def test_help_at_80_columns_shows_every_flag_whole_with_its_default(command, config_cls):
    import os
    import re

    result = subprocess.run([sys.executable, "-m", "minorsft_core.cli", command, "--help"], capture_output=True,
                            text=True, env=dict(os.environ, COLUMNS="80"))
    assert result.returncode == 0, result.stderr
    assert max(map(len, result.stdout.splitlines())) <= 80
    # Option entries start at column 2 with "--"; continuation lines are indented further.
    entries = re.split(r"\n(?=  --)", result.stdout.split("Options:\n", 1)[1])
    by_flag = {entry.split()[0]: " ".join(entry.split()) for entry in entries}
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in by_flag, f"{flag} not shown whole:\n{result.stdout}"
        assert "[default:" in by_flag[flag] or "[required]" in by_flag[flag], by_flag[flag]
