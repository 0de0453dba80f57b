"""Run by tests/test_trl.py under torchrun: MinorSFTTrainer with the settings of
``test_trl._config``, on the launched ranks (DDP over gloo on CPU) or, given a DeepSpeed
JSON, under DeepSpeed; rank 0 writes the step logs, every rank the model (a collective).

    torchrun --nproc_per_node R tests/trl_ranks.py DATA MODEL OUTPUT MICRO ACCUMULATION [DEEPSPEED_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# What pytest's `pythonpath` gives the tests: this file runs under torchrun, outside pytest.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "data")]

from test_trl import _trainer  # noqa: E402


def main(data: str, model: str, output: str, micro: str, accumulation: str, deepspeed: str | None = None) -> None:
    # Without use_cpu transformers runs each CPU rank alone (DistributedType.NO); with
    # DeepSpeed, use_cpu would bypass DeepSpeed, whose CPU accelerator DS_ACCELERATOR names.
    launch = {"deepspeed": deepspeed} if deepspeed else {"use_cpu": True}
    trainer = _trainer(model, Path(data), Path(output), per_device_train_batch_size=int(micro),
                       gradient_accumulation_steps=int(accumulation), drift_tolerance=100, coef_tolerance=1, **launch)
    trainer.train()
    trainer.save_model(str(Path(output) / "final"))
    if trainer.is_world_process_zero():
        (Path(output) / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main(*sys.argv[1:])
