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
