"""The paper's math against closed forms worked out by hand (SPEC §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minorsft_core.losses import (
    deviation,
    dpo_sft_loss,
    minorsft_coef,
    minorsft_loss,
    sequence_logps,
    sft_loss,
    token_logps,
)

BETA = 0.04


def _batch(seed: int = 0):
    """Three samples: policy log-probs as leaf tensors so gradients are d loss / d logp_i."""
    torch.manual_seed(seed)
    policy = torch.tensor([-12.0, -40.0, -3.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-10.0, -55.0, -3.5], dtype=torch.float64)
    answer_len = torch.tensor([4.0, 20.0, 2.0], dtype=torch.float64)
    return policy, ref, answer_len


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_sft_loss_value_and_gradient():
    """L = (1/N) sum_i -logp_i/m_i, so dL/dlogp_i = -1/(N m_i)."""
    policy, _, answer_len = _batch()
    loss = sft_loss(policy, answer_len)
    expected = sum(-p / m for p, m in zip(policy.tolist(), answer_len.tolist(), strict=True)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-1 / (3 * m) for m in answer_len.tolist()], rel=1e-12)


def test_sft_token_normalized():
    """L = sum_i -logp_i / sum_i m_i, so dL/dlogp_i = -1/sum(m): every token weighs the same."""
    policy, _, answer_len = _batch()
    loss = sft_loss(policy, answer_len, token_normalize=True)
    assert loss.item() == pytest.approx(-sum(policy.tolist()) / 26.0, rel=1e-12)
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-1 / 26.0] * 3, rel=1e-12)
    # A global token count from the caller replaces the local one.
    assert sft_loss(policy.detach(), answer_len, token_normalize=True, normalizer=52.0).item() == pytest.approx(
        -sum(policy.tolist()) / 52.0
    )


def test_dpo_sft_loss_value_and_gradient():
    """L = (1/N) sum_i -log sigma(beta d_i); dL/dlogp_i = -(beta/N) sigma(-beta d_i)."""
    policy, ref, _ = _batch()
    loss = dpo_sft_loss(policy, ref, beta=BETA)
    deltas = [p - r for p, r in zip(policy.tolist(), ref.tolist(), strict=True)]
    expected = sum(-math.log(_sigmoid(BETA * d)) for d in deltas) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-(BETA / 3) * _sigmoid(-BETA * d) for d in deltas], rel=1e-12)


def test_minorsft_coef_closed_form():
    """w_i = 2 sigma(-beta d_i): 1 at d = 0, below 1 for d > 0, above 1 for d < 0, no gradient."""
    policy, ref, _ = _batch()
    coef = minorsft_coef(policy, ref, beta=BETA)
    deltas = [p - r for p, r in zip(policy.tolist(), ref.tolist(), strict=True)]
    assert coef.tolist() == pytest.approx([2 * _sigmoid(-BETA * d) for d in deltas], rel=1e-12)
    assert coef[0] > 1 and coef[1] < 1 and coef[2].item() == 1.0
    assert not coef.requires_grad


def test_minorsft_loss_value_and_gradient():
    """L = (1/N) sum_i w_i (-logp_i/m_i) with w_i constant; dL/dlogp_i = -(2/(N m_i)) sigma(-beta d_i)."""
    policy, ref, answer_len = _batch()
    loss = minorsft_loss(policy, ref, answer_len, beta=BETA)
    rows = list(zip(policy.tolist(), ref.tolist(), answer_len.tolist(), strict=True))
    expected = sum(2 * _sigmoid(-BETA * (p - r)) * (-p / m) for p, r, m in rows) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert policy.grad.tolist() == pytest.approx(
        [-(2 / (3 * m)) * _sigmoid(-BETA * (p - r)) for p, r, m in rows], rel=1e-12
    )


def test_minorsft_gradient_equals_log_sigmoid_form():
    """SPEC §2: minorsft has exactly the gradient of -(2/(beta m_i)) log sigma(beta d_i)."""
    policy, ref, answer_len = _batch()
    minorsft_loss(policy, ref, answer_len, beta=BETA).backward()
    weighted_grad = policy.grad.clone()
    policy.grad = None
    log_sigmoid_form = (-(2 / (BETA * answer_len)) * F.logsigmoid(BETA * (policy - ref))).mean()
    log_sigmoid_form.backward()
    torch.testing.assert_close(weighted_grad, policy.grad, rtol=1e-12, atol=0)


def test_minorsft_equals_sft_when_policy_is_reference():
    """At delta = 0, w = 1: same value and same gradient as SFT (curves comparable at step 0)."""
    policy, _, answer_len = _batch()
    ref = policy.detach().clone()
    minor = minorsft_loss(policy, ref, answer_len, beta=BETA)
    minor.backward()
    minor_grad = policy.grad.clone()
    policy.grad = None
    sft = sft_loss(policy, answer_len)
    sft.backward()
    assert minor.item() == sft.item()
    torch.testing.assert_close(minor_grad, policy.grad, rtol=0, atol=0)


def test_deviation_closed_form():
    """D = (1/N) sum_i d_i / m_i (Eq. 8)."""
    policy, ref, answer_len = _batch()
    expected = ((-12 + 10) / 4 + (-40 + 55) / 20 + 0 / 2) / 3
    assert deviation(policy, ref, answer_len).item() == pytest.approx(expected, rel=1e-12)
    assert deviation(policy, ref, answer_len, normalizer=6).item() == pytest.approx(expected / 2, rel=1e-12)


@pytest.mark.parametrize("delta", [1e4, -1e4])
def test_losses_finite_at_extreme_deltas(delta):
    policy = torch.tensor([-5.0, -5.0], dtype=torch.float32, requires_grad=True)
    ref = policy.detach() - delta
    answer_len = torch.tensor([3.0, 7.0])
    for loss in (
        minorsft_loss(policy, ref, answer_len, beta=BETA),
        dpo_sft_loss(policy, ref, beta=BETA),
        sft_loss(policy, answer_len),
    ):
        policy.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(policy.grad).all()
    coef = minorsft_coef(policy, ref, beta=BETA)
    assert torch.isfinite(coef).all() and ((coef >= 0) & (coef <= 2)).all()


def test_normalizer_splits_exactly():
    """Two halves each divided by the global N sum to the full-batch mean (what ranks do)."""
    policy, ref, answer_len = _batch()
    full = minorsft_loss(policy, ref, answer_len, beta=BETA)
    halves = minorsft_loss(policy[:2], ref[:2], answer_len[:2], beta=BETA, normalizer=3) + minorsft_loss(
        policy[2:], ref[2:], answer_len[2:], beta=BETA, normalizer=3
    )
    assert halves.item() == pytest.approx(full.item(), rel=1e-12)


# ---- sequence_logps -----------------------------------------------------------------------


def _naive_token_logps(logits, input_ids, completion_mask):
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    out[:, 1:] = picked * completion_mask[:, 1:]
    return out


def _random_inputs(batch=3, seq_len=17, vocab=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq_len, vocab, generator=gen) * 3).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    completion_mask = (torch.rand(batch, seq_len, generator=gen) > 0.4).long()
    completion_mask[:, 0] = 0
    completion_mask[1, 8:] = 0  # a padded row
    return logits, input_ids, completion_mask


@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
def test_sequence_logps_matches_naive_fp32(chunk_rows):
    logits, input_ids, completion_mask = _random_inputs()
    logits.requires_grad_(True)
    naive = _naive_token_logps(logits, input_ids, completion_mask)
    chunked = token_logps(logits, input_ids, completion_mask, chunk_rows=chunk_rows)
    torch.testing.assert_close(chunked, naive, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        sequence_logps(logits, input_ids, completion_mask, chunk_rows=chunk_rows), naive.sum(-1), atol=1e-6, rtol=0
    )
    weights = torch.randn(3)
    (grad_naive,) = torch.autograd.grad((naive.sum(-1) * weights).sum(), logits)
    (grad_chunked,) = torch.autograd.grad(
        (sequence_logps(logits, input_ids, completion_mask, chunk_rows=chunk_rows) * weights).sum(), logits
    )
    torch.testing.assert_close(grad_chunked, grad_naive, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sequence_logps_low_precision_logits_computed_in_fp32(dtype):
    """bf16/fp16 logits: the result is fp32 and equals the fp32 computation on the same
    (rounded) logits; the gradient comes back in the logits' dtype."""
    logits, input_ids, completion_mask = _random_inputs(dtype=dtype)
    logits.requires_grad_(True)
    out = sequence_logps(logits, input_ids, completion_mask, chunk_rows=5)
    assert out.dtype == torch.float32
    expected = _naive_token_logps(logits.detach().float(), input_ids, completion_mask).sum(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad.float()).all()


def test_sequence_logps_gradcheck():
    logits, input_ids, completion_mask = _random_inputs(batch=2, seq_len=6, vocab=7)
    logits = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: token_logps(x, input_ids, completion_mask, chunk_rows=3), (logits,), eps=1e-6, atol=1e-5
    )


def test_sequence_logps_rejects_answer_at_position_zero():
    logits, input_ids, completion_mask = _random_inputs()
    completion_mask[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        sequence_logps(logits, input_ids, completion_mask)


_MEMORY_PROBE = """
import resource, sys, torch
from minorsft_core.losses import sequence_logps
torch.manual_seed(0)
batch, seq_len, vocab = 1, 2048, 152064
logits = torch.randn(batch, seq_len, vocab, dtype=torch.bfloat16)
input_ids = torch.randint(0, vocab, (batch, seq_len))
completion_mask = torch.ones(batch, seq_len, dtype=torch.long)
completion_mask[:, 0] = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "naive":
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    out = (logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * completion_mask[:, 1:]).sum(-1)
else:
    out = sequence_logps(logits, input_ids, completion_mask, chunk_rows=256)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, float(out[0]))
"""


def test_sequence_logps_peak_memory_stays_below_naive():
    """A 152k vocabulary at T = 2048: the naive gather builds fp32 [B, T, V] tensors
    (1.2 GB each); the chunked version holds one fp32 [256, V] block (0.16 GB) at a
    time. Peak RSS growth of each, measured in a fresh process."""
    import subprocess
    import sys

    def run(mode: str) -> tuple[int, float]:
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode], capture_output=True, text=True, check=True)
        grown, value = out.stdout.split()
        return int(grown), float(value)

    naive_bytes, naive_value = run("naive")
    chunked_bytes, chunked_value = run("chunked")
    full_fp32_bytes = 2048 * 152064 * 4
    assert naive_bytes >= full_fp32_bytes, naive_bytes  # the probe does see the naive tensors
    assert chunked_bytes < full_fp32_bytes / 3, (chunked_bytes, naive_bytes)
    assert chunked_value == pytest.approx(naive_value, rel=1e-5)
