"""The slides a server shows: found under one root, each with a URL-safe id and its side files.

Ids come from here only; a URL never names a path. A symlink that resolves outside the root is not
listed (a link could otherwise publish any file the server can read).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from slidechat.apps.serve.config import SERVE_SUFFIXES, ServeConfig
from slidechat.utils.errors import SlideChatError, exception_text, one_line
from slidechat.wsi.slide import Slide, slide_id

logger = logging.getLogger(__name__)

#: Seconds after which a listing is walked again even when the root folder's mtime did not change.
RESCAN_S = 30.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UnknownSlide(SlideChatError):
    """A slide id that the catalog does not hold (HTTP 404)."""


@dataclass(frozen=True)
class SlideEntry:
    """One listed slide: its id (the only handle a client has), file and matched side files."""

    id: str
    path: Path
    name: str
    features: Optional[Path]
    screening: Optional[Path]


@dataclass(frozen=True)
class PatchGrid:
    """Patch top-left corners (level-0 px) of a feature file and the patch side in level-0 px."""

    coords: np.ndarray            # (N, 2) int64
    patch_size_level0: int


def url_safe_id(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced, never ``.``/``..``/empty."""
    safe = _UNSAFE.sub("_", name).strip(".") or "slide"
    return safe


def read_patch_grid(path: Path) -> PatchGrid:
    """Coordinates and patch size of an extract-features H5 (``coords`` + its ``patch_size_level0``)."""
    import h5py  # lazy: optional heavy dependency, only when a feature file is read

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise SlideChatError("feature file has no coords dataset", path)
            ds = f["coords"]
            coords = np.asarray(ds[()])
            size = ds.attrs.get("patch_size_level0", f.attrs.get("patch_size_level0"))
            if size is None:
                size = ds.attrs.get("patch_size", f.attrs.get("patch_size"))
    except OSError as e:
        raise SlideChatError(f"cannot read feature file: {exception_text(e)}", path) from e
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SlideChatError(f"coords must be N x 2, got {coords.shape}", path)
    if size is None or int(size) <= 0:
        raise SlideChatError("feature file states no patch_size_level0 on its coords", path)
    return PatchGrid(coords.astype(np.int64), int(size))


def _find_side_file(folder: Optional[Path], names: Tuple[str, ...], subdirs: Tuple[str, ...]) -> Optional[Path]:
    """The first ``folder/<subdir>/<name>`` that is a file."""
    if folder is None:
        return None
    for sub in subdirs:
        for name in names:
            p = folder / sub / name if sub else folder / name
            if p.is_file():
                return p
    return None


class Catalog:
    """The slides under ``config.slides``, rescanned when they may have changed (see :meth:`_refresh`)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.root = Path(config.slides).resolve()
        if not self.root.is_dir():
            raise SlideChatError("slide folder not found", config.slides)
        self._lock = threading.Lock()
        self._mtime: Optional[int] = None
        self._scanned = 0.0
        self._entries: Dict[str, SlideEntry] = {}
        self._info: Dict[Tuple[str, int], Dict[str, Any]] = {}

    # -- listing ---------------------------------------------------------------------------------
    def entries(self) -> List[SlideEntry]:
        """All slides, sorted by id."""
        self._refresh()
        return [self._entries[k] for k in sorted(self._entries)]

    def get(self, slide_id_: str) -> SlideEntry:
        """The entry for ``slide_id_``; :class:`UnknownSlide` when there is none."""
        self._refresh()
        entry = self._entries.get(slide_id_)
        if entry is None:
            raise UnknownSlide(f"unknown slide id {slide_id_!r}")
        return entry

    def _refresh(self) -> None:
        """Rescan when the root's mtime changed (a file added at the top) or, for sub-folders and side
        files, when the last scan is older than :data:`RESCAN_S`."""
        try:
            mtime = self.root.stat().st_mtime_ns
        except OSError as e:
            raise SlideChatError(f"cannot read slide folder: {exception_text(e)}", self.root) from e
        with self._lock:
            now = time.monotonic()
            if mtime != self._mtime or now - self._scanned > RESCAN_S:
                self._entries = self._scan()
                self._mtime, self._scanned = mtime, now

    def _scan(self) -> Dict[str, SlideEntry]:
        found: List[Tuple[Path, Path]] = []  # (path as listed, resolved)
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in sorted(filenames):
                if fn.startswith(".") or not fn.lower().endswith(SERVE_SUFFIXES):
                    continue
                p = Path(dirpath) / fn
                try:
                    real = p.resolve(strict=True)
                except OSError:
                    logger.warning("%s: broken link, not listed", p)
                    continue
                if not real.is_relative_to(self.root):
                    logger.warning("%s: resolves outside the slide folder (%s), not listed", p, real)
                    continue
                if not real.is_file():
                    continue
                found.append((p, real))
        entries: Dict[str, SlideEntry] = {}
        for p, real in found:
            sid = slide_id(p)
            base = url_safe_id(sid)
            uid, n = base, 1
            while uid in entries:
                n += 1
                uid = f"{base}-{n}"
            if uid != sid:
                logger.info("%s: listed as id %s", p, uid)
            feats = screen = None
            if n == 1:  # side files are named by slide id: a second slide of that name would borrow them
                feats = _find_side_file(self.config.features, (f"{sid}.h5", f"{sid}.hdf5"), ("", "h5_files"))
                screen = _find_side_file(self.config.screening, (f"{sid}.csv",), ("fields",))
            elif self.config.features is not None or self.config.screening is not None:
                logger.warning("%s: another slide is also named %s; its feature/screening files are not "
                               "matched to this one", p, sid)
            entries[uid] = SlideEntry(uid, real, p.name, feats, screen)
        logger.debug("catalog: %d slides under %s", len(entries), self.root)
        return entries

    # -- details ---------------------------------------------------------------------------------
    def info(self, slide_id_: str) -> Dict[str, Any]:
        """Size, resolution and side files of a slide; a slide that cannot be read says why in ``error``."""
        entry = self.get(slide_id_)
        try:
            mtime = entry.path.stat().st_mtime_ns
        except OSError:
            mtime = -1
        key = (entry.id, mtime)
        with self._lock:
            cached = self._info.get(key)
        if cached is not None:
            return dict(cached)
        out: Dict[str, Any] = {"id": entry.id, "name": entry.name, "width": None, "height": None, "mpp": None,
                               "objective": None, "levels": None, "vendor": None,
                               "has_features": entry.features is not None, "n_patches": None,
                               "has_screening": entry.screening is not None, "error": None}
        try:
            with Slide(entry.path) as s:
                out.update(width=int(s.dimensions[0]), height=int(s.dimensions[1]), mpp=s.mpp,
                           objective=s.objective, levels=int(s.level_count), vendor=s.vendor)
        except Exception as e:  # any unreadable file is shown, not fatal: the page says why
            if isinstance(e, SlideChatError):
                why = e.reason + (f" ({e.hint})" if e.hint else "")
            else:
                why = exception_text(e).replace(str(entry.path), entry.name)
            out["error"] = one_line(f"{entry.name}: {why}", 300)  # the name only: server paths stay private
            logger.warning("%s: %s", entry.path, why)
        if entry.features is not None:
            try:
                out["n_patches"] = int(len(read_patch_grid(entry.features).coords))
            except SlideChatError as e:
                logger.warning("%s", e)
        with self._lock:
            self._info[key] = out
        return dict(out)
