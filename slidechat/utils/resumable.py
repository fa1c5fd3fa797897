"""The one resumable-writer protocol: append-only outputs, fsynced per batch, resumable after kill -9.

Items carry a 0-based ``position`` in the input; a writer is opened on the whole input and tells how
many leading positions are already written (``done``); the caller hands it the next pending items in
order (``write``), appended as one write + flush + ``fsync``; ``close`` releases the file. Writing in
input order makes "done" a prefix, so a resumed run neither repeats nor skips a row. The writers that
follow it: :class:`slidechat.inference.writers.JsonlPredictionWriter` (predictions JSONL) and
:class:`slidechat.data.slidebench.SlideBenchWriter` (SlideBench answer CSVs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from slidechat.utils.errors import SlideChatError
from slidechat.utils.locks import lock_handle, unlock_handle
from slidechat.utils.paths import PathLike


@runtime_checkable
class ResultWriter(Protocol):
    """What the inference loop needs from a writer (see module doc)."""

    path: Path
    done: int  # positions 0 .. done-1 are already in the output

    @property
    def num_pending(self) -> int: ...

    def write(self, items: Sequence[Any]) -> None: ...

    def close(self) -> None: ...


class AppendOnlyFile:
    """An exclusively locked file opened for appending; ``append`` is one write + flush + fsync."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "ab")
        # a second writer on the same output is refused, not interleaved
        if not lock_handle(self._fh):
            self._fh.close()
            raise SlideChatError("another process is writing this output", self.path,
                                 hint="use one output file (or one shard) per process")

    def append(self, data: bytes) -> None:
        if self._fh is None:
            raise SlideChatError("writer is closed", self.path)
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            unlock_handle(self._fh)
            self._fh.close()
            self._fh = None  # type: ignore[assignment]

    @property
    def closed(self) -> bool:
        return self._fh is None


def truncate_file(path: PathLike, size: int) -> None:
    """Cut ``path`` to ``size`` bytes, durably (used to drop a torn last record)."""
    with open(path, "r+b") as fh:
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())
