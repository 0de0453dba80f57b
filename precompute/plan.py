"""Which chunks this job scores: the run's identity, the pool partition, resume.

The input is cut into chunks of ``chunk_rows`` consecutive rows; chunk J belongs to
worker ``J % num_workers``. The partition depends only on the input and these two
numbers, so K jobs with no coordination write exactly the files one job would, and
a re-run knows its chunks without asking anyone. A chunk is finished when its shard
exists (the shard is written last, atomically).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minorsft_core import schema
from minorsft_core.config import PrecomputeConfig
from minorsft_core.data import count_records, input_files, read_records
from minorsft_core.errors import DataError


def count_rows(data: str) -> int:
    """Input rows, counted as ``read_records`` numbers them (every shard's metadata
    carries the total, so it is needed before the first shard is written)."""
    count = count_records(data)
    if count == 0:
        raise DataError(f"{data}: no input rows")
    return count


def run_metadata(config: PrecomputeConfig, *, tokenizer, engine: str, engine_version: str, dtype: str,
                 data_format: str, num_input_rows: int) -> schema.ShardMetadata:
    """What identifies this run; the chunk fields are filled in per shard."""
    return schema.ShardMetadata(
        reference_model=str(Path(config.model).resolve()),
        reference_fingerprint=schema.model_fingerprint(config.model),
        tokenizer_fingerprint=schema.tokenizer_fingerprint(tokenizer),
        template=config.template,
        max_seq_len=config.max_seq_len,
        truncate_answer=config.truncate_answer,
        engine=engine,
        engine_version=engine_version,
        dtype=dtype,
        data_fingerprint=schema.data_fingerprint(input_files(config.data), {"format": data_format}),
        data_format=data_format,
        num_input_rows=num_input_rows,
        chunk_rows=config.chunk_rows,
        with_token_logps=config.store_token_logps,
        chunk_index=0,
        rows_scored=0,
        rows_rejected=0,
    )


def owned_chunks(num_chunks: int, num_workers: int, worker_index: int) -> list[int]:
    return list(range(worker_index, num_chunks, num_workers))


def finished_chunks(output_dir: Path, expected: schema.ShardMetadata) -> set[int]:
    """Chunks already in ``output_dir``, after checking every shard there was written
    by a run identical to this one; a different run is refused, naming what differs."""
    done = set()
    for path in sorted(output_dir.glob(schema.SHARD_GLOB)):
        found = schema.read_shard_metadata(path)
        diff = schema.describe_differences(expected.run_fields(), found.run_fields())
        if diff:
            raise schema.ContractError(
                f"{output_dir} already holds shards of a different stage-one run ({path.name}); "
                f"this run != that one in:\n{diff}\nTo resume it, re-run with the options that wrote it; "
                "to score with these options, pass a new --output (or delete that directory's shards)."
            )
        done.add(found.chunk_index)
    return done


def remove_stale_temp_files(output_dir: Path, chunks: list[int]) -> None:
    """Delete temp files a killed run of this worker left for its own chunks (never
    another worker's, which may be writing right now)."""
    for j in chunks:
        for final in (schema.shard_path(output_dir, j), schema.rejects_path(output_dir, j)):
            for tmp in output_dir.glob(f".{final.name}.tmp-*"):
                tmp.unlink(missing_ok=True)


def iter_chunk_records(data: str, chunk_rows: int, chunks: list[int]) -> Iterator[tuple[int, list[tuple[int, Any]]]]:
    """``(chunk_index, [(row, record), ...])`` for the wanted chunks, in order, streaming
    the input once and stopping after the last wanted chunk."""
    wanted = set(chunks)
    if not wanted:
        return
    last = max(wanted)
    current, records = None, []
    for row, record in read_records(data):
        j = row // chunk_rows
        if j != current:
            if current in wanted:
                yield current, records
            if j > last:
                return
            current, records = j, []
        if j in wanted:
            records.append((row, record))
    if current in wanted:
        yield current, records


def chunk_metadata(run: schema.ShardMetadata, chunk_index: int, rows_scored: int,
                   rows_rejected: int) -> schema.ShardMetadata:
    return dataclasses.replace(run, chunk_index=chunk_index, rows_scored=rows_scored, rows_rejected=rows_rejected)
