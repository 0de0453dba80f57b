"""The paper's Figure 1 on a real pretrained chat model: SmolLM2-135M-Instruct, CPU, fp32.

    .venv/bin/python scripts/reproduce_figure1_smollm2.py --output runs/repro-smollm2 \\
        --docs docs/reproduction/smollm2

Reference and starting policy: SmolLM2-135M-Instruct (``scripts/fetch_smollm2.py``).
Training data: the bundled tasks (``data/default/train.jsonl``: arithmetic, sorting,
reversing, counting..., which the model does not already do well). Held out:

- target: ``data/default/target.jsonl``, the same tasks (does the model learn them);
- general: ``data/general/chat.jsonl``, everyday chat prompts
  (``data/general/prompts.jsonl``) with the reference's own greedy answers, generated
  once by this script when the file is missing and saved (how far training moves the
  model on what it already did).

Stage one scores the training set once with vLLM; for each base learning rate X,
stage two (DeepSpeed ZeRO-3, one rank) trains sft at X, minorsft and dpo_sft at 2X
with beta 0.04 (the paper's pairing) and minorsft at X (equal lr), all from the same
shards with the same data order; each final model is scored on both held-out sets
with the hf engine. Both stages run in fp32: bf16 on this CPU is many times slower.
Writes ``table.md``, ``results.json`` and one figure per X (deviation, loss and mean
coefficient per step) to ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from fetch_smollm2 import default_dir, fetch  # noqa: E402

from minorsft_core.demo import DEFAULT_DATA, run_minorsft, target_metrics, target_scores  # noqa: E402
from minorsft_core.plot import plot_runs  # noqa: E402

GENERAL = REPO / "data" / "general"
BASE_LRS = (1e-5, 5e-5)
BETA = 0.04
HELD_OUT = {"target": DEFAULT_DATA / "target.jsonl", "general": GENERAL / "chat.jsonl"}


def write_general_set(model: Path, prompts: Path, output: Path, max_new_tokens: int = 64) -> None:
    """The reference's own greedy answers to everyday prompts, as chat records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    records = []
    for line in prompts.read_text().splitlines():
        row = json.loads(line)
        messages = [{"role": "user", "content": row["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = policy.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        records.append({"id": row["id"], "messages": [*messages, {"role": "assistant", "content": answer}]})
    output.write_text("".join(json.dumps(record) + "\n" for record in records))


def score(model: Path, data: Path, output: Path, logs: Path) -> dict:
    run_minorsft("precompute", "--model", str(model), "--data", str(data), "--output", str(output), "--engine", "hf",
                 "--dtype", "float32", "--max-seq-len", "512", "--quiet", log_path=logs / f"{output.name}.log")
    return target_scores(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "runs/repro-smollm2")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/reproduction/smollm2")
    parser.add_argument("--model", type=Path, default=None, help="SmolLM2 directory (default: fetch into the cache)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--base-lrs", type=float, nargs="+", default=BASE_LRS)
    args = parser.parse_args()
    started = time.perf_counter()
    output, logs = args.output.resolve(), args.output.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    model = args.model or fetch(default_dir())
    if not HELD_OUT["general"].exists():
        print(f"generating the reference's answers to {GENERAL / 'prompts.jsonl'} ...", flush=True)
        write_general_set(model, GENERAL / "prompts.jsonl", HELD_OUT["general"])

    shards = output / "shards"
    run_minorsft("precompute", "--model", str(model), "--data", str(DEFAULT_DATA / "train.jsonl"), "--output",
                 str(shards), "--engine", "vllm", "--dtype", "float32", "--max-seq-len", "512", "--enforce-eager",
                 "--quiet", log_path=logs / "precompute.log")
    reference = {name: score(model, path, output / f"{name}-reference", logs) for name, path in HELD_OUT.items()}
    reference_loss = {name: target_metrics(scores, scores)[0] for name, scores in reference.items()}

    results = []
    for base_lr in args.base_lrs:
        runs = [("sft", base_lr), ("minorsft", 2 * base_lr), ("dpo_sft", 2 * base_lr), ("minorsft", base_lr)]
        for loss, lr in runs:
            name = f"{loss}-lr{lr:g}"
            run_dir = output / name
            print(f"training {name} ...", flush=True)
            train_s = run_minorsft("train", "--model", str(model), "--data", str(shards), "--output", str(run_dir),
                                   "--loss", loss, "--lr", str(lr), "--beta", str(BETA), "--epochs", str(args.epochs),
                                   "--global-batch-size", "16", "--micro-batch-size", "8", "--dtype", "float32",
                                   # ZeRO-3 as published in docs/reproduction (one rank now defaults to 2)
                                   "--save-steps", "1000000", "--seed", "0", "--zero-stage", "3",
                                   log_path=logs / f"{name}.log")
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            row = {"run": name, "loss": loss, "lr": lr, "base_lr": base_lr, "steps": metrics[-1]["step"],
                   "final_deviation": metrics[-1]["deviation"],
                   "mean_deviation": sum(m["deviation"] for m in metrics) / len(metrics),
                   "coef_mean_final": metrics[-1]["coef_mean"]}
            for held_out, path in HELD_OUT.items():
                scores = score(run_dir / "final", path, output / f"{held_out}-{name}", logs)
                held_loss, held_dev = target_metrics(scores, reference[held_out])
                row[f"{held_out}_loss"], row[f"{held_out}_deviation"] = held_loss, held_dev
            results.append(row)
            print(json.dumps(row), f"(trained in {train_s:.0f} s)", flush=True)
        plot_runs([output / r["run"] for r in results if r["base_lr"] == base_lr],
                  args.docs / f"figure1-smollm2-base-lr{base_lr:g}.png",
                  title=f"SmolLM2-135M-Instruct: sft lr {base_lr:g}, minorsft / dpo_sft lr {2 * base_lr:g} "
                        f"and minorsft lr {base_lr:g}, beta {BETA}")
    (args.docs / "results.json").write_text(json.dumps({"reference_loss": reference_loss, "runs": results},
                                                       indent=2) + "\n")
    lines = ["| run | lr | target loss | deviation, train batches (final / mean) | general deviation | "
             "general loss | final coef mean |", "|---|---|---|---|---|---|---|",
             f"| reference | - | {reference_loss['target']:.4f} | 0 | 0 | {reference_loss['general']:.4f} | 1 |"]
    for r in results:
        lines.append(f"| {r['loss']} | {r['lr']:g} | {r['target_loss']:.4f} | {r['final_deviation']:.4f} / "
                     f"{r['mean_deviation']:.4f} | {r['general_deviation']:.4f} | {r['general_loss']:.4f} | "
                     f"{r['coef_mean_final']:.4f} |")
    (args.docs / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
