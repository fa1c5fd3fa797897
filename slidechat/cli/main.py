"""``slidechat`` console script: one subcommand per module in this package.

Each subcommand module defines ``register(subparsers)`` that adds its parser and sets ``func``
(a callable taking the parsed namespace and returning an exit code). Heavy imports (torch,
transformers, openslide) stay inside ``func`` so ``slidechat --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from slidechat.utils.errors import SlideChatError
from slidechat.utils.logging import setup_cli_logging
from slidechat.utils.version import __version__

# Order = order in --help. A module listed here that does not exist yet is skipped.
SUBCOMMAND_MODULES = ["extract", "train", "export", "test", "infer", "eval", "screen", "chat", "serve", "demo"]

logger = logging.getLogger("slidechat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidechat",
        description="slidechat: pathology vision-language toolkit for two families of models:\n"
                    "  slides    whole-slide images (SlideChat: patch features -> LongNet slide encoder\n"
                    "            -> LLM; SlideBench testing)\n"
                    "  cytology  cytology fields of view and slides (CytoChat on Qwen2-VL: batch\n"
                    "            predictions, slide screening, grounded cells)\n"
                    "Training, export, scoring and chat serve both. [slides] / [cytology] below say\n"
                    "which family a command is for.",
        epilog="Slides (SlideChat): extract-features -> train -> export -> test / chat -> eval.\n"
               "Cytology (CytoChat, Qwen2-VL): train -> export -> infer / screen / chat -> eval.\n"
               "`slidechat train CONFIG` runs `xtuner train` and returns its real exit status (use\n"
               "it in scripts); `slidechat demo` runs both families end to end on CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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


#: OSErrors that are always about a path the user gave (even when the exception carries no filename)
_PATH_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError, FileExistsError)


def os_error_line(e: OSError) -> Optional[str]:
    """``<path>: <strerror>`` for an OSError about a file or folder (a read-only folder, a file where a
    folder belongs, ...); ``None`` for other OSErrors, which are not the user's input and still raise."""
    if e.filename is None and not isinstance(e, _PATH_ERRORS):
        return None
    reason = e.strerror or str(e)
    if e.filename is None:
        return reason
    where = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else str(e.filename)
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {reason}"


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
        logger.error("%s", e, exc_info=True if args.verbose else None)
        return 1
    except OSError as e:
        line = os_error_line(e)
        if line is None:  # not about a path: a programming or system error, shown in full
            raise
        logger.error("%s", line, exc_info=True if args.verbose else None)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
