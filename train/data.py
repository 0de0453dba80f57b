"""Stage-one shards to padded micro-batches, in a deterministic, length-grouped order.

The plan of an optimizer step (which samples, split into which micro-batches, on
which rank) is a pure function of the seed, the epoch and the step's position in it,
computed identically on every rank. So every rank knows the *global* batch's sample
and token counts without communicating (the loss normalisers), and resuming at step
k only means skipping k global batches.

Nothing here imports deepspeed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from minorsft_core.errors import ConfigError
from minorsft_core.schema import ANSWER_LEN, COMPLETION_MASK, INPUT_IDS, REF_LOGP_SUM, ScannedOutput

# Samples sorted by length together: large enough that neighbours have similar
# lengths, small enough that a global batch still mixes the data set (HF's
# LengthGroupedSampler uses 50 batches for the same trade-off).
MEGABATCH_STEPS = 50


# The columns stage two trains on.
TRAIN_COLUMNS = (INPUT_IDS, COMPLETION_MASK, ANSWER_LEN, REF_LOGP_SUM)


def open_shards(scanned: ScannedOutput, cache_dir: str | Path | None, columns=TRAIN_COLUMNS):
    """The scanned shards as one memory-mapped ``datasets.Dataset`` (an Arrow file on disk,
    built once under ``cache_dir`` and reused by every rank and every resume; None: the
    ``datasets`` cache)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_parquet(
        [str(path) for path in scanned.shard_paths],
        columns=list(columns),
        cache_dir=None if cache_dir is None else str(cache_dir),
        keep_in_memory=False,
    )


def sequence_lengths(dataset) -> np.ndarray:
    """Token count of every row, read from the Arrow list offsets (no row is decoded)."""
    column = dataset.data.column(INPUT_IDS).combine_chunks()
    return column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a global batch is cut: ``world * accumulation`` micro-batches of ``micro`` samples."""

    global_batch: int
    micro: int
    world: int

    def __post_init__(self):
        if self.global_batch % (self.micro * self.world):
            raise ConfigError(
                f"global batch {self.global_batch} is not a multiple of micro batch {self.micro} x "
                f"{self.world} ranks; pick --global-batch-size, --micro-batch-size and the rank count so it is"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro * self.world)


def epoch_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch, each an array of row indices, in training order.

    Shuffle by (seed, epoch); sort each megabatch by length so a global batch holds
    samples of similar length; shuffle the batches' order again. A last incomplete
    global batch is dropped: every step then has exactly ``global_batch`` samples.
    Depends on the global batch size only, not on how it is cut across micro-batches
    and ranks (what makes rank and accumulation invariance hold).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    usable = len(order) - len(order) % global_batch
    mega = global_batch * MEGABATCH_STEPS
    batches = []
    for start in range(0, usable, mega):
        block = order[start:min(start + mega, usable)]
        block = block[np.argsort(-lengths[block], kind="stable")]
        batches.extend(block[k:k + global_batch] for k in range(0, len(block), global_batch))
    return [batches[k] for k in rng.permutation(len(batches))]


def split_global_batch(rows: np.ndarray, lengths: np.ndarray, layout: Layout) -> list[list[np.ndarray]]:
    """``plan[rank][slot]``: the rows of each micro-batch.

    Rows are length-sorted inside a global batch, so consecutive micro-batches pad
    little; micro-batch k goes to rank k % world, so every rank gets the same mix of
    long and short ones (and takes about the same time per step).
    """
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    micros = [rows[k:k + layout.micro] for k in range(0, len(rows), layout.micro)]
    return [micros[rank::layout.world] for rank in range(layout.world)]


def padding_fraction(plan: list[list[np.ndarray]], lengths: np.ndarray) -> float:
    """Share of the padded token grid, over all ranks' micro-batches, that is padding."""
    real = padded = 0
    for micros in plan:
        for rows in micros:
            real += int(lengths[rows].sum())
            padded += int(lengths[rows].max()) * len(rows)
    return 1.0 - real / padded


@dataclasses.dataclass
class MicroBatch:
    """Right-padded tensors of one micro-batch: ``[B, T]`` grids and ``[B]`` vectors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    answer_len: torch.Tensor
    ref_logp_sum: torch.Tensor

    def to(self, device) -> MicroBatch:
        return MicroBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def collate(dataset, rows: np.ndarray, pad_token_id: int) -> MicroBatch:
    return pad_records(dataset[[int(r) for r in rows]], pad_token_id)


def pad_records(records: dict[str, list], pad_token_id: int) -> MicroBatch:
    """Right-pad a batch given column-wise (``TRAIN_COLUMNS`` -> one list per column)."""
    size = len(records[INPUT_IDS])
    width = max(len(ids) for ids in records[INPUT_IDS])
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    completion_mask = torch.zeros((size, width), dtype=torch.long)
    for b, (ids, mask) in enumerate(zip(records[INPUT_IDS], records[COMPLETION_MASK], strict=True)):
        input_ids[b, :len(ids)] = torch.as_tensor(ids)
        attention_mask[b, :len(ids)] = 1
        completion_mask[b, :len(mask)] = torch.as_tensor(mask)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        answer_len=torch.as_tensor(records[ANSWER_LEN], dtype=torch.float32),
        # float64 as stored: a 4,000-token sum of ~-5,000 nats keeps its last digits.
        ref_logp_sum=torch.as_tensor(records[REF_LOGP_SUM], dtype=torch.float64),
    )
