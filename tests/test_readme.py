"""The README's library example runs as written, on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_losses_example_runs(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from minorsft_core.data import SampleRenderer
    from minorsft_core.losses import sequence_logps

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python example"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    renderer = SampleRenderer(tiny_tokenizer, data_format="prompt_completion")
    samples = [renderer.render(k, {"prompt": "why", "completion": "because " * (k + 1)}) for k in range(3)]
    width = max(len(s.input_ids) for s in samples)

    def padded(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values])

    batch = {
        "input_ids": padded([s.input_ids for s in samples], tiny_tokenizer.pad_token_id),
        "attention_mask": padded([[1] * len(s.input_ids) for s in samples], 0),
        "completion_mask": padded([s.completion_mask for s in samples], 0),
        "answer_len": torch.tensor([float(s.answer_len) for s in samples]),
    }
    with torch.no_grad():  # the reference is the same model: delta = 0, so w = 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch["ref_logp_sum"] = sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).double()
    namespace = {"model": model, "batch": batch}
    exec(blocks[0], namespace)
    assert abs(namespace["drift"].item()) < 1e-6
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
