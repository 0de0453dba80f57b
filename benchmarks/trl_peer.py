"""TRL's ``SFTTrainer`` as ``bench_train.py``'s peer: the same model trained on the same
stage-one shards' token ids (``completion_only_loss``: the answer tokens only), with the
same global batch, micro-batch, step count and optimizer settings, in one process.
Prints one JSON line: per optimizer step its seconds, real tokens and padding fraction,
the peak memory (RSS on CPU, CUDA peak allocated on GPU) and the dtype the weights were
trained in.

In bf16 the model is loaded in bf16 (weights and Adam moments in bf16, 8 bytes per
parameter) unless ``--amp``: fp32 weights under bf16 autocast (16 bytes per parameter),
the same precision scheme as DeepSpeed's bf16 with its fp32 master weights.

    .venv/bin/python benchmarks/trl_peer.py --model M --data SHARDS --output OUT [--padding-free] \
        [--dtype bfloat16 [--amp]] [--print-micro-batches]

Needs the ``trl`` extra. Not a test fixture and not part of minorsft: a benchmark peer.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class _StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class CountingSFTTrainer(SFTTrainer):
    """Counts each optimizer step's real and padded tokens as the micro-batches pass."""

    def __init__(self, *args, print_micro_batches: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.print_micro_batches = print_micro_batches
        self.real_tokens, self.grid_tokens = [0], [0]
        self.clock = _StepClock()
        self.add_callback(self.clock)
        self.add_callback(_NextStep(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.real_tokens[-1] += int(mask.sum()) if mask is not None else ids.numel()  # padding-free: no padding
        self.grid_tokens[-1] += ids.numel()
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.print_micro_batches:
            print(f"micro-batch {tuple(ids.shape)}: {time.perf_counter() - started:.3f} s", file=sys.stderr)
        return loss


class _NextStep(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.real_tokens.append(0)
        self.trainer.grid_tokens.append(0)


def load_dataset(shards: Path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p, columns=["input_ids", "completion_mask"])
                              for p in sorted(shards.glob("shard-*.parquet"))])
    return datasets.Dataset(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="stage-one output directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="as transformers takes it, or varlen (minorsft_core.attention: the same kernel ours uses)")
    parser.add_argument("--padding-free", action="store_true", help="TRL's padding-free batches (no packing)")
    parser.add_argument("--amp", action="store_true",
                        help="with --dtype bfloat16: load fp32 weights and train under bf16 autocast (the Trainer's "
                             "mixed precision: fp32 weights, gradients and Adam moments, as DeepSpeed's bf16 keeps "
                             "fp32 master weights), instead of a model loaded in bf16")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--print-micro-batches", action="store_true",
                        help="print each micro-batch's shape and forward+backward seconds to stderr")
    args = parser.parse_args()
    if args.amp and args.dtype != "bfloat16":
        parser.error("--amp is bf16 autocast over fp32 weights: give --dtype bfloat16")

    on_gpu = torch.cuda.is_available()
    if args.attn_implementation == "varlen":
        from minorsft_core import attention

        attention.register()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    weights_dtype = torch.float32 if args.amp else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=weights_dtype,
                                                 attn_implementation=args.attn_implementation)
    config = SFTConfig(
        output_dir=args.output, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=math.ceil(0.1 * args.steps),
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=args.dtype == "bfloat16",
        use_cpu=not on_gpu, seed=args.seed, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, max_length=None, padding_free=args.padding_free,
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL's default is on; minorsft train's is off (--gradient-checkpointing)
    )
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=load_dataset(Path(args.data)),
                                 processing_class=tokenizer, print_micro_batches=args.print_micro_batches)
    trainer.train()
    ends = [trainer.clock.started, *trainer.clock.ends]
    steps = [{"seconds": b - a, "tokens": real, "padding_fraction": 1 - real / grid}
             for a, b, real, grid in zip(ends, ends[1:], trainer.real_tokens, trainer.grid_tokens, strict=False)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(json.dumps({"steps": steps, "peak_mib": peak, "weights_dtype": str(next(model.parameters()).dtype)}))


if __name__ == "__main__":
    main()
