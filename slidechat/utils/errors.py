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
