"""Stage-one scoring throughput: the vllm engine against the hf engine, one run.

Builds a random model shaped like a small Qwen2, makes one synthetic set of samples
(random token ids, prompt then answer, lengths spread over a range), scores it with
each engine (the same ``Engine.score`` the ``minorsft precompute`` command calls)
and prints, per engine, start-up time, scoring tokens/s (prompt + answer tokens,
start-up excluded) and the vllm/hf ratio, plus the largest difference between the
engines' ``ref_logp_sum`` as a sanity check.

    .venv/bin/python benchmarks/bench_precompute.py                      # CPU default
    .venv/bin/python benchmarks/bench_precompute.py --shape qwen2-0.5b --dtype bfloat16 --engines hf  # a GPU

vLLM spawns worker processes: this script must run as ``__main__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from minorsft_core.config import PrecomputeConfig
from minorsft_core.data import Sample

# Qwen2 shapes: hidden, layers, heads, kv heads, intermediate, vocab. "cpu-small" keeps
# Qwen2's proportions (GQA 4:1, head size 64, SwiGLU ~3x) at a size a 2-core CPU scores
# in about a minute.
SHAPES = {
    "cpu-small": (512, 4, 8, 2, 1536, 32000),
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936),
    "qwen2-7b": (3584, 28, 28, 4, 18944, 152064),
}


def save_random_model(output: Path, shape: str, max_len: int) -> int:
    """A random Qwen2 of ``shape`` with a small BPE tokenizer (its ids are what the
    samples use); returns the number of model parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # data/tiny_models.py
    from tiny_models import build_tokenizer

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    tokenizer = build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max(max_len + 1, 2048), tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return sum(p.numel() for p in model.parameters())


def synthetic_samples(n: int, min_len: int, max_len: int, id_range: int, seed: int = 0) -> list[Sample]:
    """Prompt of 20-60% of the sample, the rest answer; ids below ``id_range`` so they
    are valid for the tokenizer too."""
    rng = random.Random(seed)
    samples = []
    for k in range(n):
        length = rng.randint(min_len, max_len)
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        ids = [rng.randrange(3, id_range) for _ in range(length)]
        samples.append(Sample(k, f"b{k}", ids, [0] * prompt + [1] * (length - prompt)))
    return samples


def bench(engine_name: str, config: PrecomputeConfig, samples: list[Sample], warmup: list[Sample]) -> dict:
    from precompute.engines import batch_tokens, make_engine

    if engine_name == "vllm":  # its tokens per step as `minorsft precompute` sets them by default
        config = dataclasses.replace(config, max_batch_tokens=batch_tokens(
            dataclasses.replace(config, max_batch_tokens=None), "vllm"))
    started = time.monotonic()
    engine = make_engine(config, engine_name, config.dtype)
    startup_s = time.monotonic() - started
    engine.score(warmup, lambda rows, tokens: None)  # first-call allocations and kernel selection
    started = time.monotonic()
    scores = engine.score(samples, lambda rows, tokens: None)
    seconds = time.monotonic() - started
    engine.close()
    tokens = sum(len(s.input_ids) for s in samples)
    return {"engine": engine_name, "startup_s": round(startup_s, 1), "score_s": round(seconds, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "ref_logp_sum": scores.ref_logp_sum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu-small")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="hf engine batch bound")
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated, in run order")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        model_dir = Path(workdir) / "model"
        params = save_random_model(model_dir, args.shape, args.max_len)
        samples = synthetic_samples(args.samples, args.min_len, args.max_len, id_range=200)
        warmup = synthetic_samples(8, args.min_len, args.max_len, id_range=200, seed=1)
        config = PrecomputeConfig(model=str(model_dir), data="-", output="-", dtype=args.dtype,
                                  max_seq_len=args.max_len, max_batch_tokens=args.max_batch_tokens,
                                  enforce_eager=args.enforce_eager)
        results = [bench(name, config, samples, warmup) for name in args.engines.split(",")]

    print(f"shape {args.shape} ({params / 1e6:.1f}M params), dtype {args.dtype}, {args.samples} samples "
          f"of {args.min_len}-{args.max_len} tokens ({results[0]['tokens']} tokens)")
    for r in results:
        print(f"  {r['engine']:5s} start-up {r['startup_s']:6.1f} s   scoring {r['score_s']:8.2f} s   "
              f"{r['tokens_per_s']:10,.1f} tokens/s")
    by_name = {r["engine"]: r for r in results}
    if {"vllm", "hf"} <= by_name.keys():
        ratio = by_name["vllm"]["tokens_per_s"] / by_name["hf"]["tokens_per_s"]
        drift = abs(by_name["vllm"]["ref_logp_sum"] - by_name["hf"]["ref_logp_sum"]).max()
        print(f"  vllm / hf tokens/s ratio: {ratio:.2f}; max |ref_logp_sum difference|: {drift:.2e} nats")
    print(json.dumps([{k: v for k, v in r.items() if k != "ref_logp_sum"} for r in results]))


if __name__ == "__main__":
    main()
