"""Every benchmark in one command, one table of ratios measured side by side.

    .venv/bin/python benchmarks/run_all.py [--quick]

Runs ``bench_precompute.py`` (stage one: vllm against hf on the same samples) and
``bench_train.py`` (stage two: sft, minorsft, dpo_sft and the online reference on the
same shards) in child processes, each printing its JSON results as its last line,
and prints one table: each measurement and its ratio to the baseline of its stage
(hf for stage one, sft for stage two). ``--quick`` runs smaller settings (one round,
fewer samples) for a smoke check; the README quotes the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_bench(script: str, *args: str) -> object:
    result = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{script} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    sys.stderr.write(result.stdout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(precompute: list[dict], train: dict) -> list[tuple[str, str, float, float]]:
    """Rows of (stage, variant, value, ratio to the stage's baseline)."""
    rows = []
    engines = {r["engine"]: r for r in precompute}
    base = engines.get("hf") or next(iter(engines.values()))
    for name, r in engines.items():
        rows.append(("stage one tokens/s", name, r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"]))
    sft = train["sft"]
    for key, label in (("step_s", "stage two s/step"), ("tokens_per_s", "stage two tokens/s"),
                       ("peak_mib", "stage two peak MiB")):
        for name, r in train.items():
            rows.append((label, name, r[key], r[key] / sft[key]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings, one round (smoke check)")
    args = parser.parse_args()
    started = time.time()
    if args.quick:
        precompute = run_bench("bench_precompute.py", "--samples", "16", "--max-len", "128", "--enforce-eager")
        train = run_bench("bench_train.py", "--samples", "64", "--steps", "4", "--repeats", "1")
    else:
        precompute = run_bench("bench_precompute.py")
        train = run_bench("bench_train.py")
    print(f"minorsft benchmarks, {time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} cores, "
          f"{time.time() - started:.0f} s")
    print(f"{'measure':<22}{'variant':<18}{'value':>12}{'ratio':>8}")
    for measure, variant, value, ratio in table(precompute, train):
        print(f"{measure:<22}{variant:<18}{value:>12,.2f}{ratio:>8.3f}")
    print("ratios: stage one to hf, stage two to sft (target minorsft/sft <= 1.02 in time and memory)")


if __name__ == "__main__":
    main()
