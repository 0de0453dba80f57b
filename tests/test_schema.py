"""The stage contract (SPEC §3): round trips, row checks, directory completeness,
fingerprints."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minorsft_core import schema
from minorsft_core.atomic import write_text_atomic
from minorsft_core.errors import ContractError
from minorsft_core.schema import ShardMetadata


def _metadata(**overrides) -> ShardMetadata:
    fields = dict(
        reference_model="/models/ref", reference_fingerprint="r" * 64, tokenizer_fingerprint="t" * 64,
        template="chat", max_seq_len=64, truncate_answer=False, engine="hf", engine_version="5.19.0",
        dtype="float32", data_fingerprint="d" * 64, data_format="messages", num_input_rows=5, chunk_rows=3,
        with_token_logps=False, chunk_index=0, rows_scored=2, rows_rejected=1,
    )
    fields.update(overrides)
    return ShardMetadata(**fields)


def _rows(n: int, offset: int = 0) -> dict[str, list]:
    ids, masks = [], []
    for k in range(n):
        length = 4 + k
        ids.append(list(range(offset, offset + length)))
        masks.append([0] * (length - 2) + [1, 1])
    return {
        schema.SAMPLE_ID: [f"s{offset + k}" for k in range(n)],
        schema.INPUT_IDS: ids,
        schema.COMPLETION_MASK: masks,
        schema.ANSWER_LEN: [2] * n,
        schema.REF_LOGP_SUM: [-1.5 * (k + 1) for k in range(n)],
    }


def _write_chunk(directory, chunk_index, n_scored, n_rejected, **meta):
    metadata = _metadata(chunk_index=chunk_index, rows_scored=n_scored, rows_rejected=n_rejected, **meta)
    schema.write_shard(schema.shard_path(directory, chunk_index), pa.table(_rows(n_scored, 10 * chunk_index)), metadata)
    if n_rejected:
        lines = [json.dumps({"row": 0, "reason": "too_long"})] * n_rejected
        write_text_atomic(schema.rejects_path(directory, chunk_index), "\n".join(lines) + "\n")


def _complete_dir(tmp_path):
    """5 input rows in chunks of 3: chunk 0 = 2 scored + 1 rejected, chunk 1 = 2 scored."""
    _write_chunk(tmp_path, 0, 2, 1)
    _write_chunk(tmp_path, 1, 2, 0)
    return tmp_path


def test_round_trip_types_and_metadata(tmp_path):
    path = schema.shard_path(tmp_path, 0)
    rows = _rows(2)
    schema.write_shard(path, pa.table(rows), _metadata())
    table = pq.read_table(path)
    assert table.schema.field(schema.INPUT_IDS).type == pa.list_(pa.int32())
    assert table.schema.field(schema.COMPLETION_MASK).type == pa.list_(pa.int8())
    assert table.schema.field(schema.ANSWER_LEN).type == pa.int32()
    assert table.schema.field(schema.REF_LOGP_SUM).type == pa.float64()
    assert table.to_pydict() == rows
    assert schema.read_shard_metadata(path) == _metadata()
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"


def test_round_trip_optional_token_logps(tmp_path):
    rows = _rows(1)
    rows[schema.REF_TOKEN_LOGPS] = [[-0.5, -1.0]]
    path = schema.shard_path(tmp_path, 0)
    schema.write_shard(path, pa.table(rows), _metadata(with_token_logps=True))
    assert pq.read_table(path).schema.field(schema.REF_TOKEN_LOGPS).type == pa.list_(pa.float32())


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        (schema.REF_LOGP_SUM, 1, float("nan"), "must be finite"),
        (schema.REF_LOGP_SUM, 0, float("inf"), "must be finite"),
        (schema.REF_LOGP_SUM, 1, 3.0, "must be finite and <= 0"),
        (schema.ANSWER_LEN, 1, 3, "answer_len is 3 but completion_mask sums to 2"),
        (schema.COMPLETION_MASK, 1, [1, 0, 0, 0, 1], "position 0"),
        (schema.COMPLETION_MASK, 0, [0, 0, 2, 0], "other than 0 and 1"),
        (schema.COMPLETION_MASK, 1, [0, 0, 1, 1], "5 input_ids but 4 completion_mask"),
    ],
)
def test_validate_table_names_the_bad_row(column, row, value, message):
    rows = _rows(2)
    rows[column][row] = value
    table = pa.table(rows, schema=schema.arrow_schema())
    with pytest.raises(ContractError, match=message) as err:
        schema.validate_table(table, "shard-x.parquet")
    assert f"row {row} (sample_id 's{row}')" in str(err.value)


def test_validate_table_refuses_empty_answer():
    rows = _rows(1)
    rows[schema.COMPLETION_MASK] = [[0, 0, 0, 0]]
    rows[schema.ANSWER_LEN] = [0]
    with pytest.raises(ContractError, match="must be >= 1"):
        schema.validate_table(pa.table(rows, schema=schema.arrow_schema()), "x")


def test_write_shard_refuses_bad_rows(tmp_path):
    rows = _rows(1)
    rows[schema.REF_LOGP_SUM] = [float("nan")]
    with pytest.raises(ContractError):
        schema.write_shard(schema.shard_path(tmp_path, 0), pa.table(rows), _metadata())
    assert not list(tmp_path.iterdir())


def test_scan_complete_dir(tmp_path):
    scanned = schema.scan_output_dir(_complete_dir(tmp_path))
    assert (scanned.rows_scored, scanned.rows_rejected) == (4, 1)
    assert [p.name for p in scanned.shard_paths] == ["shard-000000.parquet", "shard-000001.parquet"]


def test_scan_refuses_missing_chunk(tmp_path):
    _write_chunk(tmp_path, 0, 2, 1)
    with pytest.raises(ContractError, match=r"incomplete, 1 of 2 chunks missing \(chunks 1\)"):
        schema.scan_output_dir(tmp_path)


def test_scan_refuses_mixed_references(tmp_path):
    _write_chunk(tmp_path, 0, 2, 1)
    _write_chunk(tmp_path, 1, 2, 0, reference_fingerprint="x" * 64)
    with pytest.raises(ContractError, match="reference_fingerprint") as err:
        schema.scan_output_dir(tmp_path)
    assert "shard-000001.parquet" in str(err.value)


def test_scan_refuses_lost_rejects(tmp_path):
    _complete_dir(tmp_path)
    schema.rejects_path(tmp_path, 0).unlink()
    with pytest.raises(ContractError, match="0 rejects, metadata says 2 and 1"):
        schema.scan_output_dir(tmp_path)


def test_scan_refuses_rows_not_accounted_for(tmp_path):
    # metadata is self-consistent but chunk 1 (rows 3..4) accounts for only one row
    _write_chunk(tmp_path, 0, 2, 1)
    _write_chunk(tmp_path, 1, 1, 0)
    with pytest.raises(ContractError, match="accounts for 1 scored"):
        schema.scan_output_dir(tmp_path)


def test_scan_refuses_renamed_shard(tmp_path):
    _complete_dir(tmp_path)
    schema.shard_path(tmp_path, 1).unlink()
    shutil.copy(schema.shard_path(tmp_path, 0), schema.shard_path(tmp_path, 1))
    with pytest.raises(ContractError, match="renamed or copied"):
        schema.scan_output_dir(tmp_path)


def test_scan_refuses_foreign_and_missing_dirs(tmp_path):
    with pytest.raises(ContractError, match="no such directory"):
        schema.scan_output_dir(tmp_path / "nope")
    with pytest.raises(ContractError, match="no shard"):
        schema.scan_output_dir(tmp_path)
    pq.write_table(pa.table({"a": [1]}), schema.shard_path(tmp_path, 0))
    with pytest.raises(ContractError, match="not written by `minorsft precompute`"):
        schema.scan_output_dir(tmp_path)


def test_metadata_schema_version_mismatch(tmp_path):
    raw = json.loads(_metadata().to_json())
    raw["schema_version"] = 99
    with pytest.raises(ContractError, match="schema version 99"):
        ShardMetadata.from_json(json.dumps(raw).encode(), "x")


def test_run_fields_ignore_chunk_fields():
    a, b = _metadata(chunk_index=0, rows_scored=2), _metadata(chunk_index=1, rows_scored=0, rows_rejected=2)
    schema.check_same_run(a, b, "x")
    with pytest.raises(ContractError, match="max_seq_len: 64 != 128"):
        schema.check_same_run(a, dataclasses.replace(b, max_seq_len=128), "x")


# ---- fingerprints -------------------------------------------------------------------------


def test_tokenizer_fingerprint(tiny_tokenizer):
    import copy

    same = copy.deepcopy(tiny_tokenizer)
    assert schema.tokenizer_fingerprint(same) == schema.tokenizer_fingerprint(tiny_tokenizer)
    same.chat_template = tiny_tokenizer.chat_template.replace("helpful", "harmless")
    assert schema.tokenizer_fingerprint(same) != schema.tokenizer_fingerprint(tiny_tokenizer)
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<new_token>"])
    assert schema.tokenizer_fingerprint(other) != schema.tokenizer_fingerprint(tiny_tokenizer)


def test_model_fingerprint_tells_checkpoints_apart(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy_dir)
    assert schema.model_fingerprint(copy_dir) == schema.model_fingerprint(tiny_model_dir)
    # One training step nudges every weight a little: same shapes, same size, other bytes.
    weights = load_file(copy_dir / "model.safetensors")
    save_file({k: (v + np.float32(1e-3)).astype(v.dtype) for k, v in weights.items()}, copy_dir / "model.safetensors",
              metadata={"format": "pt"})
    assert schema.model_fingerprint(copy_dir) != schema.model_fingerprint(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["rope_theta"] = 1.0
    shutil.copy(tiny_model_dir / "model.safetensors", copy_dir / "model.safetensors")
    (copy_dir / "config.json").write_text(json.dumps(config))
    assert schema.model_fingerprint(copy_dir) != schema.model_fingerprint(tiny_model_dir)


def test_weights_fingerprint_is_cheap_on_big_files(tmp_path):
    """A sparse 15 GB safetensors-shaped file: reading it whole would take a minute or more.
    The fingerprint reads ~1 MB of it: counted in bytes this process reads (Linux's
    /proc/self/io), not timed, so a loaded machine cannot fail it."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [7_500_000_000], "data_offsets": [0, 15_000_000_000]}})
    path = tmp_path / "model-00001-of-00001.safetensors"
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header.encode())
        handle.truncate(8 + len(header) + 15_000_000_000)
    (tmp_path / "config.json").write_text("{}")
    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    before = bytes_read()
    schema.model_fingerprint(tmp_path)
    assert bytes_read() - before < 16 * 2**20
