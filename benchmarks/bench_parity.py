"""Step-1 parity between the stages on a real pretrained model, in bf16 and fp32.

Before the first update the policy *is* the reference, so each sample's
``delta_i = logp_i - ref_logp_i`` measures how differently stage one and the trainer
score the same tokens. This script scores the bundled default's chat samples with
SmolLM2-135M-Instruct (fetched by ``scripts/fetch_smollm2.py``) three ways in stage
one (vllm bf16, hf bf16, hf fp32), runs ``minorsft train`` for one step on each in
bf16 and in fp32 (stopped by the guard before the update, which writes the step-1
report to summary.json), and prints
the step-1 parity report of each pair: mean and max of |delta_i|/m_i (nats per answer
token), the signed mean (what the old guard tested) and the coefficient range at
beta 0.04. The trainer's guard defaults (``--drift-tolerance``, ``--coef-tolerance``)
are chosen from this table (docs/train.md).

    .venv/bin/python benchmarks/bench_parity.py [--samples 40]    # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from fetch_smollm2 import default_dir, fetch  # noqa: E402

from minorsft_core.errors import EXIT_DRIFT  # noqa: E402

STAGE_ONE = {"vllm bf16": ("vllm", "bfloat16"), "hf bf16": ("hf", "bfloat16"), "hf fp32": ("hf", "float32")}
TRAINER = {"bf16": "bfloat16", "fp32": "float32"}


def run(*args, expect: int = 0) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([str(Path(sys.executable).with_name("minorsft")), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != expect:
        raise SystemExit(f"minorsft {args[0]} exited {result.returncode}, not {expect}:\n{result.stderr[-3000:]}")


def parity(model: Path, data: Path, work: Path) -> tuple[dict, int]:
    """Step-1 reports by (stage one, trainer dtype), and the number of samples scored."""
    results = {}
    for name, (engine, dtype) in STAGE_ONE.items():
        shards = work / f"shards-{engine}-{dtype}"
        run("precompute", "--model", model, "--data", data, "--output", shards, "--engine", engine, "--dtype", dtype,
            "--max-seq-len", 1024, "--quiet")
        scored = json.loads((shards / "summary-w0.json").read_text())["rows_scored"]
        batch = scored - scored % 8  # step 1 sees (almost) every sample; bad rows were rejected
        for trainer_name, trainer_dtype in TRAINER.items():
            output = work / f"train-{engine}-{dtype}-{trainer_dtype}"
            # Tolerances no run can meet: the guard stops every run before its first update
            # (exit 5) and leaves the step-1 report in summary.json, with no optimizer
            # step and no final model to write.
            run("train", "--data", shards, "--model", model, "--output", output, "--dtype", trainer_dtype,
                "--global-batch-size", batch, "--micro-batch-size", 8, "--max-steps", 1,
                "--drift-tolerance", 1e-12, "--coef-tolerance", 1e-12, expect=EXIT_DRIFT)
            step1 = json.loads((output / "summary.json").read_text())["last_metrics"]
            results[f"{name} -> trainer {trainer_name}"] = {
                key: step1[key] for key in ("abs_deviation", "abs_deviation_max", "deviation", "coef_min", "coef_max")
            }
    return results, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40, help="the first N rows of data/default/train.jsonl")
    parser.add_argument("--model", type=Path, default=None, help="SmolLM2 directory (default: fetch into the cache)")
    args = parser.parse_args()
    model = args.model or fetch(default_dir())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        lines = (REPO / "data" / "default" / "train.jsonl").read_text().splitlines()
        data.write_text("\n".join(itertools.islice((line for line in lines if line.strip()), args.samples)) + "\n")
        results, batch = parity(model, data, work)
    print(f"SmolLM2-135M-Instruct, step 1 (policy = reference) over {batch} samples of the first {args.samples} "
          "rows of data/default/train.jsonl")
    print(f"{'stage one -> trainer':<28}{'mean |d|/m':>11}{'max |d|/m':>11}{'mean d/m':>10}{'coef min':>10}"
          f"{'coef max':>10}")
    for name, r in results.items():
        print(f"{name:<28}{r['abs_deviation']:>11.4f}{r['abs_deviation_max']:>11.4f}{r['deviation']:>+10.4f}"
              f"{r['coef_min']:>10.4f}{r['coef_max']:>10.4f}")
    print(json.dumps(results))  # last line: machine-readable


if __name__ == "__main__":
    main()
