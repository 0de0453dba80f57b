"""A small reproduction of the paper's Figure 1 on the bundled default (CPU).

    .venv/bin/python scripts/reproduce_figure1.py --output runs/repro --docs docs/reproduction

Stage one once; then, for each base learning rate X, sft at X against minorsft and
dpo_sft at 2X with beta 0.04 (the paper's pairing: sft 1e-5, the others 2e-5), all
from the same shards with the same data order; each final model is scored on the
held-out target set by stage one. Writes the figure (deviation, loss, coefficient
per step) and a markdown table of the final training deviation, target-set loss and
target-set deviation to ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minorsft_core.demo import DEFAULT_DATA, run_minorsft, target_metrics, target_scores  # noqa: E402
from minorsft_core.plot import plot_runs  # noqa: E402

BASE_LRS = (1e-5, 1e-4, 5e-4, 1e-3)
BETA = 0.04


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "runs/repro")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/reproduction")
    parser.add_argument("--epochs", type=float, default=2.0)
    args = parser.parse_args()
    output, logs = args.output.resolve(), args.output.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    shards = output / "shards"
    common = ("--config", "configs/demo/precompute.yaml", "--quiet")
    run_minorsft("precompute", *common, "--output", str(shards), log_path=logs / "precompute.log")
    run_minorsft("precompute", *common, "--engine", "hf", "--data", str(DEFAULT_DATA / "target.jsonl"),
                 "--output", str(output / "target-reference"), log_path=logs / "target-reference.log")
    reference = target_scores(output / "target-reference")

    reference_loss, _ = target_metrics(reference, reference)
    results = [{"run": "reference", "loss": "reference (step 0)", "lr": 0.0, "base_lr": None,
                "final_train_loss": None, "final_deviation": 0.0, "coef_mean_final": 1.0,
                "target_loss": reference_loss, "target_deviation": 0.0, "train_s": 0.0}]
    for base_lr in BASE_LRS:
        for loss, lr in (("sft", base_lr), ("minorsft", 2 * base_lr), ("dpo_sft", 2 * base_lr)):
            name = f"{loss}-lr{lr:g}"
            run_dir = output / name
            print(f"training {name} ...", flush=True)
            seconds = run_minorsft("train", "--config", f"configs/demo/{loss}.yaml", "--lr", str(lr), "--beta",
                                   str(BETA), "--epochs", str(args.epochs), "--data", str(shards),
                                   "--output", str(run_dir), log_path=logs / f"{name}.log")
            run_minorsft("precompute", *common, "--engine", "hf", "--model", str(run_dir / "final"), "--data",
                         str(DEFAULT_DATA / "target.jsonl"), "--output", str(output / f"target-{name}"),
                         log_path=logs / f"target-{name}.log")
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            target_loss, target_dev = target_metrics(target_scores(output / f"target-{name}"), reference)
            results.append({"run": name, "loss": loss, "lr": lr, "base_lr": base_lr,
                            "final_train_loss": metrics[-1]["loss"], "final_deviation": metrics[-1]["deviation"],
                            "coef_mean_final": metrics[-1]["coef_mean"], "target_loss": target_loss,
                            "target_deviation": target_dev, "train_s": seconds})
        plot_runs([output / r["run"] for r in results if r["base_lr"] == base_lr],
                  args.docs / f"figure1-base-lr{base_lr:g}.png",
                  title=f"bundled default: sft lr {base_lr:g} vs minorsft / dpo_sft lr {2 * base_lr:g}, beta {BETA}")
    (args.docs / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| run | lr | final train loss | final deviation (train batch) | final coef mean | target loss | "
             "target deviation |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| reference (step 0) | - | - | 0 | 1 | {reference_loss:.4f} | 0 |")
    for r in results[1:]:
        lines.append(f"| {r['loss']} | {r['lr']:g} | {r['final_train_loss']:.4f} | {r['final_deviation']:.4f} | "
                     f"{r['coef_mean_final']:.4f} | {r['target_loss']:.4f} | {r['target_deviation']:.4f} |")
    (args.docs / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
