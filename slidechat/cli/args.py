"""Argument groups shared by several subcommands (kept free of heavy imports: every CLI call builds
all parsers)."""

from __future__ import annotations

from typing import Any


def add_slide_run_arguments(group: Any, overwrite_help: str) -> None:
    """``--overwrite --rank --world-size --limit --recursive --no-progress`` of the commands that run
    over a list of slides (``extract-features``, ``screen``), so both shard and resume the same way.

    ``group`` is an ``argparse`` parser or argument group; ``overwrite_help`` says what gets redone.
    """
    group.add_argument("--overwrite", action="store_true", help=overwrite_help)
    group.add_argument("--rank", type=int, help="this shard (default: $RANK or 0)")
    group.add_argument("--world-size", type=int, help="number of shards (default: $WORLD_SIZE or 1)")
    group.add_argument("--limit", type=int, help="only the first N slides of the list")
    group.add_argument("--recursive", action="store_true", help="search input folders recursively")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_trust_remote_code_argument(group: Any) -> None:
    """``--trust-remote-code`` of every command that loads a Hugging Face folder (off by default; the
    rule is :mod:`slidechat.model.hf_folder`'s, whose refusal names this flag)."""
    group.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true",
                       help="let a Hugging Face model folder run its own Python code (an auto_map entry in "
                            "its config, tokenizer or processor files). Off by default: such a folder is "
                            "refused with one line and nothing is asked on stdin. Give it only for folders "
                            "whose code you have read")
