"""One validated config dataclass per stage, loaded from YAML with CLI overrides.

``load_config(PrecomputeConfig, yaml_path, overrides)`` reads the YAML, applies the
overrides (CLI flags that were given), and constructs the dataclass, whose
``__post_init__`` raises ``ConfigError`` naming the field on any invalid value. It
never rewrites a value silently. ``save_config`` writes the resolved config next to
the outputs. Field help texts double as the CLI's ``--help``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from minorsft_core.atomic import write_text_atomic
from minorsft_core.errors import ConfigError


def field(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
          required: bool = False):
    """A dataclass field with help text (for ``--help``) and optional allowed choices."""
    metadata = {"help": help, "choices": choices, "required": required}
    if default is dataclasses.MISSING:
        default = None
    return dataclasses.field(default=default, metadata=metadata)


def _check(config) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("required") and value in (None, ""):
            raise ConfigError(f"{f.name}: required (--{f.name.replace('_', '-')} or `{f.name}:` in the YAML)")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(config, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


_LOGP_HEAD_HELP = ("answer log-probs from the final hidden states through a chunked output head, never "
                   "[B, T, V] logits (auto; a non-standard head falls back to logits with a warning), or "
                   "from full logits (logits)")


@dataclasses.dataclass
class PrecomputeConfig:
    """Stage one: score the training set with the frozen reference model."""

    model: str = field(help="reference model: a Hugging Face directory (config, safetensors, tokenizer)", required=True)
    data: str = field(help="input: .jsonl/.json/.parquet file or a datasets directory", required=True)
    output: str = field(help="output directory for shards, rejects and the summary", required=True)
    engine: str = field("auto", help="scoring engine: vllm, hf, or auto (vllm when importable)",
                        choices=("auto", "vllm", "hf"))
    dtype: str = field("auto", help="reference dtype: bfloat16, float16, float32, or auto (bf16 on GPU, fp32 on CPU)",
                       choices=("auto", "bfloat16", "float16", "float32"))
    max_seq_len: int = field(None, help="longest sample in tokens; longer ones are rejected as too_long "
                                        "[default: the smaller of 4096 and the model's context]")
    truncate_answer: bool = field(False, help="truncate over-long answers to --max-seq-len instead of rejecting")
    format: str = field("auto", help="record format: prompt_completion, alpaca, messages, or auto",
                        choices=("auto", "prompt_completion", "alpaca", "messages"))
    template: str = field("chat", help="chat: the tokenizer's chat template; none: plain text (base models)",
                          choices=("chat", "none"))
    num_workers: int = field(1, help="pool size K: independent jobs sharing one output directory")
    worker_index: int = field(0, help="this job's index I in 0..K-1")
    tensor_parallel_size: int = field(1, help="vLLM tensor parallelism within this job")
    chunk_rows: int = field(1024, help="input rows per chunk (the unit of resume and of shard files)")
    max_batch_tokens: int = field(
        None, help="tokens per forward step. hf: padded tokens per batch, at least --max-seq-len [default: 16384]; "
                   "vllm: max_num_batched_tokens (longer prompts are scored in pieces) [default: as many as keep "
                   "the prompt log-probs' fp32 [tokens, vocab] tensors under 1 GiB, at most 4096]")
    packing: bool = field(False, help="hf engine: each batch one padding-free row (position ids restart per sample), "
                                      "attended per sample (varlen attention: flash kernel on CUDA, sdpa per sample "
                                      "on CPU)")
    logp_head: str = field("auto", help="hf engine: " + _LOGP_HEAD_HELP, choices=("auto", "logits"))
    gpu_memory_utilization: float = field(
        None, help="vLLM memory fraction (of host RAM on CPU builds) [default: 0.9 on GPU, 0.15 on CPU]")
    enforce_eager: bool = field(False, help="vLLM: no torch.compile / CUDA graphs; starts ~10 s sooner, "
                                            "scores slower (small jobs, tests)")
    store_token_logps: bool = field(False, help="also store per-token reference log-probs (ref_token_logps)")
    trust_remote_code: bool = field(False, help="allow model code from the model directory (off: safer)")
    seed: int = field(0, help="engine seed")
    quiet: bool = field(False, help="no progress bar; one log line per chunk (batch logs)")

    def __post_init__(self):
        _check(self)
        _positive(self, "max_seq_len", "num_workers", "tensor_parallel_size", "chunk_rows", "max_batch_tokens")
        if not 0 <= self.worker_index < self.num_workers:
            raise ConfigError(f"worker_index: {self.worker_index} not in 0..{self.num_workers - 1} (num_workers)")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")


def default_zero_stage(world_size: int, resumed_stage: int | None) -> int:
    """The ZeRO stage when neither --zero-stage nor the --deepspeed JSON names one. A
    resumed run keeps its checkpoint's stage (DeepSpeed loads a checkpoint only into the
    stage that wrote it, on any number of ranks). A fresh run on several ranks uses
    ZeRO-3 (parameters partitioned: the largest models fit). A fresh run on one rank
    uses ZeRO-2: there is nothing to partition, and ZeRO-3's per-module gathering costs
    time (1.4-1.9x per step on CPU, README) for no memory saved."""
    if resumed_stage is not None:
        return resumed_stage
    return 3 if world_size > 1 else 2


@dataclasses.dataclass
class TrainConfig:
    """Stage two: fine-tune the policy with MinorSFT (or SFT / SFT-using-DPO) on the shards."""

    data: str = field(help="stage-one output directory (shards)", required=True)
    model: str = field(help="policy to fine-tune: a Hugging Face directory; normally the reference itself",
                       required=True)
    output: str = field(help="output directory: metrics, checkpoints, final/ model", required=True)
    loss: str = field("minorsft", help="minorsft (Eq. 7), sft (Eq. 5) or dpo_sft (Eq. 3)",
                      choices=("minorsft", "sft", "dpo_sft"))
    beta: float = field(0.04, help="beta of minorsft and dpo_sft (paper: 0.04)")
    token_normalize: bool = field(False, help="sft only: divide by the global answer-token count (HF convention)")
    lr: float = field(2e-5, help="peak learning rate (paper: 2e-5 minorsft/dpo_sft, 1e-5 sft)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0: off)")
    global_batch_size: int = field(64, help="samples per optimizer step, over all ranks (paper: 64)")
    micro_batch_size: int = field(1, help="samples per rank per forward (unused with --max-tokens-per-micro-batch)")
    max_tokens_per_micro_batch: int = field(
        None, help="token budget of a forward: a micro-batch holds as many samples as fit (padded grid, or packed "
                   "row with --packing); the global batch stays --global-batch-size samples")
    packing: bool = field(False, help="padding-free micro-batches: the samples of a micro-batch in one row, each "
                                      "attending to itself only (position ids restart per sample)")
    epochs: float = field(1.0, help="passes over the data (paper: 1)")
    max_steps: int = field(None, help="stop after this many optimizer steps (overrides --epochs)")
    warmup_ratio: float = field(0.1, help="linear warm-up share of the steps (paper: 0.1), then linear decay")
    seed: int = field(42, help="seed of data order and initialisation")
    dtype: str = field("auto", help="bfloat16, float32, or auto (bf16 on GPU, fp32 on CPU)",
                       choices=("auto", "bfloat16", "float32"))
    zero_stage: int = field(None, help="DeepSpeed ZeRO stage [default: the --deepspeed JSON's "
                                       "zero_optimization.stage, else a resumed checkpoint's, else 3 on several "
                                       "ranks and 2 on one]", choices=(2, 3))
    deepspeed: str = field(None, help="DeepSpeed JSON config; its batch/optimizer keys are set from this config")
    drift_tolerance: float = field(0.1, help="step-1 parity guard (policy = reference): stop before the first update "
                                             "if the mean over samples of |delta_i|/m_i exceeds this (nats/token)")
    coef_tolerance: float = field(0.1, help="step-1 parity guard: stop before the first update if any sample's "
                                            "coefficient w_i is off 1 by more than this (1 turns it off)")
    logp_head: str = field("auto", help=_LOGP_HEAD_HELP, choices=("auto", "logits"))
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    attn_implementation: str = field(
        "auto", help="auto (varlen with --packing, else sdpa), sdpa, eager, flash_attention_2 (when installed), or "
                     "varlen (per-sample attention of packed rows: PyTorch's flash varlen kernel on CUDA, one sdpa "
                     "per sample on CPU; padded batches as sdpa)",
        choices=("auto", "sdpa", "eager", "flash_attention_2", "varlen"))
    save_steps: int = field(500, help="checkpoint every N optimizer steps (and on SIGTERM/SIGINT)")
    save_total_limit: int = field(2, help="checkpoints kept on disk")
    reference: str = field("precomputed", help="precomputed (the shards) or online (baseline: a frozen copy scores "
                                               "each batch)", choices=("precomputed", "online"))
    tensorboard: bool = field(False, help="also log to TensorBoard under OUTPUT/tensorboard")
    wandb: bool = field(False, help="also log to Weights & Biases")
    trust_remote_code: bool = field(False, help="allow model code from the model directory (off: safer)")

    def __post_init__(self):
        _check(self)
        _positive(self, "lr", "global_batch_size", "micro_batch_size", "max_tokens_per_micro_batch", "epochs",
                  "max_steps", "save_steps", "save_total_limit")
        _positive(self, "beta", "drift_tolerance", "coef_tolerance")
        if self.coef_tolerance > 1:
            raise ConfigError(f"coef_tolerance: w_i = 2 sigmoid(-beta delta_i) is within 1 of 1 always; "
                              f"use 1 to turn the check off, got {self.coef_tolerance}")
        # 0 is meaningful for these two: no weight decay, no clipping.
        _positive(self, "weight_decay", "max_grad_norm", allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.max_tokens_per_micro_batch is None and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of "
                              f"micro_batch_size {self.micro_batch_size}")
        if self.token_normalize and self.loss != "sft":
            raise ConfigError("token_normalize: only for --loss sft")


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """YAML gives ints for floats (``lr: 1`` ) and strings for '2e-5' (YAML 1.1); fix types, or raise."""
    if value is None:
        return None
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError(f"not a boolean: {value!r}")
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{f.name} ({source}): {err}") from err
    return value


def load_config(cls, yaml_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None):
    """``cls`` from a YAML file (optional) with ``overrides`` (None values ignored) on top."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.exists():
            raise ConfigError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of field: value")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise ConfigError(f"--config {path}: unknown fields {unknown}; known: {', '.join(fields)}")
        values.update({k: _coerce(fields[k], v, str(path)) for k, v in loaded.items()})
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown option {key!r}")
        if value is not None:
            values[key] = _coerce(fields[key], value, "command line")
    return cls(**values)


def save_config(config, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
