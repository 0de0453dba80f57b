"""Stage two side by side in one run: what MinorSFT costs over SFT, what packing buys,
and how both compare with TRL's ``SFTTrainer`` on the same model, data and batches.

Each variant is a fresh process (one rank; ours under the one-rank default, ZeRO-2,
unless named ``zero3``),
run in interleaved rounds so a burst of other work on a shared machine hits every
variant alike; the fastest round per variant is reported (noise only ever slows a
run down). Per variant: tokens/s over steps 2..N (real tokens, padding not counted;
step 1 pays one-off warm-up), the time of the whole pass (all N steps) and of the
process (start-up included), peak memory (RSS on CPU, CUDA peak allocated on GPU),
and the padding fraction; each as a ratio to ``--baseline``.

    .venv/bin/python benchmarks/bench_train.py     # sft, minorsft, dpo_sft, online reference (run_all.py)
    .venv/bin/python benchmarks/bench_train.py --against-trl --samples 128 --steps 8   # README, TRL table
    .venv/bin/python benchmarks/bench_train.py --against-trl --device cuda --dtype bfloat16 \\
        --hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --vocab 151936

Stage one is real: ``minorsft precompute --engine hf`` in fp32 (so every run starts
with deviation ~0). TRL (the ``trl`` extra) trains the same shards' token ids with
``completion_only_loss`` (benchmarks/trl_peer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "data"))  # data/tiny_models.py

from tiny_models import WORDS, make_texts, save_tiny_model  # noqa: E402

OURS = {
    "sft": ["--loss", "sft"],
    "minorsft": ["--loss", "minorsft"],
    "dpo_sft": ["--loss", "dpo_sft"],
    "minorsft+online": ["--loss", "minorsft", "--reference", "online"],
    "sft+packing": ["--loss", "sft", "--packing"],
    "minorsft+packing": ["--loss", "minorsft", "--packing"],
    "sft+zero3": ["--loss", "sft", "--zero-stage", "3"],
    "minorsft+zero3": ["--loss", "minorsft", "--zero-stage", "3"],
    "sft+packing+zero3": ["--loss", "sft", "--packing", "--zero-stage", "3"],
    "minorsft+packing+zero3": ["--loss", "minorsft", "--packing", "--zero-stage", "3"],
}
TRL = {"trl-sft": [], "trl-sft+padding-free": ["--padding-free"],
       # bf16 only: fp32 weights under autocast, the precision ours trains in (fp32 master weights)
       "trl-sft+amp": ["--amp"], "trl-sft+padding-free+amp": ["--padding-free", "--amp"]}
DEFAULT_VARIANTS = ("sft", "minorsft", "dpo_sft", "minorsft+online")
AGAINST_TRL = ("trl-sft", "trl-sft+padding-free", "sft", "minorsft", "sft+packing", "minorsft+packing", "sft+zero3",
               "minorsft+zero3")


def make_records(n: int, max_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"id": f"b{k}", "prompt": text(5, 60) + "?", "completion": text(20, max_words) + "."} for k in range(n)]


def stage_one(model: Path, records: list[dict], workdir: Path) -> Path:
    source, output = workdir / "records.jsonl", workdir / "shards"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    minorsft = str(Path(sys.executable).with_name("minorsft"))
    subprocess.run([minorsft, "precompute", "--model", str(model), "--data", str(source), "--output", str(output),
                    "--engine", "hf", "--dtype", "float32", "--max-seq-len", "2048", "--quiet"], check=True)
    return output


def step_stats(steps: list[dict], wall_s: float, peak_mib: float) -> dict:
    """``steps``: per optimizer step ``{"seconds", "tokens", "padding_fraction"}``."""
    steady = steps[1:] or steps  # step 1 pays one-off warm-up (allocator, kernels)
    seconds = sum(s["seconds"] for s in steady)
    return {
        "tokens_per_s": sum(s["tokens"] for s in steady) / seconds,
        "step_s": seconds / len(steady),
        "pass_s": sum(s["seconds"] for s in steps),
        "wall_s": wall_s,
        "peak_mib": peak_mib,
        "padding": sum(s["padding_fraction"] for s in steps) / len(steps),
    }


def _env() -> dict:
    """Every variant's environment: the same OMP_NUM_THREADS (``--threads``, set in ``main``)."""
    return dict(os.environ, TOKENIZERS_PARALLELISM="false")


def run_ours(name: str, common: list, workdir: Path, global_batch: int) -> dict:
    output = workdir / name
    shutil.rmtree(output, ignore_errors=True)  # a fresh run each round, not a resume
    minorsft = str(Path(sys.executable).with_name("minorsft"))
    started = time.perf_counter()
    result = subprocess.run([minorsft, "train", *map(str, common), "--output", str(output), *OURS[name]],
                            cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [{"seconds": global_batch / m["samples_per_s"],
              "tokens": m["tokens_per_s"] * global_batch / m["samples_per_s"],
              "padding_fraction": m["padding_fraction"]} for m in metrics]
    return step_stats(steps, wall, json.loads((output / "summary.json").read_text())["peak_memory_mib"])


def trl_attention(asked: str, name: str) -> str:
    """TRL gets the attention ours runs on the same layout: ``auto`` is sdpa for padded
    batches and ``varlen`` (PyTorch's flash varlen kernel on CUDA) for padding-free rows."""
    from minorsft_core.attention import resolve

    return resolve(asked, packing="padding-free" in name)


def run_trl(name: str, args, model: Path, shards: Path, workdir: Path) -> dict:
    output = workdir / name
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(HERE / "trl_peer.py"), "--model", str(model), "--data", str(shards),
         "--output", str(output), "--global-batch-size", str(args.global_batch_size),
         "--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps), "--dtype", args.dtype,
         "--lr", str(args.lr), "--attn-implementation", trl_attention(args.attn_implementation, name), *TRL[name]],
        cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return step_stats(report["steps"], wall, report["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-words", type=int, default=300, help="longest answer in words")
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=2048,
                        help="embedding and output-head rows (the text uses the tiny tokenizer's ~450 ids)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu hides any GPU from every run (CUDA_VISIBLE_DEVICES='')")
    parser.add_argument("--attn-implementation", default="auto",
                        choices=("auto", "sdpa", "eager", "flash_attention_2", "varlen"),
                        help="of every variant, TRL's too (auto: varlen for packed/padding-free rows, else sdpa)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of: {', '.join([*OURS, *TRL])}")
    parser.add_argument("--against-trl", action="store_true",
                        help=f"variants {','.join(AGAINST_TRL)} (baseline trl-sft)")
    parser.add_argument("--baseline", default=None, help="the variant ratios are to (default: the first)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest is reported")
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="OMP_NUM_THREADS of every variant's process (default: all cores)")
    args = parser.parse_args()
    if args.against_trl:
        args.variants = ",".join(AGAINST_TRL)
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in OURS and name not in TRL]
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}: choose from {', '.join([*OURS, *TRL])}")
    if args.dtype != "bfloat16" and any(name.endswith("+amp") for name in variants):
        parser.error("the +amp variants are bf16 autocast over fp32 weights: give --dtype bfloat16")
    baseline = args.baseline or variants[0]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        model = save_tiny_model(workdir / "model", make_texts(2000), vocab_size=args.vocab, embedding_rows=args.vocab,
                                hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                                num_kv_heads=args.kv_heads, intermediate_size=args.intermediate)
        shards = stage_one(model, make_records(args.samples, args.max_words), workdir)
        lengths = _lengths(shards)
        common = ["--data", shards, "--model", model, "--global-batch-size", args.global_batch_size,
                  "--micro-batch-size", args.micro_batch_size, "--max-steps", args.steps, "--dtype", args.dtype,
                  "--lr", args.lr, "--save-steps", 10**6, "--attn-implementation", args.attn_implementation]
        rounds = []
        for round_index in range(args.repeats):
            rounds.append({})
            for name in variants:
                result = run_trl(name, args, model, shards, workdir) if name in TRL \
                    else run_ours(name, common, workdir, args.global_batch_size)
                rounds[-1][name] = result
                # as it comes, so a run cut short still leaves its measurements
                print(f"round {round_index + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        results = {name: min((r[name] for r in rounds), key=lambda r: r["pass_s"]) for name in variants}

    print(f"{args.samples} samples of {min(lengths)}-{max(lengths)} tokens, global batch {args.global_batch_size}"
          f" = micro {args.micro_batch_size} x {args.global_batch_size // args.micro_batch_size}, {args.steps} steps,"
          f" {args.dtype}, {args.device}, {args.threads} threads, {args.repeats} interleaved rounds;"
          f" ratios to {baseline}; 1-min load average {load_at_start:.1f} at the start,"
          f" {os.getloadavg()[0]:.1f} at the end")
    base = results[baseline]
    print(f"{'variant':<24}{'tokens/s':>9}{'x':>7}{'pass s':>8}{'x':>7}{'wall s':>8}{'x':>7}{'peak MiB':>9}{'x':>7}"
          f"{'padding':>8}")
    for name, r in results.items():
        print(f"{name:<24}{r['tokens_per_s']:>9.0f}{r['tokens_per_s'] / base['tokens_per_s']:>7.3f}"
              f"{r['pass_s']:>8.2f}{r['pass_s'] / base['pass_s']:>7.3f}{r['wall_s']:>8.1f}"
              f"{r['wall_s'] / base['wall_s']:>7.3f}{r['peak_mib']:>9.0f}{r['peak_mib'] / base['peak_mib']:>7.3f}"
              f"{r['padding']:>8.3f}")
    print(json.dumps(results))  # last line: machine-readable, for benchmarks/run_all.py


def _lengths(shards: Path) -> list[int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return [n for path in sorted(shards.glob("shard-*.parquet"))
            for n in pc.list_value_length(pq.read_table(path, columns=["input_ids"])["input_ids"]).to_pylist()]


if __name__ == "__main__":
    main()
