"""The hidden-state answer log-prob head (``losses.token_logps_from_hidden`` and
``logp_head.AnswerLogps``) against the full-logits path it replaces."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minorsft_core.logp_head import AnswerLogps, output_head
from minorsft_core.losses import packed_sums, token_logps, token_logps_from_hidden


def _batch(batch=3, seq_len=23, vocab=97, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    completion_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    completion_mask[0, 5:12] = 1
    completion_mask[1, 1:] = 1
    completion_mask[2, seq_len - 1] = 1
    return input_ids, completion_mask


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_head_equals_logits_path_values_and_gradients_fp32(chunk_rows, with_bias):
    input_ids, completion_mask = _batch()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 23, 16, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, requires_grad=True)
    bias = torch.randn(97, generator=gen, requires_grad=True) if with_bias else None
    upstream = torch.rand(3, 23, generator=gen)  # non-uniform per-token gradients
    ours = token_logps_from_hidden(hidden, weight, input_ids, completion_mask, lm_head_bias=bias,
                                   chunk_rows=chunk_rows)
    grads = torch.autograd.grad((ours * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    logits = hidden @ weight.T + (bias if with_bias else 0)
    reference = token_logps(logits, input_ids, completion_mask)
    ref_grads = torch.autograd.grad((reference * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    assert (ours[completion_mask == 0] == 0).all()
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hidden_head_gradcheck_fp64():
    input_ids, completion_mask = _batch(seq_len=9, vocab=11)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: token_logps_from_hidden(h, w, input_ids, completion_mask, lm_head_bias=b, chunk_rows=3),
        (hidden, weight, bias),
    )


def test_hidden_head_bf16_is_fp32_softmax_of_the_bf16_projection():
    """bf16 inputs: per-token log-probs come back in fp32 (not rounded to bf16), equal to
    an fp32 log-softmax of the bf16 projection, i.e. what the model's own bf16 head gives."""
    input_ids, completion_mask = _batch(vocab=301)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 23, 32, generator=gen).bfloat16()
    weight = (torch.randn(301, 32, generator=gen) * 0.5).bfloat16()
    ours = token_logps_from_hidden(hidden, weight, input_ids, completion_mask, chunk_rows=7)
    expected = token_logps(hidden @ weight.T, input_ids, completion_mask)  # bf16 logits, fp32 log-softmax
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def _qwen2(tie: bool, vocab=131, **extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie, **extra)
    return Qwen2ForCausalLM(config).float()


def _llama_tied(vocab=131):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize("make_model", [lambda: _qwen2(tie=False), lambda: _qwen2(tie=True), _llama_tied],
                         ids=["qwen2-untied", "qwen2-tied", "llama-tied"])
def test_answer_logps_hidden_path_equals_logits_path_with_gradients(make_model):
    model = make_model()
    assert output_head(model) is not None
    input_ids, completion_mask = _batch(vocab=131)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0  # some padding, masked out of attention
    completion_mask[2] = 0
    completion_mask[2, 10:] = 1
    results = {}
    for head in ("auto", "logits"):
        wrapper = AnswerLogps(model, head=head)
        model.zero_grad()
        logps = wrapper(input_ids, attention_mask, completion_mask)
        (logps * torch.tensor([0.3, -1.0, 2.0])).sum().backward()
        results[head] = (logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert AnswerLogps(model).uses_hidden_states
    torch.testing.assert_close(results["auto"][0], results["logits"][0], atol=1e-5, rtol=0)
    for name, grad in results["auto"][1].items():
        torch.testing.assert_close(grad, results["logits"][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_soft_capped_head_falls_back_to_logits_with_a_warning():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config).float()
    assert output_head(model) is None
    with pytest.warns(UserWarning, match="no standard output head"):
        wrapper = AnswerLogps(model)
    assert not wrapper.uses_hidden_states
    input_ids, completion_mask = _batch(vocab=61)
    attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(wrapper(input_ids, attention_mask, completion_mask),
                               token_logps(logits, input_ids, completion_mask).sum(-1))


# ---- packed, padding-free rows -------------------------------------------------------------

def _samples(lengths, vocab=131, seed=4):
    """Samples of the given lengths, each with a prompt of a third of it and an answer after."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    masks = [[0] * max(1, n // 3) + [1] * (n - max(1, n // 3)) for n in lengths]
    return ids, masks


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
@pytest.mark.parametrize("head", ["auto", "logits"])
def test_packed_row_equals_padded_batch_and_fails_without_restarting_positions(attn, head):
    """One packed row scores each sample as if alone, over lengths from 2 to 300 tokens:
    every answer token's log-prob to 1e-5 in fp32, the per-sample sums to fp32 rounding
    of a ~1,000-nat sum, and the gradients. Negative control: with positions running on
    across samples transformers sees one sequence, samples attend to their
    predecessors, and the same comparison fails. ``varlen`` (on CPU: one sdpa per
    sample) takes the boundaries from ``sample_lengths`` in the forward and derives them
    from the position ids in ``token_logps``, so both routes are checked."""
    from minorsft_core import attention
    from minorsft_core.batching import pack, pad_right

    attention.register()
    model = _qwen2(tie=False, attn_implementation=attn, max_position_embeddings=2048)
    wrapper = AnswerLogps(model, head=head)
    lengths = [300, 2, 41, 7, 160]
    ids, masks = _samples(lengths)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5, -0.7])
    packed = pack(ids, masks)
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.attention_mask is None
    running = dataclasses.replace(packed, position_ids=torch.arange(sum(lengths))[None])
    results = {}
    for name, inputs in (("padded", pad_right(ids, masks, pad_token_id=0)), ("packed", packed),
                         ("positions run on", running)):
        model.zero_grad()
        logps = wrapper(**inputs.as_kwargs())
        (logps * weights).sum().backward()
        with torch.no_grad():
            per_token = wrapper.token_logps(inputs.input_ids, inputs.attention_mask, inputs.completion_mask,
                                            inputs.position_ids)
        if inputs.sample_lengths is not None:  # the packed row back to one row per sample
            per_token = torch.nn.utils.rnn.pad_sequence(per_token[0].split(lengths), batch_first=True)
        results[name] = (logps.detach(), per_token, {n: p.grad.clone() for n, p in model.named_parameters()})
    padded_logps, padded_tokens, padded_grads = results["padded"]
    packed_logps, packed_tokens, packed_grads = results["packed"]
    torch.testing.assert_close(packed_tokens, padded_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_logps, padded_logps, atol=1e-5, rtol=1e-6)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    run_on_tokens = results["positions run on"][1]
    torch.testing.assert_close(run_on_tokens[0], padded_tokens[0], atol=1e-5, rtol=0)  # the first sees no other
    assert (run_on_tokens[1:] - padded_tokens[1:]).abs().max() > 1e-2


def test_varlen_kwargs_equal_what_transformers_derives_from_the_position_ids():
    """The flash-attention varlen arguments given once per packed forward are the ones
    transformers would otherwise re-derive from the position ids in every layer."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from minorsft_core.batching import pack
    from minorsft_core.logp_head import varlen_kwargs

    packed = pack(*_samples([300, 2, 41, 7, 160]))
    given = varlen_kwargs(packed.sample_lengths)
    (cu_q, cu_k), (longest_q, longest_k) = prepare_fa_kwargs_from_position_ids(packed.position_ids)
    for name, derived in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        assert given[name].dtype == derived.dtype == torch.int32
        assert given[name].tolist() == derived.tolist() == [0, 300, 302, 343, 350, 510]
    assert given["max_length_q"] == given["max_length_k"] == int(longest_q) == int(longest_k) == 300
    assert isinstance(given["max_length_q"], int)  # flash-attn wants a host int, not a device tensor


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batches_carry_the_answer_positions_and_longest_sample_made_on_the_host(layout):
    """What spares the forward its device syncs: ``answer_index`` is exactly the answer
    tokens' flat positions (what ``nonzero`` would give on the device), the packed row's
    ``longest_sample`` its longest sample, and the head scores the same with them as
    without. A sample (not only the first) that begins with an answer token is refused."""
    from minorsft_core.batching import pack, pad_right
    from minorsft_core.logp_head import varlen_kwargs

    lengths = [300, 2, 41, 7, 160]
    ids, masks = _samples(lengths)
    inputs = pack(ids, masks) if layout == "packed" else pad_right(ids, masks, pad_token_id=0)
    assert inputs.answer_index.tolist() == inputs.completion_mask.flatten().nonzero().flatten().tolist()
    if layout == "packed":
        assert inputs.longest_sample == 300
        assert {k: v if isinstance(v, int) else v.tolist() for k, v in varlen_kwargs(
            inputs.sample_lengths, inputs.longest_sample).items()} == \
            {k: v if isinstance(v, int) else v.tolist() for k, v in varlen_kwargs(inputs.sample_lengths).items()}
    else:
        assert inputs.longest_sample is None
    wrapper = AnswerLogps(_qwen2(tie=False, max_position_embeddings=2048))
    kwargs = inputs.as_kwargs()
    with torch.no_grad():
        given = wrapper.token_logps(**kwargs)
        derived = wrapper.token_logps(**{**kwargs, "answer_index": None, "longest_sample": None})
    assert torch.equal(given, derived) and given.ne(0).sum() == inputs.answer_index.numel()
    masks[2] = [1] * len(masks[2])  # sample 2 opens with an answer token
    with pytest.raises(ValueError, match="sample 2 of the batch has completion_mask"):
        pack(ids, masks) if layout == "packed" else pad_right(ids, masks, pad_token_id=0)


def test_packed_sums_add_each_samples_own_tokens():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    sums = packed_sums(per_token, torch.tensor([2, 1, 3]))
    assert sums.tolist() == [3.0, 3.0, 15.0]
    (grad,) = torch.autograd.grad((sums * torch.tensor([1.0, 10.0, 100.0])).sum(), per_token)
    assert grad.tolist() == [1.0, 1.0, 10.0, 100.0, 100.0, 100.0]
