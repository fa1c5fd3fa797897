"""The one resumable-writer protocol: append-only outputs, fsynced per batch, resumable after kill -9.

Items carry a 0-based ``position`` in the input; a writer is opened on the whole input and tells how
many leading positions are already written (``done``); the caller hands it the next pending items in
order (``write``), appended as one write + flush + ``fsync``; ``close`` releases the file. Writing in
input order makes "done" a prefix, so a resumed run neither repeats nor skips a row. The writers that
follow it: :class:`slidechat.inference.writers.JsonlPredictionWriter` (predictions JSONL) and
:class:`slidechat.data.slidebench.SlideBenchWriter` (SlideBench answer CSVs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError
from slidechat.utils.locks import lock_handle, unlock_handle
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


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


class ResumableWriter:
    """What every writer of the protocol shares: the counts, the torn-tail rule, ``with`` support.

    A subclass sets ``path`` and ``done``, says how many positions it owns (:meth:`positions`), appends
    through an :class:`AppendOnlyFile` and closes it in :meth:`close`.
    """

    path: Path
    done: int = 0
    _file: Optional[AppendOnlyFile] = None

    def positions(self) -> int:
        raise NotImplementedError

    def _validate_existing(self) -> int:
        """How many leading positions an existing output already holds (refusing another input's)."""
        raise NotImplementedError

    def open_output(self, header: bytes, overwrite: bool) -> None:
        """Start the output afresh (``header`` only) or resume it (:meth:`_validate_existing`), then
        hold it open for appending, locked."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not self.path.exists():  # an empty file resumes (its writer may hold it)
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(header)
            self.done = 0
        else:
            self.done = self._validate_existing()
        self._file = AppendOnlyFile(self.path)
        if self.done:
            logger.info("%s: resuming after %d/%d rows", self.path, self.done, self.positions())

    def append(self, data: bytes) -> None:
        if self._file is None:
            raise SlideChatError("writer is closed", self.path)
        self._file.append(data)

    @property
    def num_pending(self) -> int:
        return self.positions() - self.done

    @property
    def complete(self) -> bool:
        return self.num_pending == 0

    def drop_torn_tail(self, size: int, good_end: int, what: str) -> None:
        """Cut a last ``what`` that a kill left half-written (``good_end`` < ``size`` bytes), durably."""
        if good_end < size:
            logger.warning("%s: dropping a torn last %s (%d bytes)", self.path, what, size - good_end)
            truncate_file(self.path, good_end)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
