"""A row-level refusal in a 2-rank job: only rank 0 reads every row, yet every rank must
end promptly with exit 3 (bad input) and rank 0's reason, whatever starts the ranks.

The ranks are started by hand, one process each with RANK/WORLD_SIZE set, as srun or
mpirun start them: each process's own exit code is then what the job reports (torchrun
would turn any of them into its own 1). Before the ranks agreed on a refusal, rank 1 sat
in the rendezvous waiting for a rank 0 that had already exited."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pyarrow.parquet as pq
from conftest import make_records
from train_fixtures import end_process_tree, train_command, train_env, write_stage_one_output

from minorsft_core import schema
from minorsft_core.errors import EXIT_BAD_INPUT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_corrupt_row_stops_every_rank_with_exit_3(tiny_model_dir, tmp_path):
    data = write_stage_one_output(tiny_model_dir, make_records(16), tmp_path / "shards")
    shard = schema.shard_path(data, 0)
    table = pq.read_table(shard)
    values = table.column(schema.REF_LOGP_SUM).to_pylist()
    values[5] = float("nan")
    # Written around the contract's own checks, as a corrupted file would be.
    table = table.set_column(table.schema.get_field_index(schema.REF_LOGP_SUM), schema.REF_LOGP_SUM,
                             [values]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, shard)
    command = train_command("--data", data, "--model", tiny_model_dir, "--output", tmp_path / "run",
                            "--global-batch-size", 4, "--micro-batch-size", 2, "--dtype", "float32")
    port = str(_free_port())
    ranks = [subprocess.Popen(command, env=train_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank in (0, 1)]
    deadline = time.monotonic() + 180
    try:
        stderr = [rank.communicate(timeout=max(deadline - time.monotonic(), 1))[1] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                end_process_tree(rank)
    assert [rank.returncode for rank in ranks] == [EXIT_BAD_INPUT, EXIT_BAD_INPUT], stderr
    assert "row 5" in stderr[0] and "must be finite" in stderr[0]
    assert str(shard) in stderr[0]  # the message names the file
    assert "rank 0 refused the run" in stderr[1] and "row 5" in stderr[1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exit_code"] == EXIT_BAD_INPUT and "row 5" in summary["reason"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
