"""What only a GPU can show: bf16 numerics of the chunked log-softmax and of the hf
scoring engine on CUDA. Marked `gpu`: skipped (and reported as skipped) without CUDA;
run them with `python -m pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from minorsft_core.losses import sequence_logps

pytestmark = pytest.mark.gpu


def test_chunked_logps_on_cuda_bf16_match_fp32():
    """bf16 logits on CUDA: the chunked fp32 log-softmax equals an fp32 naive gather on the
    same rounded logits, and the gradient comes back in bf16 without NaNs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, seq_len, vocab = 2, 1024, 152064
    logits = (torch.randn(batch, seq_len, vocab, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    logits.requires_grad_(True)
    input_ids = torch.randint(0, vocab, (batch, seq_len), device="cuda", generator=gen)
    completion_mask = torch.zeros(batch, seq_len, dtype=torch.long, device="cuda")
    completion_mask[:, seq_len // 2:] = 1
    out = sequence_logps(logits, input_ids, completion_mask, chunk_rows=256)
    logp = torch.log_softmax(logits.detach().float(), dim=-1)[:, :-1]
    expected = (logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * completion_mask[:, 1:]).sum(-1)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_hf_engine_on_cuda_matches_cpu_fp32(tiny_model_dir, tiny_tokenizer):
    """The hf engine in bf16 on CUDA against fp32 on CPU on the tiny model: per-sample sums
    agree to bf16 precision (a few 1e-2 nats over ~10 answer tokens)."""
    from minorsft_core.data import SampleRenderer
    from precompute.hf_engine import HfEngine

    renderer = SampleRenderer(tiny_tokenizer, data_format="prompt_completion", max_seq_len=256)
    samples = [renderer.render(k, {"prompt": "why " * (k + 1), "completion": "because " * (k + 2)}) for k in range(8)]
    gpu = HfEngine(str(tiny_model_dir), dtype="bfloat16", max_batch_tokens=1024, trust_remote_code=False,
                   logp_head="auto")
    gpu_sums = gpu.score(samples, lambda rows, tokens: None).ref_logp_sum
    gpu.close()
    with torch.device("cpu"):
        reference = []
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            reference.append(float(sequence_logps(logits, ids, torch.tensor([sample.completion_mask]))[0]))
    assert max(abs(a - b) for a, b in zip(gpu_sums, reference, strict=True)) < 0.1


@pytest.mark.parametrize("stage", [2, 3])
def test_train_bf16_on_cuda_tracks_cpu_fp32(data, tiny_model_dir, tmp_path, monkeypatch, stage):
    """`minorsft train` in bf16 on CUDA (ZeRO-2, the one-rank default, and ZeRO-3;
    DeepSpeed's fused Adam, NCCL) against the same two steps in fp32 on CPU, from the same
    fp32 stage one: the step-1 parity guard passes at its defaults, and both steps'
    losses agree to bf16 precision."""
    from train_fixtures import run_train

    from train.metrics import read_metrics

    common = ("--data", data, "--model", tiny_model_dir, "--global-batch-size", 8, "--micro-batch-size", 4,
              "--max-steps", 2, "--lr", 1e-3, "--warmup-ratio", 0, "--save-steps", 10**6, "--zero-stage", stage)
    gpu = run_train(*common, "--output", tmp_path / "cuda-bf16", "--dtype", "bfloat16")
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cpu = run_train(*common, "--output", tmp_path / "cpu-fp32", "--dtype", "float32")
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    on_gpu = read_metrics(tmp_path / "cuda-bf16" / "metrics.jsonl")
    on_cpu = read_metrics(tmp_path / "cpu-fp32" / "metrics.jsonl")
    print("cuda bf16:", [(m["loss"], m["abs_deviation"], m["coef_mean"]) for m in on_gpu])
    print("cpu fp32: ", [(m["loss"], m["abs_deviation"], m["coef_mean"]) for m in on_cpu])
    assert on_gpu[0]["abs_deviation"] < 0.05  # mean |delta_i| / m_i: bf16 policy vs fp32 reference
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


@pytest.mark.parametrize("attn", ["flash_attention_2", "varlen"])
def test_packed_row_under_varlen_kernels_equals_padded_batch(attn):
    """--packing on a GPU: a varlen kernel, given the boundaries once per forward
    (``logp_head.varlen_kwargs``), scores each sample of a packed row as the padded sdpa
    batch does (bf16, to bf16 precision). ``flash_attention_2`` needs flash-attn
    installed; ``varlen`` is PyTorch's own kernel (``minorsft_core.attention``).
    Negative control: the same row as one sequence (no boundaries) scores differently."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minorsft_core import attention
    from minorsft_core.batching import pack, pad_right
    from minorsft_core.logp_head import AnswerLogps

    attention.register()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    gen = torch.Generator().manual_seed(0)
    lengths = [700, 3, 90, 17, 400]
    ids = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in lengths]
    masks = [[0] * (n // 3) + [1] * (n - n // 3) for n in lengths]
    padded_model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    packed_model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.bfloat16).cuda()
    packed_model.load_state_dict(padded_model.state_dict())
    packed = pack(ids, masks).to("cuda")
    one_sequence = pack([sum(ids, [])], [sum(masks, [])]).to("cuda")
    with torch.no_grad():
        padded = AnswerLogps(padded_model)(**pad_right(ids, masks, 0).to("cuda").as_kwargs()).float()
        ours = AnswerLogps(packed_model)(**packed.as_kwargs()).float()
        ours_tokens = AnswerLogps(packed_model).token_logps(**packed.as_kwargs())[0].float()
        run_on = AnswerLogps(packed_model).token_logps(**one_sequence.as_kwargs())[0].float()
    torch.testing.assert_close(ours, padded, atol=0.5, rtol=2e-3)
    # Same kernel and weights: the first sample sees no other either way; the later ones
    # see their predecessors only when run on (a random model's tokens move by ~0.1-1 nats).
    first = lengths[0]
    torch.testing.assert_close(run_on[:first], ours_tokens[:first])
    assert (run_on[first:] - ours_tokens[first:]).abs().max() > 0.1


def test_varlen_kernel_equals_per_sample_sdpa_with_gradients():
    """``attention.varlen``'s CUDA kernel against its own exact fallback (one causal sdpa
    per sample), values and q/k/v gradients, bf16 with GQA (8 query heads on 2 kv heads)."""
    from minorsft_core import attention

    if attention._torch_varlen()[0] is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1000, 1, 64, 333]
    total = sum(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, h, 64, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    upstream = torch.randn(total, 8, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    results = {}
    for name, run in (("kernel", lambda: attention._cuda_varlen(q, k, v, bounds, max(lengths), 0.125)),
                      ("per-sample sdpa", lambda: attention._per_sample_sdpa(q, k, v, bounds, 0.125))):
        out = run()
        grads = torch.autograd.grad((out.float() * upstream.float()).sum(), (q, k, v))
        results[name] = (out.float(), [g.float() for g in grads])
    torch.testing.assert_close(results["kernel"][0], results["per-sample sdpa"][0], atol=2e-2, rtol=2e-2)
    for got, want in zip(results["kernel"][1], results["per-sample sdpa"][1], strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_our_part_of_a_micro_batch_never_waits_for_the_device(layout):
    """The trainer's own work per micro-batch asks the device for nothing, so the host keeps
    queueing kernels while the GPU runs: the collated batch's copy to the GPU, the varlen
    arguments, the answer-only head (forward and backward) from the final hidden states,
    the packed sums, the loss and its statistics. Under ``set_sync_debug_mode("error")``
    any blocking call raises. (transformers' mask preparation and DeepSpeed's step are not
    ours: left out.)"""
    from types import SimpleNamespace

    from minorsft_core import losses
    from minorsft_core.batching import pack, pad_right
    from minorsft_core.logp_head import varlen_kwargs
    from train import loop
    from train.data import MicroBatch

    gen = torch.Generator().manual_seed(0)
    lengths, vocab, width = [700, 3, 90, 17], 4096, 64
    ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    masks = [[0] * max(1, n // 3) + [1] * (n - max(1, n // 3)) for n in lengths]
    inputs = pack(ids, masks) if layout == "packed" else pad_right(ids, masks, 0)
    batch = MicroBatch(inputs, answer_len=torch.tensor([float(sum(m)) for m in masks]),
                       ref_logp_sum=torch.tensor([-9.0 * sum(m) for m in masks], dtype=torch.float64))
    hidden = torch.randn(*inputs.input_ids.shape, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    config = SimpleNamespace(loss="minorsft", beta=0.04, token_normalize=False)

    def one_micro_batch():
        on_gpu = batch.to("cuda")
        given = on_gpu.inputs
        if layout == "packed":
            varlen_kwargs(given.sample_lengths, given.longest_sample)
        per_token = losses.token_logps_from_hidden(hidden, weight, given.input_ids, given.completion_mask,
                                                   answer_index=given.answer_index)
        logps = per_token.sum(-1) if layout == "padded" else losses.packed_sums(per_token[0], given.sample_lengths)
        loss = loop.compute_loss(config, logps, on_gpu.ref_logp_sum, on_gpu.answer_len, 2.0)
        loss.backward()
        loop._micro_stats(config, loss, logps, on_gpu.ref_logp_sum, on_gpu.answer_len)
        return loss

    one_micro_batch()  # warm-up unguarded: one-off set-up (handles, allocator pools) is not per micro-batch
    torch.cuda.synchronize()
    hidden.grad, weight.grad = None, None
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = one_micro_batch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and hidden.grad.abs().sum().item() > 0 and weight.grad is not None


def test_preflight_finds_the_gpu_optimizer_buildable_where_it_builds():
    """The preflight's fused-Adam check (``train.ds_ops.fused_adam_problem``) on the machine
    where the training tests above build and run DeepSpeed's fused Adam: it must find no
    problem there, or it would refuse jobs that run."""
    from train.ds_ops import fused_adam_facts, fused_adam_problem
    from train.run import _uses_fused_adam

    assert _uses_fused_adam({}) and not _uses_fused_adam({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert fused_adam_problem(**fused_adam_facts()) is None
    from deepspeed.ops.op_builder import FusedAdamBuilder

    FusedAdamBuilder().load()  # builds (or loads) it, as the engine will
