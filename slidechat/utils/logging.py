"""Logging set-up for the command-line entry points (the library itself only calls getLogger).

stdout carries a command's results only (answers, JSON lines, tables, paths), so scripts can pipe
them; every log line goes to stderr. mmengine's ``MMLogger`` binds its console handler to
``sys.stdout`` when an instance is created, so :func:`route_mmengine_logs_to_stderr` makes instances
bind stderr instead (and moves existing ones).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any


def setup_cli_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _to_stderr(logger: logging.Logger) -> None:
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)


def route_mmengine_logs_to_stderr() -> None:
    """mmengine's console log lines go to stderr, for loggers made before and after this call.

    Called by the commands that build mmengine objects (configs, runners) and print results on
    stdout (``chat``, ``test``, ``export``); importing mmengine is left to them (it is heavy).
    """
    try:
        from mmengine.logging import MMLogger
    except ImportError:  # pragma: no cover - mmengine is a dependency of the engine
        return
    for inst in list(getattr(MMLogger, "_instance_dict", {}).values()):
        _to_stderr(inst)
    init = MMLogger.__init__
    if getattr(init, "_slidechat_stderr", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with contextlib.redirect_stdout(sys.stderr):  # MMLogger's handler binds sys.stdout at creation
            init(self, *args, **kwargs)

    __init__._slidechat_stderr = True  # type: ignore[attr-defined]
    MMLogger.__init__ = __init__  # type: ignore[method-assign]
