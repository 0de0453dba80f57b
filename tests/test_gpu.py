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


def test_train_bf16_on_cuda_tracks_cpu_fp32(data, tiny_model_dir, tmp_path, monkeypatch):
    """`minorsft train` in bf16 on CUDA (ZeRO-3, DeepSpeed's fused Adam, NCCL) against the
    same two steps in fp32 on CPU, from the same fp32 stage one: the step-1 parity guard
    passes at its defaults, and both steps' losses agree to bf16 precision."""
    from train_fixtures import run_train

    from train.metrics import read_metrics

    common = ("--data", data, "--model", tiny_model_dir, "--global-batch-size", 8, "--micro-batch-size", 4,
              "--max-steps", 2, "--lr", 1e-3, "--warmup-ratio", 0, "--save-steps", 10**6)
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


def test_packed_row_under_flash_attention_equals_padded_batch():
    """--packing on a GPU: flash-attention's varlen kernel, given the boundaries once per
    forward (``logp_head.varlen_kwargs``), scores each sample of a packed row as the padded
    batch does (bf16, to bf16 precision). Needs flash-attn installed besides CUDA."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minorsft_core.batching import pack, pad_right
    from minorsft_core.logp_head import AnswerLogps

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    gen = torch.Generator().manual_seed(0)
    lengths = [700, 3, 90, 17, 400]
    ids = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in lengths]
    masks = [[0] * (n // 3) + [1] * (n - n // 3) for n in lengths]
    padded_model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    packed_model = Qwen2ForCausalLM._from_config(config, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda()
    packed_model.load_state_dict(padded_model.state_dict())
    results = {}
    with torch.no_grad():
        results["sdpa"] = AnswerLogps(padded_model)(**pad_right(ids, masks, 0).to("cuda").as_kwargs()).float()
        results["flash_attention_2"] = AnswerLogps(packed_model)(**pack(ids, masks).to("cuda").as_kwargs()).float()
    torch.testing.assert_close(results["flash_attention_2"], results["sdpa"], atol=0.5, rtol=2e-3)
