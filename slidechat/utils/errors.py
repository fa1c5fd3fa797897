"""One error type that always names the file and the problem, so CLIs can print it on one line."""

from __future__ import annotations

import os
from typing import Optional, Union


class SlideChatError(Exception):
    """A user-facing error: ``<path>: <reason>``."""

    def __init__(self, reason: str, path: Optional[Union[str, os.PathLike]] = None,
                 hint: Optional[str] = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        self.hint = hint
        msg = reason if self.path is None else f"{self.path}: {reason}"
        if hint:
            msg = f"{msg} ({hint})"
        super().__init__(msg)


def exception_text(exc: BaseException) -> str:
    """``Type: message`` of an error that is not ours (just ``Type`` when it has no message)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def one_line(text: str, limit: Optional[int] = None) -> str:
    """``text`` for one console line or one CSV cell: its lines joined by spaces, blank ones dropped,
    cut to ``limit`` characters (ending in ``...``) when given."""
    out = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if limit is not None and len(out) > limit:
        out = out[:limit - 3] + "..."
    return out
