"""Direct tile reading for tiled TIFF slides (Aperio SVS, generic tiled TIFF): decode each JPEG tile once.

OpenSlide's ``read_region`` spends most of its time outside the JPEG decoder (ARGB compositing through
cairo, premultiplied-alpha conversion, copies): measured here 5.5 ms for a tile-aligned 256-px read vs
0.86 ms to decode the same tile with imagecodecs, bit-identical pixels. For formats whose pyramid levels
are plain TIFF pages, this reader fetches the tile bytes itself, decodes them with tifffile/imagecodecs
(libjpeg-turbo), keeps decoded tiles in a per-process LRU cache (neighbouring patches share tiles) and
copies the requested region out. It is used only after a self-check: a region read both ways must be
pixel-identical, otherwise the slide stays on OpenSlide.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from slidechat.utils.paths import PathLike
from slidechat.wsi.imageio import rgba_to_rgb

logger = logging.getLogger(__name__)

#: OpenSlide vendors whose levels are the TIFF's tiled pages, pixel for pixel (no overlaps/offsets).
DIRECT_VENDORS = ("aperio", "generic-tiff")
#: Larger declared tiles are left to OpenSlide: one hostile tile header must not make this reader
#: allocate gigabytes (scanners write 240-1024 px tiles).
MAX_TILE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class _Level:
    """What reading one pyramid level's tiles needs, held in memory: after the fork a reader process
    never touches tifffile's file handle (whose file offset its parent and siblings share)."""

    decode: Callable[..., Any]   # tifffile's decoder for this page (imagecodecs/libjpeg-turbo)
    jpeg: Optional[Dict[str, Any]]  # for 8-bit RGB JPEG tiles: imagecodecs.jpeg_decode's arguments, as
    #                                 tifffile passes them, so a tile can be decoded into a reused buffer
    jpegtables: Optional[bytes]
    offsets: np.ndarray
    counts: np.ndarray
    tile_h: int
    tile_w: int
    width: int
    height: int

    @property
    def tiles_x(self) -> int:
        return -(-self.width // self.tile_w)


class TiffTileReader:
    """Regions of the tiled pages of one TIFF that match the slide's pyramid levels.

    Tile bytes are read with ``os.pread`` (no file offset), so a forked process can go on with this
    reader (:meth:`forked`: same parsed levels, its own cache) without reopening or re-checking the slide.
    """

    def __init__(self, path: PathLike, level_dimensions: Sequence[Tuple[int, int]],
                 cache_mb: float = 128) -> None:
        import tifffile

        self.path = str(path)
        self.levels: Dict[int, _Level] = {}
        with tifffile.TiffFile(self.path) as tf:
            for level, (w, h) in enumerate(level_dimensions):
                page = next((p for p in tf.pages if _usable_page(p, w, h)), None)
                if page is not None:
                    self.levels[level] = _Level(
                        page.decode, _jpeg_arguments(page), page.jpegtables, np.asarray(page.dataoffsets, np.int64),
                        np.asarray(page.databytecounts, np.int64), int(page.tilelength), int(page.tilewidth),
                        int(page.imagewidth), int(page.imagelength))
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache_limit = int(max(cache_mb, 0) * 2 ** 20)
        self._clear_cache()
        self.fast_reduce = True  # OpenCV's 2x2 average; cleared if the self-check finds it differs from PIL

    def _clear_cache(self) -> None:
        self._cache: "OrderedDict[Tuple[int, int, int, int], np.ndarray]" = OrderedDict()
        self._cache_bytes = 0
        self.tiles_decoded = 0
        # decoded-tile buffers to decode into again: the ones the cache evicted (full-size tiles), and one
        # scratch tile per shape for tiles that are reduced before caching. Fresh memory costs a page fault
        # per 4 KB; a reused buffer is already mapped (and often still in the CPU's cache).
        self._free: Dict[Tuple[int, int], List[np.ndarray]] = {}
        self._scratch: Dict[Tuple[int, int], np.ndarray] = {}

    def forked(self) -> "TiffTileReader":
        """This reader for a forked process: the parsed levels, a duplicate of the (inherited) descriptor,
        read with ``pread``, and an empty cache of its own."""
        twin = copy.copy(self)
        twin._fd = os.dup(self._fd)
        twin._clear_cache()
        return twin

    def fit_cache(self, level: int, x0: int, x1: int, rows: int, factor: int = 1) -> int:
        """Cap the cache at what a row-major scan of regions ``rows`` px tall spanning level columns
        ``[x0, x1)`` reuses: the tile rows one row of regions covers, plus one (the row the next row of
        regions shares), across those columns. Returns the cap in bytes.

        Why not simply a big cache: every tile the cache holds is fresh memory, and a fresh page costs a
        fault (measured here ~4 us per 4 KB page, so ~0.2 ms per 256-px tile, as much as decoding it),
        while a cache that only holds the band recycles freed tiles' memory. Reader processes start
        empty, so a 128 MB cache made them fault in every tile they decoded."""
        lv = self.levels[level]
        f = max(1, int(factor))
        tiles_across = (min(x1, lv.width) - 1) // lv.tile_w - max(x0, 0) // lv.tile_w + 1
        band_rows = -(-int(rows) // lv.tile_h) + 2
        need = max(1, tiles_across) * band_rows * (lv.tile_h // f) * (lv.tile_w // f) * 3
        self._cache_limit = min(self._cache_limit, need) if self._cache_limit > 0 else 0
        return self._cache_limit

    def has_level(self, level: int) -> bool:
        return level in self.levels

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()

    def _tile(self, level: int, ty: int, tx: int, factor: int = 1) -> np.ndarray:
        key = (level, ty, tx, factor)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        lv = self.levels[level]
        i = ty * lv.tiles_x + tx
        count = int(lv.counts[i])
        if count == 0:  # a tile the scanner never wrote: glass
            tile = np.full((lv.tile_h, lv.tile_w, 3), 255, np.uint8)
        elif lv.jpeg is not None:
            import imagecodecs  # lazy: loaded with tifffile's decoders, only when tiles are read directly

            data = os.pread(self._fd, count, int(lv.offsets[i]))
            shape = (lv.tile_h, lv.tile_w)
            buf = self._scratch.get(shape) if factor > 1 else self._take_free(shape)
            if buf is None:
                buf = np.empty((*shape, 3), np.uint8)
                if factor > 1:
                    self._scratch[shape] = buf
            tile = imagecodecs.jpeg_decode(data, out=buf, **lv.jpeg)
            self.tiles_decoded += 1
        else:
            data = os.pread(self._fd, count, int(lv.offsets[i]))
            seg = lv.decode(data, i, jpegtables=lv.jpegtables)[0]
            seg = seg.reshape(seg.shape[-3:])
            # RGBA tiles: transparent -> white, as Slide.read_region does
            tile = rgba_to_rgb(seg) if seg.shape[-1] == 4 else np.ascontiguousarray(seg[..., :3])
            self.tiles_decoded += 1
        if factor > 1:  # PIL's block average (``Image.reduce``), done per tile: blocks never straddle tiles
            tile = reduce_blocks(tile, factor, self.fast_reduce)
        if self._cache_limit > 0:
            self._cache[key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                (old_level, _, _, old_factor), old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
                if old_factor == 1 and self.levels[old_level].jpeg is not None and old.flags.owndata:
                    # a full-size tile decoded into a buffer of ours: the next full-size decode reuses it
                    # (reduced tiles are not: nothing decodes into their shape, so they would pile up)
                    self._free.setdefault(old.shape[:2], []).append(old)
        elif factor == 1 and tile is not None and lv.jpeg is not None and count:
            self._free.setdefault(tile.shape[:2], []).append(tile)  # no cache: the caller copies it out now
        return tile

    def _take_free(self, shape: Tuple[int, int]) -> Optional[np.ndarray]:
        free = self._free.get(shape)
        return free.pop() if free else None

    def can_reduce(self, level: int, factor: int) -> bool:
        lv = self.levels[level]
        return lv.tile_w % factor == 0 and lv.tile_h % factor == 0

    def read(self, x: int, y: int, level: int, w: int, h: int, downsample: float = 1.0,
             factor: int = 1, out: Optional[np.ndarray] = None) -> np.ndarray:
        """RGB uint8 (h // factor, w // factor, 3) of the region whose top-left is level-0 (x, y), at
        ``level``, block-averaged by ``factor`` (= PIL ``reduce(factor)`` of the full region when the
        region's level origin is a multiple of ``factor``); outside the image = white. Written straight
        from the cached tiles into ``out`` when given (a patch of the caller's batch: no copy between)."""
        lv = self.levels[level]
        th, tw, W, H = lv.tile_h, lv.tile_w, lv.width, lv.height
        f = int(factor)
        lx, ly = int(x // downsample), int(y // downsample)
        if f > 1 and (lx % f or ly % f or w % f or h % f or th % f or tw % f):
            raise ValueError(f"region {(lx, ly, w, h)} is not aligned to the reduce factor {f}")
        inside = lx >= 0 and ly >= 0 and lx + w <= W and ly + h <= H
        shape = (h // f, w // f, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"output buffer {out.shape} {out.dtype} does not fit region {shape}")
        if not inside:
            out[...] = 255
        x1, y1 = max(lx, 0), max(ly, 0)
        x2, y2 = min(lx + w, W), min(ly + h, H)
        if x2 <= x1 or y2 <= y1:
            return out
        for ty in range(y1 // th, (y2 - 1) // th + 1):
            for tx in range(x1 // tw, (x2 - 1) // tw + 1):
                tile = self._tile(level, ty, tx, f)
                ax1, ay1 = max(x1, tx * tw), max(y1, ty * th)
                ax2, ay2 = min(x2, (tx + 1) * tw), min(y2, (ty + 1) * th)
                out[(ay1 - ly) // f:(ay2 - ly) // f, (ax1 - lx) // f:(ax2 - lx) // f] = \
                    tile[(ay1 - ty * th) // f:(ay2 - ty * th) // f, (ax1 - tx * tw) // f:(ax2 - tx * tw) // f]
        return out


def _jpeg_arguments(page: Any) -> Optional[Dict[str, Any]]:
    """``imagecodecs.jpeg_decode``'s arguments for the page's tiles, exactly as tifffile's own decoder passes
    them (tables, colorspace and output colorspace from the photometric tags), for 8-bit 3-sample JPEG
    tiles without a separate header; None otherwise (tifffile's decoder is used)."""
    import importlib

    if int(page.compression) != 7 or page.samplesperpixel != 3 or page.bitspersample != 8:
        return None
    if getattr(page, "jpegheader", None):
        return None
    # tifffile's own rule (not exported at its top level); without it, tifffile's decoder is used
    rule = getattr(importlib.import_module("tifffile.tifffile"), "jpeg_decode_colorspace", None)
    if rule is None:
        return None
    colorspace, outcolorspace = rule(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
    return {"tables": page.jpegtables, "colorspace": colorspace, "outcolorspace": outcolorspace,
            "shape": (int(page.tilelength), int(page.tilewidth))}


def _usable_page(page: Any, w: int, h: int) -> bool:
    """A tiled 8-bit RGB(A) page of exactly ``w`` x ``h`` with tiles of a sane size."""
    return bool(getattr(page, "is_tiled", False) and int(page.imagewidth) == int(w)
                and int(page.imagelength) == int(h) and page.samplesperpixel in (3, 4)
                and page.bitspersample == 8 and page.imagedepth == 1
                and 0 < int(page.tilewidth) * int(page.tilelength) <= MAX_TILE_PIXELS)


#: OpenCV splits a resize into ``output pixels / 2**16`` stripes and runs a single stripe in the calling
#: thread (``parallel_for_``, modules/core/src/parallel.cpp; ``resizeAreaFast_``, imgproc/src/resize.cpp):
#: strips of at most this many output pixels never touch its thread pool, whatever a fork did to it.
_CV_SERIAL_PIXELS = 1 << 16


def reduce_blocks(img: np.ndarray, factor: int, fast: bool = True) -> np.ndarray:
    """PIL ``Image.reduce(factor)`` (block average, PIL's integer rounding) of an RGB uint8 array.

    Factor 2 on even sizes (the 40x -> 20x case) goes through OpenCV's ``INTER_AREA`` fast path, which
    computes the same ``(a + b + c + d + 2) >> 2`` as PIL's ``ImagingReduce2x2`` (rounding included;
    checked against PIL by a test and by each slide's self-check) at ~1/10 of PIL's cost, since PIL
    first unpacks RGB to 4-byte pixels and back (measured per 256-px tile: 18 vs 190 us, the decode
    itself ~400 us). ``fast=False`` or any other case: PIL (numpy's strided uint16 sums cost 2-4x more).
    """
    from PIL import Image

    f = int(factor)
    if f == 1:
        return img
    h, w = img.shape[:2]
    if fast and f == 2 and h % 2 == 0 and w % 2 == 0 and img.ndim == 3 and img.shape[2] == 3:
        import cv2  # lazy: only readers that reduce need OpenCV loaded

        rows = max(1, _CV_SERIAL_PIXELS // max(1, w // 2))
        if rows >= h // 2:  # one stripe (tiles up to 512 px): OpenCV's own output, no copy
            return cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        out = np.empty((h // 2, w // 2, 3), np.uint8)
        for r0 in range(0, h // 2, rows):
            r1 = min(h // 2, r0 + rows)
            out[r0:r1] = cv2.resize(img[2 * r0:2 * r1], (w // 2, r1 - r0), interpolation=cv2.INTER_AREA)
        return out
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(f))


def open_tile_reader(slide: "object", cache_mb: float = 128,
                     probe: Optional[Tuple[int, int]] = None) -> Optional[TiffTileReader]:
    """A :class:`TiffTileReader` for ``slide`` when its format allows and a self-check passes, else None.

    The self-check reads one region (at ``probe``, level-0 x, y; default the slide centre) at every level
    the reader covers, through OpenSlide and directly, and requires identical pixels; on the same pixels,
    OpenCV's 2x2 average must equal PIL's ``reduce(2)`` (else the reader reduces with PIL).
    """
    vendor = getattr(slide, "vendor", "")
    if getattr(slide, "_osr", None) is None or vendor not in DIRECT_VENDORS:
        return None
    try:
        reader = TiffTileReader(slide.path, slide.level_dimensions, cache_mb)
    except Exception as e:  # noqa: BLE001 - not a TIFF tifffile can parse: stay on OpenSlide
        logger.debug("%s: no direct tile reader (%s)", slide.path, e)
        return None
    try:
        W, H = slide.dimensions
        px, py = probe if probe is not None else (W // 2, H // 2)
        for level in list(reader.levels):
            ds = slide.level_downsamples[level]
            lw, lh = slide.level_dimensions[level]
            size = min(300, lw, lh)
            x0 = int(min(max(px / ds - size // 2, 0), lw - size) * ds)
            y0 = int(min(max(py / ds - size // 2, 0), lh - size) * ds)
            ref = slide.read_region((x0, y0), level, (size, size))
            got = reader.read(x0, y0, level, size, size, ds)
            if not np.array_equal(ref, got):
                logger.info("%s: direct tile decoding differs from OpenSlide at level %d; using OpenSlide",
                            slide.path, level)
                del reader.levels[level]
            elif not np.array_equal(reduce_blocks(got[:size // 2 * 2, :size // 2 * 2], 2),
                                    reduce_blocks(got[:size // 2 * 2, :size // 2 * 2], 2, fast=False)):
                logger.info("%s: OpenCV's 2x2 average differs from PIL's reduce here; using PIL", slide.path)
                reader.fast_reduce = False
        reader._clear_cache()
    except Exception as e:  # noqa: BLE001 - any surprise: the slow, sure path
        logger.info("%s: direct tile reading unavailable (%s: %s); using OpenSlide", slide.path,
                    type(e).__name__, e)
        reader.close()
        return None
    if not reader.levels:
        reader.close()
        return None
    return reader
