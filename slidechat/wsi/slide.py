"""One slide reader over OpenSlide (SVS, TIFF, NDPI, MRXS, DICOM, ...) and plain images (PNG/JPEG).

Everything downstream (tissue segmentation, patching, the extraction workers) talks to :class:`Slide`
only, so a plain field-of-view PNG and a 100k-pixel SVS go through the same code.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from slidechat.utils.errors import SlideChatError, exception_text
from slidechat.utils.paths import PathLike
from slidechat.wsi.imageio import (ImageTooLargeError, limit_hint, read_image, rgba_to_rgb,
                                   sniff_format)
from slidechat.wsi.tiles import open_tile_reader

logger = logging.getLogger(__name__)

PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Suffixes treated as slides when a folder is given as input.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                  ".bif", ".dcm", ".czi") + PLAIN_IMAGE_SUFFIXES
_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")
MPP_FLAG_HINT = "pass --base-mpp (micrometres per pixel at level 0) or --base-magnification"


def slide_id(path: PathLike) -> str:
    """File name without its extension; double suffixes such as ``.ome.tiff`` are removed whole.

    Dots inside the name are kept: ``TCGA-XX.1.svs`` -> ``TCGA-XX.1``. A DICOM slide is a folder of
    ``.dcm`` files (one per pyramid level, label, ...) with UID-like names: its id is the folder's name.
    """
    if Path(path).suffix.lower() == ".dcm":
        return Path(path).resolve().parent.name or Path(path).stem
    name = Path(path).name
    low = name.lower()
    for suf in _DOUBLE_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    stem = Path(name).stem
    return stem or name


class Slide:
    """Common interface: level geometry, ``read_region`` (RGB uint8), thumbnails, metadata."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.name = slide_id(self.path)
        self._osr = None
        self._img: Optional[np.ndarray] = None
        self.mpp_rejected: Optional[str] = None  # why a resolution found in the file was not trusted
        self._tiles: Any = None  # direct tile reader (wsi.tiles), when enabled
        self._reopen = False  # a forked twin: open its own OpenSlide handle on first use
        self._cache_mb = 0.0
        if not self.path.is_file():
            raise SlideChatError("slide file not found", self.path)
        plain_name = self.path.suffix.lower() in PLAIN_IMAGE_SUFFIXES
        content = sniff_format(self.path) if plain_name else None
        if plain_name and content in ("tiff", "bigtiff", "dicom"):
            # routed by content, not name: an Aperio slide renamed .png is still a slide for OpenSlide
            logger.warning("%s: named %s but the file is a %s; reading it as a slide", self.path,
                           self.path.suffix, content.upper())
            self._open_openslide()
        elif plain_name:
            self._open_plain()
        else:  # OpenSlide first; what it does not support (a PNG named .svs, a stripped TIFF) -> PIL
            self._open_openslide()

    # -- opening ---------------------------------------------------------------------------------
    def _open_openslide(self) -> None:
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            try:  # e.g. a stripped (non-tiled) TIFF that PIL reads fine
                self._open_plain()
                return
            except ImageTooLargeError:
                raise
            except SlideChatError:
                raise SlideChatError("unsupported or corrupt slide file (neither OpenSlide nor PIL "
                                     "can open it)", self.path) from None
        except Exception as e:  # OpenSlideError and friends
            raise SlideChatError(f"cannot open slide: {type(e).__name__}: {e}", self.path) from e
        self.level_dimensions: Tuple[Tuple[int, int], ...] = tuple(self._osr.level_dimensions)
        self.level_downsamples: Tuple[float, ...] = tuple(float(d) for d in self._osr.level_downsamples)
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.mpp = _positive_float(props.get("openslide.mpp-x"))
        self.objective = _positive_float(props.get("openslide.objective-power"))
        self.mpp_rejected = _implausible_mpp(self.mpp, props)
        if self.mpp_rejected:
            logger.warning("%s: ignoring metadata resolution: %s", self.name, self.mpp_rejected)
            self.mpp = None

    def _open_plain(self) -> None:
        """A plain image is decoded whole, through the one image loader (its pixel-count limit and
        mode rules); beyond the limit, a tiled pyramidal TIFF is the format that scales."""
        img = read_image(self.path, hint=f"{limit_hint()}, or save it as a tiled pyramidal TIFF")
        arr = np.asarray(img)
        del img
        self._img = np.ascontiguousarray(arr)
        h, w = arr.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.vendor = "image"
        self.mpp = None
        self.objective = None
        self.mpp_rejected: Optional[str] = None

    # -- geometry --------------------------------------------------------------------------------
    @property
    def dimensions(self) -> Tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """Highest level whose downsample does not exceed ``downsample`` (1e-3 tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-3):
                best = i
        return best

    # -- pixels ----------------------------------------------------------------------------------
    def read_region(self, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); ``location`` is level-0 top-left, ``size`` is at ``level``.

        Pixels outside the image (or transparent in the file) come back white, like glass.
        """
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if self._img is not None:
            out = np.full((h, w, 3), 255, np.uint8)
            H, W = self._img.shape[:2]
            x1, y1 = max(x, 0), max(y, 0)
            x2, y2 = min(x + w, W), min(y + h, H)
            if x2 > x1 and y2 > y1:
                out[y1 - y:y2 - y, x1 - x:x2 - x] = self._img[y1:y2, x1:x2]
            return out
        direct = self._direct_region(x, y, level, w, h)
        if direct is not None:
            return direct
        try:
            rgba = np.asarray(self._openslide().read_region((x, y), level, (w, h)))
        except Exception as e:
            raise self._read_error(x, y, w, h, level, e) from e
        return rgba_to_rgb(rgba)

    def read_region_image(self, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> "Any":
        """Like :meth:`read_region` but a PIL ``RGB`` image, without numpy copies on the common path.

        Extraction readers resample in PIL (``reduce``/``resize`` on uint8), so staying in PIL from the
        decoder to the patch avoids two full-size array passes per read.
        """
        from PIL import Image

        if self._img is not None:
            return Image.fromarray(self.read_region(location, level, size))
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        direct = self._direct_region(x, y, level, w, h)
        if direct is not None:
            return Image.fromarray(direct)
        try:
            rgba = self._openslide().read_region((x, y), level, (w, h))
        except Exception as e:
            raise self._read_error(x, y, w, h, level, e) from e
        if rgba.getextrema()[3][0] == 255:  # fully opaque: the usual case inside the scan
            return rgba.convert("RGB")
        return Image.fromarray(rgba_to_rgb(np.asarray(rgba)))

    def read_region_reduced(self, location: Tuple[int, int], level: int, size: Tuple[int, int],
                            factor: int = 1, out: Optional[np.ndarray] = None) -> np.ndarray:
        """RGB uint8 ``(h // factor, w // factor, 3)``: the region read at ``level`` and block-averaged by
        an integer ``factor`` (PIL ``reduce``), e.g. 448-px level-0 reads of a 40x slide -> 224 px at 20x;
        written into ``out`` when given.

        With direct tiles each tile is reduced once when decoded (and cached reduced), so the full-size
        region never exists, and the result is composed straight into ``out``; otherwise the OpenSlide
        region is reduced in PIL. Same pixels either way.
        """
        f = max(1, int(factor))
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        tiles = self._tiles
        if tiles is not None and tiles.has_level(level) and tiles.can_reduce(level, f):
            ds = self.level_downsamples[level]
            lx, ly = int(x // ds), int(y // ds)
            if not (lx % f or ly % f or w % f or h % f):
                try:
                    return tiles.read(x, y, level, w, h, ds, f, out)
                except Exception as e:
                    raise self._read_error(x, y, w, h, level, e) from e
        img = self.read_region_image((x, y), level, (w, h))
        arr = np.asarray(img.reduce(f) if f > 1 else img)
        if out is None:
            return arr
        out[...] = arr
        return out

    def reads_directly(self, level: int) -> bool:
        """Whether ``level`` is read by the direct tile reader (cheap per region: no need to batch reads)."""
        return self._tiles is not None and self._tiles.has_level(level)

    def _direct_region(self, x: int, y: int, level: int, w: int, h: int) -> Optional[np.ndarray]:
        """The region from the direct tile reader when it covers ``level`` and (x, y) falls on a whole
        pixel of it; None when OpenSlide must read it."""
        tiles = self._tiles
        if tiles is None or not tiles.has_level(level) or not self._on_level_grid(x, y, level):
            return None
        try:
            return tiles.read(x, y, level, w, h, self.level_downsamples[level])
        except Exception as e:
            raise self._read_error(x, y, w, h, level, e) from e

    def _read_error(self, x: int, y: int, w: int, h: int, level: int, e: Exception) -> SlideChatError:
        return SlideChatError(f"cannot read region {(x, y, w, h)} at level {level}: {type(e).__name__}: {e}",
                              self.path)

    def _on_level_grid(self, x: int, y: int, level: int) -> bool:
        """Whether level-0 (x, y) falls on a whole pixel of ``level`` (else OpenSlide interpolates)."""
        ds = self.level_downsamples[level]
        return float(x / ds).is_integer() and float(y / ds).is_integer()

    def _openslide(self) -> Any:
        """The OpenSlide handle; a forked twin opens its own here, on its first OpenSlide read."""
        if self._reopen:
            import openslide

            self._reopen = False
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except Exception as e:
                raise SlideChatError(f"cannot open slide: {exception_text(e)}", self.path) from e
            self.set_cache_size(self._cache_mb)
        return self._osr

    def forked(self) -> "Slide":
        """This handle for use in a forked process, at no cost: same geometry and metadata, the direct
        tile reader without a re-check (it reads with ``pread``, so the inherited descriptor is safe to
        share), and an OpenSlide handle of its own opened only if a read needs one (an OpenSlide handle
        does not survive a fork). Opening and self-checking the slide again cost ~50 ms per reader."""
        twin = copy.copy(self)
        twin._reopen = self._osr is not None
        twin._osr = None
        twin._tiles = self._tiles.forked() if self._tiles is not None else None
        return twin

    def enable_direct_tiles(self, cache_mb: float = 128, probe: Optional[Tuple[int, int]] = None) -> bool:
        """Read tiled-TIFF levels by decoding their JPEG tiles directly (``wsi.tiles``), ~6x cheaper than
        OpenSlide's ``read_region`` per tile, after a pixel-identity self-check; False if not possible."""
        if self._tiles is None:
            self._tiles = open_tile_reader(self, cache_mb, probe)
        return self._tiles is not None

    def fit_tile_cache(self, level: int, x0: int, x1: int, rows: int, factor: int = 1) -> None:
        """Size the direct tile cache to a row-major scan of ``rows``-px regions over level columns
        ``[x0, x1)`` (``TiffTileReader.fit_cache``); no-op without direct tiles at ``level``."""
        if self._tiles is not None and self._tiles.has_level(level):
            self._tiles.fit_cache(level, x0, x1, rows, factor)

    def set_cache_size(self, megabytes: float) -> None:
        """Give this handle its own OpenSlide tile cache (decoded tiles shared by neighbouring reads).

        Adjacent patches share tiles; with a cache larger than a band of tiles across the tissue, each
        tile is decoded once per reader process. No-op for plain images or old OpenSlide builds.
        """
        self._cache_mb = float(megabytes)
        if self._osr is None or megabytes <= 0:
            return
        try:
            import openslide

            self._osr.set_cache(openslide.OpenSlideCache(int(megabytes * 2 ** 20)))
        except (AttributeError, Exception) as e:  # pragma: no cover - depends on the OpenSlide build
            logger.debug("%s: no per-handle tile cache (%s)", self.name, e)

    def read_downsampled(self, downsample: float, chunk: int = 4096) -> np.ndarray:
        """The whole slide as RGB at ``downsample`` (w.r.t. level 0), read chunk by chunk.

        Uses the best pyramid level and resizes each chunk (area interpolation), so memory stays
        bounded even when the nearest level is much larger than the output.
        """
        import cv2

        W, H = self.dimensions
        ow, oh = max(1, math.ceil(W / downsample)), max(1, math.ceil(H / downsample))
        if self._img is not None and downsample == 1:
            return self._img.copy()
        level = self.best_level_for_downsample(downsample)
        lds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        out = np.empty((oh, ow, 3), np.uint8)
        f = lds / downsample  # level px -> output px
        step = max(1, int(chunk))
        for ly in range(0, lh, step):
            for lx in range(0, lw, step):
                cw, ch = min(step, lw - lx), min(step, lh - ly)
                ox1, oy1 = int(round(lx * f)), int(round(ly * f))
                # the last chunk of a row/column reaches the output's edge: ``ow``/``oh`` round up, so
                # rounding its end could leave the last output column/row unwritten (uninitialised)
                ox2 = ow if lx + cw >= lw else min(ow, int(round((lx + cw) * f)))
                oy2 = oh if ly + ch >= lh else min(oh, int(round((ly + ch) * f)))
                if ox2 <= ox1 or oy2 <= oy1:
                    continue
                reg = self.read_region((int(lx * lds), int(ly * lds)), level, (cw, ch))
                out[oy1:oy2, ox1:ox2] = cv2.resize(reg, (ox2 - ox1, oy2 - oy1),
                                                   interpolation=cv2.INTER_AREA)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        W, H = self.dimensions
        ds = max(1.0, max(W, H) / max_size)
        return self.read_downsampled(ds)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        self._img = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, " \
               f"levels={self.level_count}, mpp={self.mpp}, objective={self.objective})"


def _positive_float(v: Optional[str]) -> Optional[float]:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f > 0 and math.isfinite(f) else None


@dataclass(frozen=True)
class Resolution:
    """Level-0 scale of a slide and where it came from (``metadata-mpp``, ``objective``, ``user`` or
    ``user-override``); ``note`` says why it needed a choice (metadata that disagree), else empty."""

    mpp: float
    magnification: float
    source: str
    note: str = ""


#: ``--mpp-source``: which metadata field sets the level-0 resolution. ``auto``: ``openslide.mpp-x``
#: when it agrees with the objective power, and the slide is refused when they disagree; ``mpp`` /
#: ``objective``: that field whenever the file states it (the other only when it is missing).
MPP_SOURCES = ("auto", "mpp", "objective")

#: Objective power and MPP agree when 10 / mpp is within this factor of the stated objective power.
#: The rule objective ~ 10 / mpp ("a 20x objective maps 0.5 microns to a pixel", microscopesinternational
#: .com/blog/20180420-magnification_vs_resolution.aspx) holds only roughly, as scanners' camera pixels
#: differ: TRIDENT calls every scan from 0.2 to 0.3 µm/px "40x" (mahmoodlab/TRIDENT,
#: trident/wsi_objects/WSI.py ``_fetch_magnification``), 10 / mpp from 33x to 50x, within 1.25 of 40.
#: A wrong field is off by a whole objective step, a factor of 2 (40x stated with a 20x scan's
#: 0.5 µm/px). 1.5 lies between the two (near sqrt(2), the geometric midpoint of one step): the
#: first is accepted, the second always caught.
METADATA_AGREEMENT_FACTOR = 1.5


def check_mpp_source(mpp_source: str) -> None:
    if mpp_source not in MPP_SOURCES:
        raise SlideChatError(f"--mpp-source must be one of {', '.join(MPP_SOURCES)}, got {mpp_source!r}")


def metadata_disagreement(mpp: Optional[float], objective: Optional[float]) -> Optional[str]:
    """The words for an objective power and an MPP that cannot both be right, or None."""
    if mpp is None or objective is None:
        return None
    implied = 10.0 / mpp
    if max(implied / objective, objective / implied) <= METADATA_AGREEMENT_FACTOR:
        return None
    return (f"metadata disagree: objective power {objective:g}x (= {10.0 / objective:.4g} µm/px) but MPP "
            f"{mpp:.4g} µm/px (= {implied:.3g}x)")


def resolve_resolution(slide: Slide, base_mpp: Optional[float] = None,
                       base_magnification: Optional[float] = None,
                       override: bool = False, mpp_source: str = "mpp") -> Resolution:
    """Level-0 MPP from the file's metadata (see :data:`MPP_SOURCES`), else the user's values.

    User values fill in for slides without (trustworthy) metadata; with ``override`` they replace the
    file's metadata explicitly (``--override-metadata``), e.g. for a scanner known to write a wrong MPP.
    A file whose objective power and MPP disagree is refused under ``mpp_source="auto"`` (one error
    naming both values and the flags that settle it: features at the wrong scale look like any
    others); otherwise the chosen field is used, the disagreement logged and kept in ``note``.
    """
    check_mpp_source(mpp_source)
    if base_mpp is not None and base_mpp <= 0:
        raise SlideChatError(f"--base-mpp must be > 0, got {base_mpp}", slide.path)
    if base_magnification is not None and base_magnification <= 0:
        raise SlideChatError(f"--base-magnification must be > 0, got {base_magnification}", slide.path)
    user: Optional[Resolution] = None
    if base_mpp is not None:
        user = Resolution(float(base_mpp), 10.0 / float(base_mpp), "user")
    elif base_magnification is not None:
        user = Resolution(10.0 / float(base_magnification), float(base_magnification), "user")
    if override and user is not None:
        if slide.mpp is not None or slide.objective is not None:
            logger.info("%s: metadata says %s µm/px, objective %s; using %.4g µm/px as asked "
                        "(--override-metadata)", slide.name, slide.mpp, slide.objective, user.mpp)
        return Resolution(user.mpp, user.magnification, "user-override")
    meta = _metadata_resolution(slide, mpp_source)
    if meta is not None:
        if user is not None and abs(user.mpp - meta.mpp) > 0.03 * meta.mpp:
            logger.warning("%s: metadata says %.4g µm/px, --base-mpp/--base-magnification say %.4g; "
                           "the metadata wins (add --override-metadata to use yours)", slide.name,
                           meta.mpp, user.mpp)
        return meta
    if user is not None:
        return user
    why = f"; {slide.mpp_rejected}" if getattr(slide, "mpp_rejected", None) else ""
    raise SlideChatError("slide has no resolution metadata (no openslide.mpp-x, no objective power"
                         f"{why})", slide.path, hint=MPP_FLAG_HINT)


def _metadata_resolution(slide: Slide, mpp_source: str) -> Optional[Resolution]:
    """The file's own level-0 resolution under ``mpp_source``, or None when it states none."""
    mpp, objective = slide.mpp, slide.objective
    clash = metadata_disagreement(mpp, objective)
    if clash and mpp_source == "auto":
        raise SlideChatError(clash, slide.path,
                             hint="say which to trust with --mpp-source mpp or --mpp-source objective, "
                                  "or give the true value: --base-mpp X --override-metadata")
    use_objective = objective is not None and (mpp is None or mpp_source == "objective")
    if clash:
        logger.warning("%s: %s; using the %s as --mpp-source says", slide.name, clash,
                       "objective power" if use_objective else "MPP")
    note = f"{clash}; --mpp-source {mpp_source}" if clash else ""
    if use_objective:
        return Resolution(10.0 / objective, objective, "objective", note)  # type: ignore[operator]
    if mpp is None:
        return None
    # agreeing fields: the stated objective names the magnification; a chosen MPP names its own
    mag = objective if objective is not None and not clash else 10.0 / mpp
    return Resolution(mpp, mag, "metadata-mpp", note)


#: Coarser than this at level 0 is not a slide scanner's resolution (a 1.25x scan is ~8 µm/px).
MAX_PLAUSIBLE_MPP = 10.0


def _implausible_mpp(mpp: Optional[float], props: Any) -> Optional[str]:
    """Why a metadata MPP should not be trusted, or None.

    Generic TIFF writers stamp a default resolution (72/96/300 dpi, unit inch) that OpenSlide turns into
    an MPP of 85-353 µm/px; patching at such a "resolution" silently produces nonsense patches.
    """
    if mpp is None or mpp <= MAX_PLAUSIBLE_MPP:
        return None
    unit = str(props.get("tiff.ResolutionUnit", "") or "")
    xres = props.get("tiff.XResolution")
    if xres is not None and unit:
        return (f"its TIFF resolution tag says {float(xres):g} pixels per {unit} ({mpp:.4g} µm/px), a "
                "writing program's default, not a scanner's resolution")
    return f"metadata MPP {mpp:.4g} µm/px is coarser than any slide scan (> {MAX_PLAUSIBLE_MPP:g})"
