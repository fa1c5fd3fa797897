"""DeepZoom tiles and thumbnails of the catalog's slides, from OpenSlide's DeepZoomGenerator.

Slides are opened on first use and kept (a bounded number); encoded JPEG tiles sit in one LRU cache
with a byte budget, so a viewer panning back and forth costs no decoding. OpenSlide handles are safe
to share between threads; PIL-backed plain images are read under a per-slide lock.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ContextManager, Hashable, Optional, Tuple

from slidechat.apps.serve.catalog import SlideEntry
from slidechat.utils.errors import SlideChatError, exception_text

logger = logging.getLogger(__name__)

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
THUMBNAIL_MAX = 256


class TileNotFound(SlideChatError):
    """A DeepZoom level, column or row outside the slide (HTTP 404)."""


class ByteLRU:
    """A thread-safe LRU of ``bytes`` values bounded by their total size."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self._data: "OrderedDict[Hashable, bytes]" = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[bytes]:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        if len(value) > self.budget:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._data[key] = value
            self._size += len(value)
            while self._size > self.budget:
                _, dropped = self._data.popitem(last=False)
                self._size -= len(dropped)

    @property
    def size_bytes(self) -> int:
        return self._size


@dataclass
class _Opened:
    slide: Any          # openslide.OpenSlide or ImageSlide
    dz: Any             # DeepZoomGenerator
    lock: ContextManager[Any]  # plain images: a Lock (PIL is not safe to crop from several threads); else none


def _private(e: BaseException, entry: SlideEntry) -> str:
    """A library's error text with the slide's server path replaced by its name (clients see it)."""
    return exception_text(e).replace(str(entry.path), entry.name)


def _jpeg(img: Any, quality: int = JPEG_QUALITY) -> bytes:
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class TileServer:
    """DeepZoom descriptors, tiles and thumbnails for catalog entries."""

    def __init__(self, cache_mb: int = 256, max_open: int = 32) -> None:
        self.cache = ByteLRU(int(cache_mb) * 1024 * 1024)
        self.max_open = max(1, int(max_open))
        self._open: "OrderedDict[Tuple[str, str], _Opened]" = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, entry: SlideEntry) -> Tuple[str, str]:
        try:
            stamp = str(entry.path.stat().st_mtime_ns)
        except OSError:
            stamp = "?"
        return entry.id, stamp

    def _opened(self, entry: SlideEntry) -> _Opened:
        """The slide's handle and generator, opened once (an unreadable file raises SlideChatError)."""
        key = self._key(entry)
        with self._lock:
            got = self._open.get(key)
            if got is not None:
                self._open.move_to_end(key)
                return got
        import openslide  # lazy: optional heavy dependency, loaded by the first tile
        from openslide.deepzoom import DeepZoomGenerator  # lazy: as above

        try:
            slide = openslide.open_slide(str(entry.path))
            dz = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=True)
        except Exception as e:  # OpenSlideError, PIL errors: the file is unreadable
            raise SlideChatError(f"cannot read slide: {_private(e, entry)}", entry.name) from e
        plain = not isinstance(slide, openslide.OpenSlide)
        opened = _Opened(slide, dz, threading.Lock() if plain else contextlib.nullcontext())
        with self._lock:
            self._open[key] = opened
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)  # not closed: another thread may still read from it
        return opened

    def dzi(self, entry: SlideEntry) -> str:
        """The DeepZoom XML descriptor (JPEG tiles)."""
        return self._opened(entry).dz.get_dzi("jpeg")

    def level_count(self, entry: SlideEntry) -> int:
        return int(self._opened(entry).dz.level_count)

    def tile(self, entry: SlideEntry, level: int, col: int, row: int) -> bytes:
        """One JPEG tile; :class:`TileNotFound` outside the pyramid."""
        key = ("tile",) + self._key(entry) + (level, col, row)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        op = self._opened(entry)
        dz = op.dz
        if not 0 <= level < dz.level_count:
            raise TileNotFound(f"level {level} outside 0..{dz.level_count - 1}", entry.id)
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"tile {col}_{row} outside level {level} ({cols} x {rows} tiles)", entry.id)
        try:
            with op.lock:
                img = dz.get_tile(level, (col, row))
        except Exception as e:  # a damaged region of the file
            raise SlideChatError(f"cannot read tile {level}/{col}_{row}: {_private(e, entry)}", entry.id) from e
        data = _jpeg(img)
        self.cache.put(key, data)
        return data

    def thumbnail(self, entry: SlideEntry, max_side: int = THUMBNAIL_MAX) -> bytes:
        """A JPEG of the whole slide, long side at most ``max_side``."""
        key = ("thumb",) + self._key(entry) + (max_side,)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        op = self._opened(entry)
        try:
            with op.lock:
                img = op.slide.get_thumbnail((max_side, max_side))
        except Exception as e:
            raise SlideChatError(f"cannot read thumbnail: {_private(e, entry)}", entry.id) from e
        data = _jpeg(img, 85)
        self.cache.put(key, data)
        return data
