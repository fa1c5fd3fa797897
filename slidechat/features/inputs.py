"""Turn the user's input (folder, glob, CSV/text list, or single file) into a list of slide paths,
and split that list across ranks."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from slidechat.utils.errors import SlideChatError
from slidechat.wsi.slide import SLIDE_SUFFIXES

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
LIST_SUFFIXES = (".csv", ".txt", ".lst")


def collect_slide_paths(inputs: Union[PathLike, Sequence[PathLike]], recursive: bool = False) -> List[Path]:
    """Slide paths from folders (files with a slide/image suffix), globs, lists or single files.

    CSV lists need a ``path`` or ``slide_path`` column (relative paths are taken relative to the
    CSV's folder); text lists hold one path per line (``#`` comments). Order is kept, duplicates
    dropped.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: List[Path] = []
    for item in inputs:
        out.extend(_expand(item, recursive))
    seen, uniq = set(), []
    for p in out:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def _expand(item: PathLike, recursive: bool) -> List[Path]:
    p = Path(item)
    if p.is_dir():
        it = p.rglob("*") if recursive else p.iterdir()
        found = sorted(q for q in it if q.is_file() and not q.name.startswith(".")
                       and q.suffix.lower() in SLIDE_SUFFIXES)
        if not found:
            raise SlideChatError("folder holds no slide files", p,
                                 hint="known suffixes: " + " ".join(SLIDE_SUFFIXES))
        return found
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return _from_csv(p)
        if p.suffix.lower() in (".txt", ".lst"):
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
            return [_resolve(ln, p.parent) for ln in lines if ln and not ln.startswith("#")]
        return [p]
    matches = sorted(glob.glob(str(item), recursive=True))
    if not matches:
        raise SlideChatError("no such file or folder, and no file matches it as a glob", str(item))
    return [Path(m) for m in matches if Path(m).is_file()]


def _resolve(s: str, base: Path) -> Path:
    q = Path(s).expanduser()
    return q if q.is_absolute() else base / q


def _from_csv(p: Path) -> List[Path]:
    import pandas as pd

    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as e:
        raise SlideChatError(f"cannot read slide list: {e}", p) from e
    col = next((c for c in ("path", "slide_path") if c in df.columns), None)
    if col is None:
        raise SlideChatError(f"slide list CSV needs a 'path' or 'slide_path' column "
                             f"(has: {', '.join(df.columns)})", p)
    return [_resolve(s, p.parent) for s in df[col] if s.strip()]


def rank_and_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """Explicit values win; else torchrun's ``RANK``/``WORLD_SIZE``; else (0, 1)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise SlideChatError(f"invalid rank {rank} for world size {world_size}",
                             hint="need 0 <= --rank < --world-size")
    return rank, world_size


def shard(items: Sequence, rank: int, world_size: int) -> List:
    """Round-robin share of ``items`` for ``rank``: every item goes to exactly one rank."""
    return list(items[rank::world_size])


def limit(items: Iterable, n: Optional[int]) -> List:
    items = list(items)
    return items if n is None or n <= 0 else items[:n]
