"""The MinorSFT paper's math as pure tensor functions (Xie et al. 2024, arXiv 2408.10642).

Everything here is a function of tensors only: no distributed calls, no config, no
model. Distributed bookkeeping (how many samples or tokens the *global* batch holds)
is the caller's, passed in through ``normalizer``; by default each loss is the mean
over the samples it is given.

Notation (SPEC §2), for sample i with answer y_i of m_i tokens:

    policy_logps[i] = logp_i     = sum_t log pi_theta(y_{i,t} | x_i, y_{i,<t})
    ref_logp_sum[i] = ref_logp_i = the same under the frozen reference (precomputed)
    delta_i = logp_i - ref_logp_i,   answer_len[i] = m_i

Shapes: ``[B]`` for per-sample vectors, ``[B, T]`` for token grids, ``[B, T, V]``
for logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of fp32 [rows, V] materialised at once by ``token_logps``. 1024 rows of a
# 152k vocabulary are 0.6 GB of fp32, against 2.5 GB for one full 4096-token sample.
DEFAULT_CHUNK_ROWS = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or wider when the logits already are (float64 in gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


class _SelectedTokenLogps(torch.autograd.Function):
    """log_softmax(logits2d[rows])[targets] for a list of rows, chunked.

    Forward and backward both walk the rows ``chunk_rows`` at a time, so neither
    ever holds more than one fp32 ``[chunk_rows, V]`` block; nothing fp32 is saved
    for backward (the softmax is recomputed), only the caller's logits.
    """

    @staticmethod
    def forward(ctx, logits2d, rows, targets, chunk_rows):
        compute_dtype = _compute_dtype(logits2d.dtype)
        out = torch.empty(rows.numel(), dtype=compute_dtype, device=logits2d.device)
        for start in range(0, rows.numel(), chunk_rows):
            stop = start + chunk_rows
            block = logits2d[rows[start:stop]].to(compute_dtype)
            picked = block.gather(1, targets[start:stop, None]).squeeze(1)
            out[start:stop] = picked - torch.logsumexp(block, dim=-1)
        ctx.save_for_backward(logits2d, rows, targets)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits2d, rows, targets = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits2d)
        # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z)
        for start in range(0, rows.numel(), ctx.chunk_rows):
            stop = start + ctx.chunk_rows
            block = logits2d[rows[start:stop]].to(grad_out.dtype)
            g = grad_out[start:stop, None]
            block_grad = torch.softmax(block, dim=-1).mul_(-g)
            block_grad.scatter_add_(1, targets[start:stop, None], g)
            grad_logits[rows[start:stop]] = block_grad.to(grad_logits.dtype)
        return grad_logits, None, None, None


def _answer_positions(input_ids: torch.Tensor, completion_mask: torch.Tensor, answer_index: torch.Tensor | None):
    """``(batch indices, time indices)`` of the answer tokens, checked; from
    ``answer_index`` when given (no ``nonzero`` on the device: no sync)."""
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} must match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if answer_index is not None:
        seq_len = input_ids.shape[1]
        return answer_index // seq_len, answer_index % seq_len
    answer = completion_mask.bool()
    if input_ids.shape[1] and answer[:, 0].any():
        raise ValueError("completion_mask[:, 0] must be 0: position 0 has no predicting logit")
    return answer.nonzero(as_tuple=True)


def _on_grid(picked: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, shape) -> torch.Tensor:
    """The answer tokens' values ``picked`` placed on a zero ``[B, T]`` grid (differentiable)."""
    batch, seq_len = shape
    flat = torch.zeros(batch * seq_len, dtype=picked.dtype, device=picked.device)
    return flat.index_put((b_idx * seq_len + t_idx,), picked).view(batch, seq_len)


def token_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    answer_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token answer log-probs, fp32 (fp64 for fp64 logits), ``[B, T]``; 0 off the answer.

    Token ``input_ids[b, t]`` is predicted by ``logits[b, t - 1]``, so position 0 can
    never be an answer token. The log-softmax is taken in fp32 whatever the dtype of
    ``logits``, only over answer positions, ``chunk_rows`` rows at a time: a full
    fp32 ``[B, T, V]`` tensor is never built (a 152k vocabulary at T = 4096 would be
    2.5 GB per sample).

    Args:
        logits: ``[B, T, V]`` in any float dtype.
        input_ids: ``[B, T]`` integer token ids.
        completion_mask: ``[B, T]``, nonzero at answer tokens.
        answer_index: optional ``[A]`` flat positions ``b * T + t`` of the answer tokens
            (``completion_mask.flatten().nonzero()``), made on the host with the batch
            (``batching``): on a GPU it spares a device sync. Trusted, not re-checked.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and input_ids [B, T], got {tuple(logits.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    batch, seq_len, vocab = logits.shape
    b_idx, t_idx = _answer_positions(input_ids, completion_mask, answer_index)
    # Row of the logit that predicts token t is t - 1, in the flattened [B*T, V] view.
    rows = b_idx * seq_len + (t_idx - 1)
    targets = input_ids[b_idx, t_idx].long()
    picked = _SelectedTokenLogps.apply(logits.reshape(-1, vocab), rows, targets, chunk_rows)
    return _on_grid(picked, b_idx, t_idx, input_ids.shape)


def sequence_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Summed answer log-prob per sample, logp_i of SPEC §2, fp32 ``[B]``.

    The same function scores the reference in stage one (HF engine) and the policy in
    stage two, so the two stages agree by construction. See ``token_logps``.
    """
    return token_logps(logits, input_ids, completion_mask, chunk_rows=chunk_rows).sum(-1)


# Answer rows projected onto the vocabulary at once by the hidden-state head: one fp32
# [rows, V] block of a 152k vocabulary is 156 MB at 256 rows, whatever T is.
DEFAULT_HEAD_CHUNK_ROWS = 256


class _HiddenTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[targets] for answer rows, chunked.

    Neither pass holds more than one ``[chunk_rows, V]`` block of logits: forward keeps
    only the per-row log-probs, backward recomputes each block's softmax. The projection
    runs in the weight's dtype (as the model's own output head would, and as vLLM does),
    the log-softmax and the weight-gradient accumulation in fp32 (``_compute_dtype``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        compute_dtype = _compute_dtype(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=compute_dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = start + chunk_rows
            block = F.linear(hidden[start:stop], weight, bias).to(compute_dtype)
            picked = block.gather(1, targets[start:stop, None]).squeeze(1)
            out[start:stop] = picked - torch.logsumexp(block, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        compute_dtype = _compute_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=compute_dtype, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            stop = start + ctx.chunk_rows
            rows = hidden[start:stop]
            g = grad_out[start:stop, None].to(compute_dtype)
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z), times the upstream gradient
            block_grad = torch.softmax(F.linear(rows, weight, bias).to(compute_dtype), dim=-1).mul_(-g)
            block_grad.scatter_add_(1, targets[start:stop, None], g)
            if grad_hidden is not None:
                grad_hidden[start:stop] = (block_grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(block_grad.T, rows.to(compute_dtype))
            if grad_bias is not None:
                grad_bias += block_grad.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def token_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_HEAD_CHUNK_ROWS,
    answer_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token answer log-probs from the final hidden states, fp32 ``[B, T]``; 0 off the answer.

    The same values as ``token_logps(hidden @ lm_head_weight.T + lm_head_bias, ...)``
    without ever building ``[B, T, V]`` logits: the answer positions are selected
    first (hidden state ``t - 1`` predicts token ``t``), then the output projection and
    the log-softmax run ``chunk_rows`` rows at a time and are recomputed in backward.
    Memory is one ``[chunk_rows, V]`` block plus the ``[V, H]`` fp32 weight gradient,
    whatever ``T`` is. Gradients flow to ``hidden``, the weight and the bias.

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the model's last norm), any float dtype.
        lm_head_weight: ``[V, H]`` output projection (the embedding matrix if tied).
        input_ids: ``[B, T]`` integer token ids.
        completion_mask: ``[B, T]``, nonzero at answer tokens.
        lm_head_bias: ``[V]``, if the head has one.
        answer_index: optional ``[A]`` answer positions, as ``token_logps`` takes them.
    """
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, T, H] and input_ids [B, T], got {tuple(hidden.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    b_idx, t_idx = _answer_positions(input_ids, completion_mask, answer_index)
    targets = input_ids[b_idx, t_idx].long()
    picked = _HiddenTokenLogps.apply(hidden[b_idx, t_idx - 1], lm_head_weight, lm_head_bias, targets, chunk_rows)
    return _on_grid(picked, b_idx, t_idx, input_ids.shape)


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_HEAD_CHUNK_ROWS,
) -> torch.Tensor:
    """Summed answer log-prob per sample from final hidden states, fp32 ``[B]``.

    ``sequence_logps`` for trainers that can hand over the hidden states and the
    output head instead of logits; see ``token_logps_from_hidden``.
    """
    return token_logps_from_hidden(
        hidden, lm_head_weight, input_ids, completion_mask, lm_head_bias=lm_head_bias, chunk_rows=chunk_rows
    ).sum(-1)


def packed_sums(token_logps: torch.Tensor, sample_lengths: torch.Tensor) -> torch.Tensor:
    """Per-sample sums ``[B]`` of a packed row's per-token values ``[N]``, the samples
    lying end to end with ``sample_lengths [B]`` tokens each (``N = sum``): logp_i of
    SPEC §2 when every sample sits in its own row. Differentiable."""
    sample_of_token = torch.repeat_interleave(
        torch.arange(len(sample_lengths), device=token_logps.device), sample_lengths.to(token_logps.device),
        output_size=token_logps.shape[0])
    return token_logps.new_zeros(len(sample_lengths)).index_add(0, sample_of_token, token_logps)


def _reduce(per_sample: torch.Tensor, normalizer) -> torch.Tensor:
    """Sum over samples divided by ``normalizer`` (default: the number of samples)."""
    if normalizer is None:
        normalizer = per_sample.numel()
    return per_sample.sum() / normalizer


def sft_loss(
    policy_logps: torch.Tensor,
    answer_len: torch.Tensor,
    *,
    token_normalize: bool = False,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain SFT, Eq. 5 of the paper: mean_i of -logp_i / m_i.

    With ``token_normalize=True`` it is the HF / LLaMA-Factory convention instead:
    sum_i -logp_i / sum_i m_i (each token weighs the same, long answers weigh more).

    Args:
        policy_logps: ``[B]`` summed answer log-probs (with gradient).
        answer_len: ``[B]`` answer token counts m_i.
        normalizer: what the summed loss is divided by. Default: ``B`` samples, or the
            ``sum(answer_len)`` tokens with ``token_normalize``. Pass the *global*
            count when the batch is split across micro-batches or ranks.

    Gradient per sample: -(1/m_i) d logp_i / N (per-sample form).
    """
    if token_normalize:
        if normalizer is None:
            normalizer = answer_len.sum()
        return -policy_logps.sum() / normalizer
    return _reduce(-policy_logps / answer_len, normalizer)


def dpo_sft_loss(
    policy_logps: torch.Tensor,
    ref_logp_sum: torch.Tensor,
    *,
    beta: float,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """"SFT using DPO", Eq. 3 of the paper: mean_i of -log sigmoid(beta * delta_i).

    This is DPO with the rejected term removed. Its gradient per sample is
    -beta * sigmoid(-beta * delta_i) * d logp_i / N: not length-normalised, so
    long answers dominate. (TorchRL's ``minor_sft`` is this loss, not Eq. 7.)
    """
    delta = policy_logps - ref_logp_sum
    return _reduce(-F.logsigmoid(beta * delta), normalizer)


def minorsft_coef(
    policy_logps: torch.Tensor, ref_logp_sum: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """The MinorSFT dynamic coefficient of Eq. 7, ``[B]``: w_i = 2 * sigmoid(-beta * delta_i).

    w_i = 1 when the policy equals the reference; it falls below 1 for samples the
    policy already rates higher than the reference did (delta_i > 0) and rises
    towards 2 for samples it rates lower. Returned detached: Eq. 7 treats it as a
    constant.
    """
    delta = (policy_logps - ref_logp_sum).detach()
    return 2.0 * torch.sigmoid(-beta * delta)


def minorsft_loss(
    policy_logps: torch.Tensor,
    ref_logp_sum: torch.Tensor,
    answer_len: torch.Tensor,
    *,
    beta: float,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """MinorSFT, Eq. 7 of the paper: mean_i of w_i * (-logp_i / m_i), w_i held constant.

    Gradient per sample: -(2 / m_i) * sigmoid(-beta * delta_i) * d logp_i / N, exactly
    the gradient of -(2 / (beta * m_i)) * log sigmoid(beta * delta_i). The weighted form
    is used because its *value* equals ``sft_loss`` while the policy equals the
    reference (w_i = 1), so loss curves of the two are comparable.
    """
    coef = minorsft_coef(policy_logps, ref_logp_sum, beta=beta)
    return _reduce(coef * (-policy_logps / answer_len), normalizer)


def deviation(
    policy_logps: torch.Tensor,
    ref_logp_sum: torch.Tensor,
    answer_len: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Deviation from the reference, Eq. 8: D = mean_i delta_i / m_i (nats per answer token).

    The DPO implicit reward divided by beta and by answer length. Returned detached:
    a metric, never a loss term.
    """
    delta = (policy_logps - ref_logp_sum).detach()
    return _reduce(delta / answer_len, normalizer)
