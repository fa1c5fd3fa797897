"""``slidechat`` console script: one subcommand per module in this package.

Each subcommand module defines ``register(subparsers)`` that adds its parser and sets ``func``
(a callable taking the parsed namespace and returning an exit code). Heavy imports (torch,
transformers, openslide) stay inside ``func`` so ``slidechat --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from slidechat import __version__
from slidechat.utils.errors import SlideChatError
from slidechat.utils.logging import setup_cli_logging

# Order = order in --help. A module listed here that does not exist yet is skipped.
SUBCOMMAND_MODULES = ["extract", "train", "export", "test", "infer", "eval", "screen", "chat", "demo"]

logger = logging.getLogger("slidechat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidechat",
        description="slidechat: whole-slide pathology vision-language toolkit "
                    "(feature extraction, SlideBench testing and scoring, chat, export).",
        epilog="Training: `slidechat train CONFIG` runs `xtuner train` and returns its real exit "
               "status (use it in scripts); see README.md.")
    parser.add_argument("--version", action="version", version=f"slidechat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(f"slidechat.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"slidechat.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_cli_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except SlideChatError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
