"""Which checkpoint under ``OUTPUT/checkpoints`` is committed, and what it was written by.

A checkpoint is the directory ``step-NNNNNNNN/`` (every rank's ZeRO partition,
optimizer and RNG state, written through ``train.engine``) plus ``minorsft.json`` in
it, which rank 0 writes only after a barrier, once every rank's files exist. It is
*committed* when ``latest`` (DeepSpeed's own name, so its tools such as
``zero_to_fp32.py`` still find it) names it; ``latest`` is replaced atomically after
the tag's files are flushed to the disk. A kill at any instant therefore leaves
``latest`` naming a whole checkpoint, or no ``latest`` at all. Tags newer than the
committed one are the remains of a save cut short: never loaded, removed at the next
start.

``minorsft.json`` records what a resume must know before loading anything: the
step, the world size and ZeRO stage that wrote it (a different world size resumes
through DeepSpeed's universal format, see ``train.engine``) and the stage-one shards'
run metadata (re-generated shards are refused).

Nothing here imports torch or deepspeed: ``train.run`` reads the record before any
accelerator work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from minorsft_core.atomic import fsync_path, write_text_atomic

LATEST = "latest"
RECORD = "minorsft.json"
TAG_PREFIX = "step-"
UNIVERSAL_PREFIX = "universal-"  # a committed tag converted for another world size


def tag_name(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _tags(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir())


def committed(root: Path) -> dict | None:
    """The committed checkpoint's record (with its ``tag``), or None: a fresh start."""
    latest = root / LATEST
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    record_path = root / tag / RECORD
    if not record_path.exists():
        raise FileNotFoundError(
            f"{latest} names {tag}, which has no {RECORD}: not written by this version of minorsft train, "
            f"or edited by hand. Delete {root} to start fresh")
    return {**json.loads(record_path.read_text()), "tag": tag}


def commit(root: Path, tag: str, record: dict) -> None:
    """Rank 0, after a barrier that every rank reached with its files written: make
    ``tag`` the checkpoint a re-run resumes from."""
    directory = root / tag
    write_text_atomic(directory / RECORD, json.dumps(record, indent=2) + "\n")
    # The ranks' files may still sit in the page cache: flush them before `latest`
    # names them, so that even a crash of the machine cannot commit a torn checkpoint.
    for path in sorted(directory.rglob("*")):
        fsync_path(path)
    fsync_path(directory)
    write_text_atomic(root / LATEST, tag + "\n")


def rotate(root: Path, keep: int) -> None:
    """Rank 0, after a commit: keep the newest ``keep`` tags up to the committed one;
    remove older tags and universal conversions of tags other than the committed one."""
    record = committed(root)
    if record is None:
        return
    done = [p for p in _tags(root) if p.name <= record["tag"]]
    doomed = done[:-keep] + [p for p in root.glob(f"{UNIVERSAL_PREFIX}*") if p.name != universal_name(record["tag"])]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def remove_uncommitted(root: Path, keep: int) -> None:
    """Rank 0, before anything is loaded: remove what a kill left behind (tags newer than
    the committed one: saves cut short; temporary files and conversions), then rotate."""
    if not root.is_dir():
        return
    record = committed(root)
    for path in _tags(root):
        if record is None or path.name > record["tag"]:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".*.tmp*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    rotate(root, keep)


def universal_name(tag: str) -> str:
    return UNIVERSAL_PREFIX + tag
