"""Turn the user's input (folder, glob, CSV/text list, or single file) into a list of slide paths,
and split that list across ranks."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.wsi.slide import SLIDE_SUFFIXES, slide_id

logger = logging.getLogger(__name__)

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
    for p in _one_per_dicom_series(out):
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def _one_per_dicom_series(paths: List[Path]) -> List[Path]:
    """A DICOM whole-slide image is several ``.dcm`` files in one folder (pyramid levels, label,
    overview); OpenSlide opens the whole slide from any of them. Keep one entry per folder (the largest
    file, normally level 0) so the slide is extracted once, not once per file. A folder whose files
    belong to different series is an error: which files make which slide cannot be guessed."""
    groups: dict = {}
    order: List[object] = []
    for p in paths:
        key: object = ("dcm", os.path.abspath(Path(p).parent)) if Path(p).suffix.lower() == ".dcm" else p
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(Path(p))
    out: List[Path] = []
    for key in order:
        files = groups[key]
        if not (isinstance(key, tuple) and key[0] == "dcm"):
            out.extend(files)
            continue
        series = {u for u in (dicom_series_uid(f) for f in files) if u}
        if len(series) > 1:
            raise SlideChatError(f"folder holds {len(series)} DICOM series ({len(files)} .dcm files); "
                                 "one folder must hold one slide", files[0].parent,
                                 hint="put each slide's .dcm files in a folder of its own")
        out.append(max(files, key=lambda f: (f.stat().st_size if f.exists() else 0, str(f))))
        if len(files) > 1:
            logger.info("%s: %d DICOM files of one slide", files[0].parent, len(files))
    return out


#: DICOM value representations with a 4-byte length after 2 reserved bytes (explicit VR little endian)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                       b"UV"))


def dicom_series_uid(path: PathLike, max_bytes: int = 1 << 20) -> Optional[str]:
    """SeriesInstanceUID (0020,000E) of a DICOM file, read from its header without a DICOM library, or
    None when the file is not explicit-VR little-endian DICOM or the tag is absent.

    Walks top-level elements (skipping sequences by their length or delimiters) until group 0x0020.
    """
    import struct

    try:
        with open(path, "rb") as fh:
            buf = fh.read(max_bytes)
    except OSError:
        return None
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    pos, n = 132, len(buf)
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", buf, pos)
        vr = buf[pos + 4:pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            return None  # implicit VR or something unexpected: no guess
        if vr in _LONG_VRS:
            if pos + 12 > n:
                return None
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            start = pos + 8
        if (group, elem) == (0x0020, 0x000E):
            return buf[start:start + length].rstrip(b"\0 ").decode("ascii", "replace") or None
        if group > 0x0020 or (group == 0x0020 and elem > 0x000E):
            return None
        if length == 0xFFFFFFFF:  # undefined length: find the matching sequence delimiter
            end = _skip_undefined(buf, start)
            if end is None:
                return None
            pos = end
        else:
            pos = start + length
    return None


def _skip_undefined(buf: bytes, pos: int) -> Optional[int]:
    """Position after the (FFFE,E0DD) delimiter that closes the sequence starting at ``pos``."""
    import struct

    depth = 1
    n = len(buf)
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group == 0xFFFE:
            length = struct.unpack_from("<I", buf, pos + 4)[0]
            if elem == 0xE0DD:
                depth -= 1
                pos += 8
                if depth == 0:
                    return pos
                continue
            if elem == 0xE000 and length != 0xFFFFFFFF:
                pos += 8 + length  # a defined-length item
                continue
            pos += 8  # item of undefined length, or item delimiter
            continue
        vr = buf[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            pos += 12
            if length == 0xFFFFFFFF:
                depth += 1
                continue
            pos += length
        else:
            pos += 8 + struct.unpack_from("<H", buf, pos + 6)[0]
    return None


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


def unique_shard(paths: Sequence[Path], rank: int, world_size: int
                 ) -> Tuple[List[Path], List[Dict[str, str]]]:
    """This rank's share of ``paths`` after dropping repeated slide ids (outputs are named by id).

    Decided identically on every rank, so a slide goes to exactly one rank; the first path of an id
    wins. Returns ``(mine, failures)``: one ``{slide, path, stage, reason}`` failure row per dropped
    duplicate, reported by rank 0 only so a sharded run lists it once.
    """
    failures: List[Dict[str, str]] = []
    seen: Dict[str, Path] = {}
    jobs: List[Path] = []
    for p in paths:
        sid = slide_id(p)
        if sid in seen:
            if rank == 0:
                failures.append({"slide": sid, "path": str(p), "stage": "input",
                                 "reason": f"duplicate slide id (also {seen[sid]})"})
            continue
        seen[sid] = p
        jobs.append(p)
    return shard(jobs, rank, world_size), failures


def limit(items: Iterable, n: Optional[int]) -> List:
    items = list(items)
    return items if n is None or n <= 0 else items[:n]
