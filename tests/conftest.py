"""Shared fixtures: a tiny Qwen2 model and ChatML tokenizer built locally (no hub),
once per test session, reused by every integration test."""

from __future__ import annotations

import json
import random

import pytest
from tiny_models import WORDS, make_texts, save_tiny_model


def make_records(n: int, seed: int = 1) -> list[dict]:
    """Varied prompt/completion records of different lengths."""
    rng = random.Random(seed)
    records = []
    for k in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25)))
        completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        records.append({"id": f"s{k}", "prompt": prompt + "?", "completion": completion + "."})
    return records


def write_jsonl(path, records) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face directory: random fp32 Qwen2 (2 layers, hidden 64) + BPE tokenizer
    with Qwen2's ChatML template, saved as safetensors."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), make_texts(), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


STAGE_ONE_ROWS = 8  # the `data` fixture's samples: one global batch in the stage-two tests


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory):
    """Stage one's output for 8 varied records scored by the tiny model, in two chunks (5 + 3 rows)."""
    from train_fixtures import write_stage_one_output

    return write_stage_one_output(tiny_model_dir, make_records(STAGE_ONE_ROWS, seed=5),
                                  tmp_path_factory.mktemp("shards"), chunk_rows=5)


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    """The tiny model with small noise on every weight: not the reference, so every delta_i
    is nonzero and the coefficients vary."""
    from train_fixtures import perturbed_copy

    return perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("policy"), scale=0.02)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without it they are skipped, and reported as skipped."""
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
