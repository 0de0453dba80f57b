"""Writing one chunk's files, and the per-worker summary read back from them.

Per chunk J: ``rejects-J.jsonl`` first, then ``shard-J.parquet``, both atomic (temp
file, fsync, rename). The shard is the chunk's commit marker: killed between the
two, the chunk has no shard and is redone, overwriting the rejects file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from minorsft_core import schema
from minorsft_core.atomic import write_text_atomic
from minorsft_core.data import Reject, Sample
from precompute.engines import Scores


def chunk_table(samples: list[Sample], scores: Scores, with_token_logps: bool) -> pa.Table:
    columns = {
        schema.SAMPLE_ID: [s.sample_id for s in samples],
        schema.INPUT_IDS: [s.input_ids for s in samples],
        schema.COMPLETION_MASK: [s.completion_mask for s in samples],
        schema.ANSWER_LEN: [s.answer_len for s in samples],
        schema.REF_LOGP_SUM: scores.ref_logp_sum,
    }
    if with_token_logps:
        columns[schema.REF_TOKEN_LOGPS] = [logps.tolist() for logps in scores.token_logps]
    return pa.table(columns, schema=schema.arrow_schema(with_token_logps))


def write_chunk(output_dir: Path, metadata: schema.ShardMetadata, table: pa.Table, rejects: list[Reject]) -> None:
    """Rejects, then the shard (the commit marker). Every chunk gets a shard, empty if
    every row was rejected, so completeness is one shard per chunk."""
    lines = "".join(r.to_json() + "\n" for r in sorted(rejects, key=lambda r: r.row))
    write_text_atomic(schema.rejects_path(output_dir, metadata.chunk_index), lines)
    schema.write_shard(schema.shard_path(output_dir, metadata.chunk_index), table, metadata)


@dataclasses.dataclass
class WorkerTotals:
    """What one worker's chunks hold on disk, finished now or by an earlier run."""

    input_rows: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    answer_tokens: int = 0
    total_tokens: int = 0


def worker_totals(output_dir: Path, run: schema.ShardMetadata, chunks: list[int]) -> WorkerTotals:
    """Counts over ``chunks`` read back from their shards and rejects files; raises
    ``ContractError`` if any chunk's scored + rejected rows differ from its input rows."""
    totals = WorkerTotals()
    reasons: collections.Counter[str] = collections.Counter()
    for j in chunks:
        path = schema.shard_path(output_dir, j)
        meta = schema.read_shard_metadata(path)
        start, stop = meta.chunk_row_range()
        table = pq.read_table(path, columns=[schema.INPUT_IDS, schema.ANSWER_LEN])
        rejects_file = schema.rejects_path(output_dir, j)
        rejects = [json.loads(line) for line in rejects_file.read_text().splitlines() if line.strip()]
        if table.num_rows + len(rejects) != stop - start:
            raise schema.ContractError(
                f"{path}: chunk {j} covers {stop - start} input rows but holds {table.num_rows} scored and "
                f"{len(rejects)} rejected; delete {path.name} and {rejects_file.name} and re-run"
            )
        totals.input_rows += stop - start
        totals.rows_scored += table.num_rows
        totals.rows_rejected += len(rejects)
        reasons.update(r["reason"] for r in rejects)
        totals.answer_tokens += pc.sum(table.column(schema.ANSWER_LEN)).as_py() or 0
        totals.total_tokens += pc.sum(pc.list_value_length(table.column(schema.INPUT_IDS))).as_py() or 0
    totals.rejected_by_reason = dict(sorted(reasons.items()))
    return totals
