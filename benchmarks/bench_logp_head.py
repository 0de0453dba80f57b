"""What the answer-only log-prob head saves at a real vocabulary: one script, one run.

A random Qwen2 body (small: the vocabulary is what matters) with Qwen2's 151,936-entry
vocabulary scores and trains on samples whose answers are 1-4k tokens long. Each
measurement is a fresh process, run with ``--logp-head logits`` (full ``[B, T, V]``
logits, the old path) and ``--logp-head auto`` (hidden states through the chunked
head), interleaved, and reported side by side with their ratio:

- stage one: ``minorsft precompute --engine hf`` over all samples: peak RSS and scoring
  tokens/s;
- stage two: ``minorsft train`` (one rank, ZeRO-3, micro-batch 1): peak RSS of the
  whole run and seconds per step (steps 2..N).

Target (issue: real shapes): stage-two peak memory at most 0.35x the logits path, and
no slower.

    .venv/bin/python benchmarks/bench_logp_head.py [--answer-tokens 1000 4000] [--repeats 2]

Peak memory is the process's peak RSS on CPU (model, optimizer and activations
included); on a GPU, stage two's is CUDA peak allocated, stage one's still host RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN2_VOCAB = 151_936
HEADS = ("logits", "auto")


def build_model(directory: Path, *, vocab: int, hidden: int, layers: int) -> tuple[Path, list[str]]:
    """A tiny BPE tokenizer (ids < 1k) over a model with a ``vocab``-entry embedding and
    output head: the data is cheap to make, the memory is that of the real vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # data/tiny_models.py
    from tiny_models import build_tokenizer

    rng = random.Random(0)
    words = [f"w{k}" for k in range(600)]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    tokenizer = build_tokenizer(texts, vocab_size=1024)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=1, max_position_embeddings=8192,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, words


def write_data(path: Path, words: list[str], samples: int, lo: int, hi: int, tokenizer_dir: Path) -> None:
    """Prompt/completion records whose answers are ``lo``..``hi`` tokens long."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(1)
    with open(path, "w") as handle:
        for k in range(samples):
            target = lo + (hi - lo) * k // max(samples - 1, 1)
            answer = []
            while len(tokenizer(" ".join(answer))["input_ids"]) < target:
                answer.extend(rng.choice(words) for _ in range(max(8, (target - len(answer)) // 2)))
            ids = tokenizer(" ".join(answer))["input_ids"][:target]
            prompt = " ".join(rng.choice(words) for _ in range(30))
            handle.write(json.dumps({"id": f"b{k}", "prompt": prompt, "completion": tokenizer.decode(ids)}) + "\n")


def measured(command: list) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` in a fresh child of a fresh interpreter; return its result and
    peak RSS in MiB (RUSAGE_CHILDREN of that interpreter covers this one command only)."""
    probe = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
             "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", probe, *map(str, command)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    code, max_rss_kib = json.loads(result.stdout.strip().splitlines()[-1])
    if code:
        raise SystemExit(f"{command[:2]} failed ({code}):\n{result.stderr[-3000:]}")
    return result, max_rss_kib / 1024


def precompute(head: str, model: Path, data: Path, output: Path, max_len: int, dtype: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    minorsft = Path(sys.executable).with_name("minorsft")
    _, peak = measured([minorsft, "precompute", "--model", model, "--data", data, "--output", output,
                        "--engine", "hf", "--dtype", dtype, "--max-seq-len", max_len,
                        "--max-batch-tokens", max_len, "--logp-head", head, "--quiet"])
    summary = json.loads((output / "summary-w0.json").read_text())
    return {"peak_mib": peak, "tokens_per_s": summary["tokens_per_s"]}


def train(head: str, model: Path, shards: Path, output: Path, global_batch: int, steps: int, dtype: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    minorsft = Path(sys.executable).with_name("minorsft")
    measured([minorsft, "train", "--data", shards, "--model", model, "--output", output,
              "--global-batch-size", global_batch, "--micro-batch-size", 1, "--max-steps", steps,
              "--dtype", dtype, "--save-steps", 10**6, "--logp-head", head, "--zero-stage", 3])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((output / "summary.json").read_text())
    return {"peak_mib": summary["peak_memory_mib"],  # the rank's own: RSS on CPU, CUDA peak on GPU
            "step_s": statistics.median(global_batch / m["samples_per_s"] for m in metrics[1:] or metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=QWEN2_VOCAB)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=(1000, 4000), metavar=("MIN", "MAX"))
    parser.add_argument("--steps", type=int, default=3, help="training steps of 2 samples; step 1 is warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is reported")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both stages")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model, words = build_model(work / "model", vocab=args.vocab, hidden=args.hidden, layers=args.layers)
        data = work / "data.jsonl"
        write_data(data, words, args.samples, *args.answer_tokens, model)
        max_len = args.answer_tokens[1] + 256
        rounds = []
        for _ in range(args.repeats):
            rounds.append({head: {
                "stage one": precompute(head, model, data, work / f"shards-{head}", max_len, args.dtype),
                "stage two": train(head, model, work / f"shards-{head}", work / f"run-{head}", 2, args.steps,
                                   args.dtype),
            } for head in HEADS})
    best = {head: {stage: {"peak_mib": min(r[head][stage]["peak_mib"] for r in rounds)}
                   for stage in ("stage one", "stage two")} for head in HEADS}
    for head in HEADS:
        best[head]["stage one"]["tokens_per_s"] = max(r[head]["stage one"]["tokens_per_s"] for r in rounds)
        best[head]["stage two"]["step_s"] = min(r[head]["stage two"]["step_s"] for r in rounds)

    print(f"vocabulary {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, {args.samples} samples with "
          f"answers of {args.answer_tokens[0]}-{args.answer_tokens[1]} tokens, {args.dtype}, best of {args.repeats} rounds")
    print(f"{'measure':<28}{'logits':>12}{'auto (head)':>14}{'ratio':>8}")
    rows = [("stage one peak MiB", "stage one", "peak_mib"), ("stage one tokens/s", "stage one", "tokens_per_s"),
            ("stage two peak MiB", "stage two", "peak_mib"), ("stage two s/step", "stage two", "step_s")]
    for label, stage, key in rows:
        old, new = best["logits"][stage][key], best["auto"][stage][key]
        print(f"{label:<28}{old:>12,.2f}{new:>14,.2f}{new / old:>8.3f}")
    print("target: stage two peak memory ratio <= 0.35, s/step ratio <= 1")
    print(json.dumps(best))  # last line: machine-readable


if __name__ == "__main__":
    main()
