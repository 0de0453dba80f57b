"""The one owner of the stage-one -> stage-two contract.

Stage one writes, per chunk J of the input, ``shard-{J:06d}.parquet`` (the
scored rows) and ``rejects-{J:06d}.jsonl`` (the rows it could not score, with a
reason). The shard is written last and atomically, so its presence marks the
chunk finished. Every shard carries ``ShardMetadata`` as JSON under one key.
Stage two calls ``scan_output_dir`` before any accelerator work.

Nothing here imports torch, vllm or deepspeed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from minorsft_core.atomic import replacing
from minorsft_core.errors import ContractError

SCHEMA_VERSION = 1
METADATA_KEY = b"minorsft"

SAMPLE_ID = "sample_id"
INPUT_IDS = "input_ids"
COMPLETION_MASK = "completion_mask"
ANSWER_LEN = "answer_len"
REF_LOGP_SUM = "ref_logp_sum"
REF_TOKEN_LOGPS = "ref_token_logps"  # optional: answer positions only, in order

ARROW_FIELDS = {
    SAMPLE_ID: pa.string(),
    INPUT_IDS: pa.list_(pa.int32()),
    COMPLETION_MASK: pa.list_(pa.int8()),
    ANSWER_LEN: pa.int32(),
    REF_LOGP_SUM: pa.float64(),
}
OPTIONAL_ARROW_FIELDS = {REF_TOKEN_LOGPS: pa.list_(pa.float32())}

SHARD_GLOB = "shard-*.parquet"
REJECTS_GLOB = "rejects-*.jsonl"


def shard_path(output_dir: str | os.PathLike, chunk_index: int) -> Path:
    return Path(output_dir) / f"shard-{chunk_index:06d}.parquet"


def rejects_path(output_dir: str | os.PathLike, chunk_index: int) -> Path:
    return Path(output_dir) / f"rejects-{chunk_index:06d}.jsonl"


def arrow_schema(with_token_logps: bool = False) -> pa.Schema:
    fields = dict(ARROW_FIELDS)
    if with_token_logps:
        fields.update(OPTIONAL_ARROW_FIELDS)
    return pa.schema([pa.field(name, typ, nullable=False) for name, typ in fields.items()])


@dataclasses.dataclass(frozen=True)
class ShardMetadata:
    """File-level metadata of one shard.

    The *run* fields must agree across every shard of an output directory (and with
    a re-run writing into it); the *chunk* fields say which input rows this shard
    accounts for.
    """

    # run fields
    reference_model: str
    reference_fingerprint: str
    tokenizer_fingerprint: str
    template: str
    max_seq_len: int
    truncate_answer: bool
    engine: str
    engine_version: str
    dtype: str
    data_fingerprint: str
    data_format: str
    num_input_rows: int
    chunk_rows: int
    with_token_logps: bool
    # chunk fields
    chunk_index: int
    rows_scored: int
    rows_rejected: int
    schema_version: int = SCHEMA_VERSION

    CHUNK_FIELDS = ("chunk_index", "rows_scored", "rows_rejected")
    # Engine and dtype change the values only by numerical drift (``minorsft_core/losses.py``): a resumed
    # job may not switch them, but that is the run-config check's business, so they
    # stay run fields.

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(self.num_input_rows / self.chunk_rows))

    def chunk_row_range(self) -> tuple[int, int]:
        start = self.chunk_index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_input_rows)

    def run_fields(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.CHUNK_FIELDS}

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> ShardMetadata:
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ContractError(f"{source}: metadata is not valid JSON ({err}); re-run stage one") from err
        version = fields.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ContractError(
                f"{source}: schema version {version}, this minorsft reads {SCHEMA_VERSION}; "
                "re-run `minorsft precompute` with this version"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = known - fields.keys()
        if missing:
            raise ContractError(f"{source}: metadata lacks {sorted(missing)}; re-run stage one")
        return cls(**{k: v for k, v in fields.items() if k in known})


def describe_differences(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """'field: a != b' for each field that differs, one per line."""
    lines = [
        f"  {key}: {expected.get(key)!r} != {found.get(key)!r}"
        for key in sorted(expected.keys() | found.keys())
        if expected.get(key) != found.get(key)
    ]
    return "\n".join(lines)


def write_shard(path: str | os.PathLike, table: pa.Table, metadata: ShardMetadata) -> None:
    """Write one shard atomically: a temp file in the same directory, fsync, rename.

    A reader (or a re-run after SIGKILL) sees either the whole shard or none.
    """
    path = Path(path)
    schema = arrow_schema(metadata.with_token_logps)
    table = table.select(schema.names).cast(schema)
    table = table.replace_schema_metadata({METADATA_KEY: metadata.to_json()})
    validate_table(table, str(path))
    with replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_shard_metadata(path: str | os.PathLike) -> ShardMetadata:
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as err:
        raise ContractError(f"{path}: not a readable Parquet file ({err}); delete it and re-run stage one") from err
    if METADATA_KEY not in raw:
        raise ContractError(f"{path}: no minorsft metadata; it was not written by `minorsft precompute`")
    return ShardMetadata.from_json(raw[METADATA_KEY], str(path))


def validate_table(table: pa.Table, source: str) -> None:
    """Row-level checks of the contract on a whole table, vectorised.

    Raises ``ContractError`` naming the first bad row: non-finite ``ref_logp_sum``,
    ``input_ids`` and ``completion_mask`` of different lengths, a mask that is not
    0/1 or not 0 at position 0, ``answer_len != sum(completion_mask)`` or < 1.
    """
    missing = [name for name in ARROW_FIELDS if name not in table.column_names]
    if missing:
        raise ContractError(f"{source}: missing columns {missing}; re-run stage one")
    if table.num_rows == 0:
        return

    def fail(row: int, what: str) -> None:
        sample_id = table.column(SAMPLE_ID)[row].as_py()
        raise ContractError(
            f"{source}: row {row} (sample_id {sample_id!r}): {what}. The shard is corrupt or "
            "was not written by `minorsft precompute`; delete it and re-run stage one"
        )

    ref = table.column(REF_LOGP_SUM).to_numpy()
    # A sum of log-probs is <= 0; allow rounding noise of an engine's fp32 log-softmax.
    bad = np.flatnonzero(~np.isfinite(ref) | (ref > 1e-3))
    if bad.size:
        fail(int(bad[0]), f"ref_logp_sum is {ref[bad[0]]}, must be finite and <= 0")

    ids = table.column(INPUT_IDS).combine_chunks()
    mask = table.column(COMPLETION_MASK).combine_chunks()
    ids_len = ids.value_lengths().to_numpy(zero_copy_only=False)
    mask_len = mask.value_lengths().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(ids_len != mask_len)
    if bad.size:
        fail(int(bad[0]), f"{ids_len[bad[0]]} input_ids but {mask_len[bad[0]]} completion_mask entries")

    values = mask.flatten().to_numpy(zero_copy_only=False)
    offsets = mask.offsets.to_numpy()[:-1] - mask.offsets[0].as_py()
    nonbinary = np.flatnonzero((values != 0) & (values != 1))
    if nonbinary.size:
        row = int(np.searchsorted(offsets, nonbinary[0], side="right") - 1)
        fail(row, "completion_mask holds values other than 0 and 1")
    nonempty = mask_len > 0
    first = np.zeros(len(mask_len), dtype=values.dtype)
    first[nonempty] = values[offsets[nonempty]]
    bad = np.flatnonzero(first != 0)
    if bad.size:
        fail(int(bad[0]), "completion_mask[0] is 1; position 0 has no predicting token")
    row_of_value = np.repeat(np.arange(len(mask_len)), mask_len)
    mask_sum = np.bincount(row_of_value, weights=values, minlength=len(mask_len)).astype(np.int64)
    answer_len = table.column(ANSWER_LEN).to_numpy()
    bad = np.flatnonzero((answer_len != mask_sum) | (answer_len < 1))
    if bad.size:
        row = int(bad[0])
        fail(row, f"answer_len is {answer_len[row]} but completion_mask sums to {mask_sum[row]} (must be >= 1)")


def check_same_run(expected: ShardMetadata, found: ShardMetadata, found_source: str) -> None:
    """Refuse ``found`` if any run field differs from ``expected`` (mixed references,
    tokenizers, templates, lengths, engines or inputs in one directory)."""
    diff = describe_differences(expected.run_fields(), found.run_fields())
    if diff:
        raise ContractError(
            f"{found_source} was written by a different stage-one run than the other shards:\n{diff}\n"
            "One output directory holds one run. Delete the stale shards, or precompute into a new "
            "directory."
        )


@dataclasses.dataclass(frozen=True)
class ScannedOutput:
    """What ``scan_output_dir`` found: a complete, consistent stage-one output."""

    metadata: ShardMetadata  # run fields shared by every shard (chunk fields of shard 0)
    shard_paths: list[Path]
    rows_scored: int
    rows_rejected: int


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def scan_output_dir(output_dir: str | os.PathLike, *, validate_rows: bool = True) -> ScannedOutput:
    """Check a stage-one output directory is complete and consistent; return its shards.

    Complete: every chunk of the input has its shard, every chunk's rows are either in
    the shard or in its rejects file, and the counts agree (scored + rejected = input
    rows). Consistent: every shard has the same run metadata. With ``validate_rows``,
    every row also passes ``validate_table``.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ContractError(f"{output_dir}: no such directory; run `minorsft precompute --output {output_dir}` first")
    paths = sorted(output_dir.glob(SHARD_GLOB))
    if not paths:
        raise ContractError(f"{output_dir}: no {SHARD_GLOB} files; run `minorsft precompute --output {output_dir}` first")
    first = read_shard_metadata(paths[0])
    by_chunk: dict[int, tuple[Path, ShardMetadata]] = {}
    for path in paths:
        meta = read_shard_metadata(path)
        check_same_run(first, meta, str(path))
        if path != shard_path(output_dir, meta.chunk_index):
            raise ContractError(f"{path}: metadata says chunk {meta.chunk_index}; the file was renamed or copied")
        by_chunk[meta.chunk_index] = (path, meta)
    missing = [j for j in range(first.num_chunks) if j not in by_chunk]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ContractError(
            f"{output_dir}: incomplete, {len(missing)} of {first.num_chunks} chunks missing (chunks {shown}). "
            "A stage-one job has not finished: re-run the same `minorsft precompute` command (every "
            "--worker-index of the pool); finished chunks are skipped."
        )
    scored = rejected = 0
    for j in range(first.num_chunks):
        path, meta = by_chunk[j]
        start, stop = meta.chunk_row_range()
        num_rows = pq.ParquetFile(path).metadata.num_rows
        rejects = rejects_path(output_dir, j)
        num_rejects = count_lines(rejects) if rejects.exists() else 0
        if num_rows != meta.rows_scored or num_rejects != meta.rows_rejected:
            raise ContractError(
                f"{path}: holds {num_rows} rows and {rejects.name} {num_rejects} rejects, metadata says "
                f"{meta.rows_scored} and {meta.rows_rejected}; delete both files and re-run stage one"
            )
        if num_rows + num_rejects != stop - start:
            raise ContractError(
                f"{path}: chunk {j} covers input rows {start}..{stop - 1} ({stop - start} rows) but accounts "
                f"for {num_rows} scored + {num_rejects} rejected; delete it and re-run stage one"
            )
        if validate_rows and num_rows:
            validate_table(pq.read_table(path), str(path))
        scored += num_rows
        rejected += num_rejects
    if scored == 0:
        raise ContractError(f"{output_dir}: every input row was rejected; see {REJECTS_GLOB} for the reasons")
    return ScannedOutput(first, [by_chunk[j][0] for j in range(first.num_chunks)], scored, rejected)


# ---- fingerprints -------------------------------------------------------------------------

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "_commit_hash"}


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids: vocabulary, special tokens, chat template.

    Two tokenizers with the same fingerprint turn the same sample into the same ids.
    """
    special = {
        "special_tokens": sorted(tokenizer.all_special_tokens),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
    }
    return _sha256_json(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": special, "chat_template": tokenizer.chat_template}
    )


_SAMPLE_BYTES = 1 << 16  # read per sample point
_SAMPLES_PER_FILE = 16


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """Cheap fingerprint of a checkpoint's weights: O(MB) read, whatever its size.

    Per weight file: size, the safetensors header (names, dtypes, shapes, offsets),
    and 16 blocks of 64 KiB at fixed fractions of the data. Any fine-tuning step
    changes essentially every weight, so two checkpoints of one architecture differ
    in every sampled block; a 15 GB checkpoint is fingerprinted from ~1 MB per file.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors (or *.bin) weight files")
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            data_start = 0
            if path.suffix == ".safetensors":
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(header_len))
                data_start = 8 + header_len
            span = max(size - data_start - _SAMPLE_BYTES, 0)
            for k in range(_SAMPLES_PER_FILE):
                handle.seek(data_start + span * k // max(_SAMPLES_PER_FILE - 1, 1))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Fingerprint of a Hugging Face model directory: its config.json (minus fields that
    record paths or library versions) and ``weights_fingerprint``."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha256_json({"config": config, "weights": weights_fingerprint(model_dir)})


def data_fingerprint(paths: list[Path], options: dict[str, Any]) -> str:
    """Hash of the input files' bytes and the options that decide how they are read."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in sorted(paths):
        digest.update(str(path.name).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
