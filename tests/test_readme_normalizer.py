"""The README's advice for `normalizer=` under gradient accumulation, followed as written:
2 micro-batches of 2 samples, each loss divided by the accumulation steps as DeepSpeed's
`engine.backward` and HF `Trainer` do, must give the full batch's mean gradient."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from minorsft_core.losses import minorsft_loss, sequence_logps

README = Path(__file__).resolve().parents[1] / "README.md"


def _advice() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "normalizer =" in b]
    assert len(blocks) == 1, "README lost its normalizer example"
    return blocks[0]


def _batch(tiny_tokenizer):
    from minorsft_core.data import SampleRenderer

    renderer = SampleRenderer(tiny_tokenizer, data_format="prompt_completion")
    samples = [renderer.render(k, {"prompt": "why " * (k + 1), "completion": "because " * (2 * k + 1)})
               for k in range(4)]
    width = max(len(s.input_ids) for s in samples)

    def padded(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values])

    return {
        "input_ids": padded([s.input_ids for s in samples], tiny_tokenizer.pad_token_id),
        "attention_mask": padded([[1] * len(s.input_ids) for s in samples], 0),
        "completion_mask": padded([s.completion_mask for s in samples], 0),
        "answer_len": torch.tensor([float(s.answer_len) for s in samples]),
    }


def _grad(model) -> torch.Tensor:
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return grad


def test_readme_normalizer_under_accumulation_gives_the_global_mean_gradient(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = _batch(tiny_tokenizer)

    def policy_logps(rows):
        logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
        return sequence_logps(logits, batch["input_ids"][rows], batch["completion_mask"][rows])

    with torch.no_grad():  # a reference the policy has moved away from, by different amounts: w_i != 1
        batch["ref_logp_sum"] = policy_logps(slice(None)).double() + torch.tensor([-30.0, -8.0, 6.0, 25.0],
                                                                                  dtype=torch.float64)
    # The global batch in one piece: the mean over its 4 samples.
    minorsft_loss(policy_logps(slice(None)), batch["ref_logp_sum"], batch["answer_len"], beta=0.04).backward()
    full = _grad(model)

    def accumulate(advice: str) -> torch.Tensor:
        accumulation_steps = 2
        for rows in (slice(0, 2), slice(2, 4)):
            micro = {key: value[rows] for key, value in batch.items()}
            namespace = {"minorsft_loss": minorsft_loss, "policy_logps": policy_logps(rows), "batch": micro,
                         "count": 4, "accumulation_steps": accumulation_steps, "world_size": 1}
            exec(advice, namespace)
            (namespace["loss"] / accumulation_steps).backward()  # what the trainer does with it
        return _grad(model)

    torch.testing.assert_close(accumulate(_advice()), full, rtol=1e-5, atol=1e-7)
    # The advice the README used to give (normalizer = count) is A = 2 times too small.
    old = _advice().replace("count / (accumulation_steps * world_size)", "count")
    torch.testing.assert_close(accumulate(old), full / 2, rtol=1e-5, atol=1e-7)
