"""Advisory file locks (POSIX ``flock``): the one lock helper of the project.

Used to refuse a second writer on one output (``slidechat infer``/``test`` appenders) and to share
work between jobs on one output folder (``extract-features`` takes one lock per slide, so two jobs of a
re-queued cluster array split the slides instead of both redoing them). The kernel drops a lock when
its process dies (kill -9 included), so a crashed job never leaves a stale lock behind; lock files
themselves are never deleted (deleting a lock file while another process waits on it breaks it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO, Iterator, Optional

from slidechat.utils.paths import PathLike

try:  # POSIX advisory lock
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, one writer per output is on the user
    fcntl = None  # type: ignore[assignment]


def lock_handle(fh: IO, blocking: bool = False) -> bool:
    """Take an exclusive lock on an open file; ``False`` when another process holds it (non-blocking)."""
    if fcntl is None:  # pragma: no cover
        return True
    flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fh.fileno(), flags)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (11, 13):  # EAGAIN / EACCES: held elsewhere (some filesystems say EACCES)
            return False
        raise
    return True


def unlock_handle(fh: IO) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class FileLock:
    """An exclusive lock held on ``path`` (created if absent, never deleted).

    ``acquire()`` returns ``False`` when another process holds it (unless ``blocking``); ``release()``
    (or leaving the ``with`` block) lets it go.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._fh: Optional[IO] = None

    def acquire(self, blocking: bool = False) -> bool:
        if self._fh is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "ab")
        if not lock_handle(fh, blocking=blocking):
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            unlock_handle(self._fh)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FileLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def try_lock(path: PathLike) -> Iterator[bool]:
    """``with try_lock(p) as got:`` -- ``got`` is whether this process now holds the lock on ``p``."""
    lock = FileLock(path)
    got = lock.acquire(blocking=False)
    try:
        yield got
    finally:
        lock.release()
