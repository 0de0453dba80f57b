"""The transformers scoring engine: log-probs through the core's ``AnswerLogps``, the
same head the trainer scores the policy with, so the stages agree by construction.

It runs on CUDA when present, else CPU. Samples are sorted by length and packed
into right-padded batches of at most ``max_batch_tokens`` padded tokens, so padding
is small. With a standard output head (``--logp-head auto``) only answer positions
are projected onto the vocabulary, a chunk at a time; with ``--logp-head logits`` the
``[B, T, V]`` logits are ``max_batch_tokens * vocab * bytes(dtype)`` (16k tokens *
152k * 2 B = 5 GB in bf16).
"""

from __future__ import annotations

import numpy as np

from minorsft_core.data import Sample
from precompute.engines import Progress, Scores, engine_version


def length_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, each with
    ``len(batch) * max(lengths in batch) <= max_batch_tokens`` (a sample longer than
    the bound gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a batch's first sample sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HfEngine:
    name = "hf"

    def __init__(self, model_dir: str, *, dtype: str, max_batch_tokens: int, trust_remote_code: bool,
                 logp_head: str):
        import torch
        from transformers import AutoModelForCausalLM

        from minorsft_core.logp_head import AnswerLogps

        self.version = engine_version("hf")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.max_batch_tokens = max_batch_tokens
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        self.model = AnswerLogps(model.to(self.device).eval(), head=logp_head)
        self.pad_id = model.config.pad_token_id or 0  # masked out; any valid id does

    def score(self, samples: list[Sample], progress: Progress) -> Scores:
        import torch

        sums = np.empty(len(samples), dtype=np.float64)
        answers: list[np.ndarray] = [np.empty(0, np.float32)] * len(samples)
        for batch in length_batches([len(s.input_ids) for s in samples], self.max_batch_tokens):
            width = len(samples[batch[0]].input_ids)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(samples[i].input_ids)
                ids[row, :n] = torch.tensor(samples[i].input_ids)
                mask[row, :n] = torch.tensor(samples[i].completion_mask)
                attention[row, :n] = 1
            ids, mask, attention = ids.to(self.device), mask.to(self.device), attention.to(self.device)
            with torch.inference_mode():
                per_token = self.model.token_logps(ids, attention, mask).cpu()
            for row, i in enumerate(batch):
                answer = per_token[row][mask[row].bool().cpu()].numpy()
                answers[i] = answer
                sums[i] = answer.sum(dtype=np.float64)
            progress(len(batch), int(attention.sum()))
        return Scores(sums, answers)

    def close(self) -> None:
        del self.model
