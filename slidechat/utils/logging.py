"""Logging set-up for the command-line entry points (the library itself only calls getLogger)."""

from __future__ import annotations

import logging


def setup_cli_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
