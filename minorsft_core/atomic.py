"""Files that are either whole or absent, whatever instant the process is killed at.

The new content goes to a temporary file in the same directory (so the rename stays
on one file system), is fsynced, and replaces the old file with ``os.replace``, which
POSIX makes atomic; the directory is fsynced too so the rename survives a crash of the
machine. A reader, or a re-run after SIGKILL, sees the old file or the new one, never
a truncated mix. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an
    error it becomes ``path`` atomically, otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
