"""Stage one's pure parts: batching, the pool partition, chunk streaming."""

from __future__ import annotations

import json

import pytest

from precompute.hf_engine import length_batches
from precompute.plan import iter_chunk_records, owned_chunks


@pytest.mark.parametrize("max_batch_tokens", [100, 128, 1000])
def test_length_batches_cover_every_sample_once_within_the_bound(max_batch_tokens):
    lengths = [(k * 37) % 100 + 1 for k in range(200)]
    batches = length_batches(lengths, max_batch_tokens)
    assert sorted(i for batch in batches for i in batch) == list(range(200))
    for batch in batches:
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths, reverse=True)  # the first sets the padded width
        assert len(batch) * widths[0] <= max_batch_tokens


def test_length_batches_give_an_overlong_sample_its_own_batch():
    assert length_batches([10, 500, 20], 100) == [[1], [2, 0]]


def test_packed_batches_count_tokens_not_the_padded_grid():
    lengths = [60, 10, 30, 25]
    assert length_batches(lengths, 100) == [[0], [2, 3, 1]]  # 2 x 60 > 100; 3 x 30 = 90
    assert length_batches(lengths, 100, packed=True) == [[0, 2], [3, 1]]  # 60 + 30; 25 + 10


@pytest.mark.parametrize("num_workers", [1, 2, 3, 7])
def test_pool_partition_covers_every_row_once(tmp_path, num_workers):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": k}) + "\n" for k in range(103)))
    chunk_rows, num_chunks = 10, 11
    seen = []
    for worker in range(num_workers):
        chunks = owned_chunks(num_chunks, num_workers, worker)
        assert all(j % num_workers == worker for j in chunks)
        for j, records in iter_chunk_records(str(data), chunk_rows, chunks):
            assert [row for row, _ in records] == list(range(j * chunk_rows, min((j + 1) * chunk_rows, 103)))
            seen.extend(record["n"] for _, record in records)
    assert sorted(seen) == list(range(103))


def test_chunk_streaming_yields_only_the_wanted_chunks(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": k}) + "\n" for k in range(50)))
    assert [j for j, _ in iter_chunk_records(str(data), 10, [3, 1])] == [1, 3]
    assert list(iter_chunk_records(str(data), 10, [])) == []


def _model_dir(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_vllm_batch_tokens_bound_prompt_logprob_memory(tmp_path):
    """vLLM does not profile prompt log-probs (fp32 logits + log-softmax + a bool mask,
    9 bytes per token and vocabulary entry): the tokens per step keep them under 1 GiB."""
    from minorsft_core.config import PrecomputeConfig
    from minorsft_core.errors import ConfigError
    from precompute.engines import batch_tokens

    def tokens(engine="vllm", **options):
        config = PrecomputeConfig(model=_model_dir(tmp_path, **options.pop("model_config")), data="d", output="o",
                                  max_seq_len=2048, **options)
        return batch_tokens(config, engine)

    assert tokens(model_config={"vocab_size": 262144}) == (1 << 30) // (9 * 262144) == 455
    assert tokens(model_config={"text_config": {"vocab_size": 151936}}) == 785
    assert tokens(model_config={"vocab_size": 512}) == 4096  # vLLM's own CPU default is the most we ask
    assert tokens(model_config={"vocab_size": 262144}, max_batch_tokens=2000) == 2000  # the user's choice
    assert tokens("hf", model_config={"vocab_size": 262144}) == 16384
    with pytest.raises(ConfigError, match="one sample to fit a batch"):
        tokens("hf", model_config={"vocab_size": 512}, max_batch_tokens=1000)


def test_vllm_start_failure_for_memory_names_the_option(tmp_path):
    """vLLM 0.32's own messages (its CPU worker's, seen with --gpu-memory-utilization 0.02
    on the tiny model) name no option of ours; the error we raise does."""
    from minorsft_core.config import PrecomputeConfig
    from precompute.engines import start_failure_hint

    config = PrecomputeConfig(model="m", data="d", output="o", gpu_memory_utilization=0.02)
    short = RuntimeError("Worker failed with error 'Available memory on node 0 (19.8/23.54 GiB) on kv cache "
                         "allocation is less than requested memory for kv (-0.14/0.47 GiB). Reduce CPU memory used "
                         "by other processes.', please check the stack trace above for the root cause")
    assert "too small: raise --gpu-memory-utilization" in start_failure_hint(config, "vllm", short)
    taken = ValueError("Available memory on node 0 (1.0/23.54 GiB) on startup is less than desired CPU memory "
                       "utilization (0.5, 11.77 GiB).")
    assert "lower --gpu-memory-utilization" in start_failure_hint(config, "vllm", taken)
    # What reaches the command when vLLM's engine core runs in its own process (measured:
    # --gpu-memory-utilization 0.02 on the tiny model, exit 4).
    parent = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): "
                          "{'EngineCore': 1}")
    assert "raise --gpu-memory-utilization (now 0.02" in start_failure_hint(config, "vllm", parent)
    assert start_failure_hint(config, "hf", short) == ""
