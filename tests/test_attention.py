"""``minorsft_core.attention``: the ``varlen`` attention of packed rows. Its numerics in a
real model are in test_logp_head (packed = padded, with a negative control) and, for the
CUDA kernel, in test_gpu."""

from __future__ import annotations

import pytest
import torch

from minorsft_core import attention


def test_boundaries_come_from_restarting_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 4]])
    bounds, longest = attention.boundaries_from_position_ids(position_ids)
    assert bounds.dtype == torch.int32 and bounds.tolist() == [0, 3, 4, 9] and longest == 5
    with pytest.raises(ValueError, match="must start at 0"):
        attention.boundaries_from_position_ids(torch.tensor([[3, 4, 0, 1]]))


@pytest.mark.parametrize(("asked", "packing", "loaded"), [
    ("auto", True, "varlen"), ("auto", False, "sdpa"), ("sdpa", True, "sdpa"), ("eager", False, "eager"),
    ("flash_attention_2", True, "flash_attention_2"), ("varlen", False, "varlen")])
def test_auto_is_varlen_for_packed_rows_and_sdpa_for_padded_batches(asked, packing, loaded):
    assert attention.resolve(asked, packing=packing) == loaded


def test_per_sample_sdpa_with_gqa_equals_each_sample_alone():
    """The CPU path: each sample's output is causal attention over itself only (GQA heads
    read kv head h // group), whatever its neighbours in the row."""
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=gen) for h in (4, 2, 2))
    bounds = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    out = attention._per_sample_sdpa(q, k, v, bounds, 8 ** -0.5)
    for start, stop in ((0, 5), (5, 6), (6, 15)):
        qs = q[start:stop].transpose(0, 1)
        ks, vs = (t[start:stop].transpose(0, 1).repeat_interleave(2, dim=0) for t in (k, v))
        scores = qs @ ks.transpose(1, 2) * 8 ** -0.5
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -float("inf"))
        torch.testing.assert_close(out[start:stop], (scores.softmax(-1) @ vs).transpose(0, 1))


def test_sliding_window_is_refused_not_ignored():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    attention.register()
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                         layer_types=["sliding_attention"], attn_implementation="varlen")
    model = Qwen2ForCausalLM(config)
    with pytest.raises(NotImplementedError, match="sliding window"):
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]]), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
