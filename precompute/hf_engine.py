"""The transformers scoring engine: log-probs through the core's ``AnswerLogps``, the
same head the trainer scores the policy with, so the stages agree by construction.

It runs on CUDA when present, else CPU. Samples are sorted by length and grouped into
batches of at most ``max_batch_tokens`` tokens: right-padded grids (the bound counts
the padding), or with ``--packing`` one padding-free row per batch
(``minorsft_core.batching``, as ``minorsft train --packing``). Packing pays off where
attention runs per sample (flash-attention's varlen kernel); sdpa attends over the whole
row under a block-diagonal mask, so its attention cost grows with the row, not the
sample. With a standard output head (``--logp-head auto``) only answer positions
are projected onto the vocabulary, a chunk at a time; with ``--logp-head logits`` the
``[B, T, V]`` logits are ``max_batch_tokens * vocab * bytes(dtype)`` (16k tokens *
152k * 2 B = 5 GB in bf16).
"""

from __future__ import annotations

import numpy as np

from minorsft_core.batching import pack, pad_right, token_budget_groups
from minorsft_core.data import Sample
from precompute.engines import Progress, Scores, engine_version


def length_batches(lengths: list[int], max_batch_tokens: int, *, packed: bool = False) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, each within
    ``max_batch_tokens``: ``len(batch) * max(lengths)`` padded, ``sum(lengths)`` packed
    (a sample longer than the bound gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups = token_budget_groups([lengths[i] for i in order], max_batch_tokens, packed=packed)
    return [[order[k] for k in group] for group in groups]


class HfEngine:
    name = "hf"

    def __init__(self, model_dir: str, *, dtype: str, max_batch_tokens: int, trust_remote_code: bool,
                 logp_head: str = "auto", packing: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from minorsft_core import attention
        from minorsft_core.logp_head import AnswerLogps

        self.version = engine_version("hf")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.max_batch_tokens = max_batch_tokens
        self.packing = packing
        attention.register()
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=attention.resolve("auto", packing=packing),
        )
        self.model = AnswerLogps(model.to(self.device).eval(), head=logp_head)
        self.pad_id = model.config.pad_token_id or 0  # masked out; any valid id does

    def score(self, samples: list[Sample], progress: Progress) -> Scores:
        import torch

        sums = np.empty(len(samples), dtype=np.float64)
        answers: list[np.ndarray] = [np.empty(0, np.float32)] * len(samples)
        for batch in length_batches([len(s.input_ids) for s in samples], self.max_batch_tokens, packed=self.packing):
            ids = [samples[i].input_ids for i in batch]
            masks = [samples[i].completion_mask for i in batch]
            inputs = pack(ids, masks) if self.packing else pad_right(ids, masks, self.pad_id)
            on_device = inputs.to(self.device)
            with torch.inference_mode():
                per_token = self.model.token_logps(**on_device.as_kwargs()).cpu()
            # One row per sample: the packed row cut at the samples' ends, or the padded grid's rows.
            rows = per_token[0].split([len(t) for t in ids]) if self.packing else per_token
            for row, i, mask in zip(rows, batch, masks, strict=True):
                answer = row[:len(mask)][torch.as_tensor(mask, dtype=torch.bool)].numpy()
                answers[i] = answer
                sums[i] = answer.sum(dtype=np.float64)
            progress(len(batch), sum(len(t) for t in ids))
        return Scores(sums, answers)

    def close(self) -> None:
        del self.model
