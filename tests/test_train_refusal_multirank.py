"""A row-level refusal under a 2-rank launcher: only rank 0 reads every row, so the job
must still end promptly (the launcher stops rank 1), non-zero, with rank 0's message."""

from __future__ import annotations

import pyarrow.parquet as pq
from conftest import make_records
from train_fixtures import run_train, write_stage_one_output

from minorsft_core import schema


def test_corrupt_row_stops_every_rank(tiny_model_dir, tmp_path):
    data = write_stage_one_output(tiny_model_dir, make_records(16), tmp_path / "shards")
    shard = schema.shard_path(data, 0)
    table = pq.read_table(shard)
    values = table.column(schema.REF_LOGP_SUM).to_pylist()
    values[5] = float("nan")
    # Written around the contract's own checks, as a corrupted file would be.
    table = table.set_column(table.schema.get_field_index(schema.REF_LOGP_SUM), schema.REF_LOGP_SUM,
                             [values]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, shard)
    result = run_train("--data", data, "--model", tiny_model_dir, "--output", tmp_path / "run",
                       "--global-batch-size", 4, "--micro-batch-size", 2, "--dtype", "float32",
                       ranks=2, timeout=240)
    assert result.returncode != 0
    assert "row 5" in result.stderr and "must be finite" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert str(shard) in result.stderr  # the message names the file
