"""Stage-one shards to micro-batches (right-padded, or packed into one padding-free row),
in a deterministic, length-grouped order.

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
import pyarrow.compute as pc
import torch

from minorsft_core.batching import ModelInputs, pack, pad_right, to_device, token_budget_groups
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
    """Token count of every row, from the Arrow list offsets of each chunk: no token id
    is read or copied (``combine_chunks`` would copy them all into RAM on every rank)."""
    return pc.list_value_length(dataset.data.column(INPUT_IDS)).to_numpy().astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a global batch is cut: ``world * accumulation`` micro-batches of ``micro``
    samples, or (``max_tokens``) micro-batches of as many samples as fit that many tokens."""

    global_batch: int
    micro: int
    world: int
    max_tokens: int | None = None  # token budget of a micro-batch; its sample count then varies
    packed: bool = False  # a micro-batch is one padding-free row (costs its tokens, not count x longest)

    def __post_init__(self):
        unit, what = (self.world, "") if self.max_tokens else (self.micro * self.world, f"micro batch {self.micro} x ")
        if self.global_batch % unit:
            raise ConfigError(
                f"global batch {self.global_batch} is not a multiple of {what}{self.world} ranks; pick "
                "--global-batch-size, --micro-batch-size and the rank count so it is"
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank per step with a fixed micro size (1 with a token budget,
        where the count varies by step: what DeepSpeed's config is told)."""
        return 1 if self.max_tokens else self.global_batch // (self.micro * self.world)


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
    long and short ones (and takes about the same time per step). With a token budget
    the micro-batches are filled greedily (``token_budget_groups``); every rank must
    run as many forwards as the others (ZeRO-3 gathers parameters in each), so the
    largest micro-batches are halved until their count divides by the rank count.
    """
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    if layout.max_tokens is None:
        micros = [rows[k:k + layout.micro] for k in range(0, len(rows), layout.micro)]
    else:
        groups = token_budget_groups(lengths[rows].tolist(), layout.max_tokens, packed=layout.packed)
        micros = [rows[group[0]:group[-1] + 1] for group in groups]
        while len(micros) % layout.world:
            widest = max(range(len(micros)), key=lambda k: len(micros[k]))
            half = (len(micros[widest]) + 1) // 2
            micros[widest:widest + 1] = [micros[widest][:half], micros[widest][half:]]
    return [micros[rank::layout.world] for rank in range(layout.world)]


def padding_fraction(plan: list[list[np.ndarray]], lengths: np.ndarray, packed: bool = False) -> float:
    """Share of the token grid, over all ranks' micro-batches, that is padding (0 packed)."""
    if packed:
        return 0.0
    real = padded = 0
    for micros in plan:
        for rows in micros:
            real += int(lengths[rows].sum())
            padded += int(lengths[rows].max()) * len(rows)
    return 1.0 - real / padded


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch: the model's inputs (a ``[B, T]`` padded grid or a ``[1, N]``
    packed row, ``batching.ModelInputs``) and the ``[B]`` per-sample vectors."""

    inputs: ModelInputs
    answer_len: torch.Tensor
    ref_logp_sum: torch.Tensor

    def to(self, device) -> MicroBatch:
        return MicroBatch(self.inputs.to(device), to_device(self.answer_len, device), to_device(self.ref_logp_sum, device))


def collate(dataset, rows: np.ndarray, pad_token_id: int, *, packed: bool = False) -> MicroBatch:
    return batch_records(dataset[[int(r) for r in rows]], pad_token_id, packed=packed)


def batch_records(records: dict[str, list], pad_token_id: int, *, packed: bool = False) -> MicroBatch:
    """A batch given column-wise (``TRAIN_COLUMNS`` -> one list per column), right-padded or packed."""
    inputs = pack(records[INPUT_IDS], records[COMPLETION_MASK]) if packed else \
        pad_right(records[INPUT_IDS], records[COMPLETION_MASK], pad_token_id)
    return MicroBatch(
        inputs=inputs,
        answer_len=torch.as_tensor(records[ANSWER_LEN], dtype=torch.float32),
        # float64 as stored: a 4,000-token sum of ~-5,000 nats keeps its last digits.
        ref_logp_sum=torch.as_tensor(records[REF_LOGP_SUM], dtype=torch.float64),
    )
