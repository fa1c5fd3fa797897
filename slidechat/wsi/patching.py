"""Patch grid at a target magnification or MPP, kept where the tissue mask covers enough of a patch.

Scale: ``patch_size`` pixels at the target resolution cover ``patch_size_level0 = round(patch_size *
target_mpp / base_mpp)`` level-0 pixels (224 at 20x -> 448 on a 40x/0.25 µm slide, 224 on a 20x one).
A target given as magnification means ``target_mpp = 10 / magnification``; the resulting scale is
snapped to the nearest integer when within 3 % of it, so a 0.2525 µm "40x" scan still gives exactly 448.
Pixels are read at the highest pyramid level whose downsample does not exceed the needed scale and
resized to ``patch_size``. Coordinates are level-0 top-left corners, row-major (y, then x).

Default ``tissue_threshold`` = 0.5: a patch is kept when at least half of it is tissue, so every
kept patch is mostly tissue while tissue edges are still covered.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np

from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.wsi.slide import Resolution, Slide
from slidechat.wsi.tissue import TissueMask

logger = logging.getLogger(__name__)

DEFAULT_MAGNIFICATION = 20.0
DEFAULT_PATCH_SIZE = 224
DEFAULT_TISSUE_THRESHOLD = 0.5

#: Every flag that can leave a slide without a tissue patch: the mask (threshold, method, region and
#: hole areas, its resolution), the share of a patch that must be tissue, and the patch's footprint
#: (patch size at the target resolution, on the level-0 scale the slide's resolution gives).
NO_TISSUE_HINT = ("blank slide? Otherwise: lower --tissue-threshold (tissue share a patch needs); "
                  "for the mask, lower --seg-threshold or --seg-min-tissue-area, raise "
                  "--seg-min-hole-area (fills more holes), or a finer --seg-downsample; a smaller "
                  "--patch-size or a higher --magnification / finer --mpp (smaller patches fit small "
                  "tissue); check the slide's scale "
                  "(--base-mpp, --base-magnification, --override-metadata, --mpp-source); or "
                  "--no-tissue-seg")


@dataclass
class PatchGrid:
    coords: np.ndarray              # (N, 2) int64 level-0 top-left x, y
    tissue_fraction: np.ndarray     # (N,) float32
    patch_size: int                 # pixels at the target resolution (encoder input before its transform)
    patch_size_level0: int          # level-0 pixels each patch covers
    step_level0: int
    read_level: int                 # pyramid level pixels are read from
    read_size: int                  # pixels read at read_level (then resized to patch_size)
    read_downsample: float
    read_level_dim: tuple           # (w, h) of read_level
    base_mpp: float
    base_magnification: float
    target_mpp: float
    target_magnification: float
    mpp_source: str
    n_grid: int                     # candidate positions before the tissue filter
    overlap: int = 0                # pixels at the target resolution shared by neighbouring patches
    resolution_note: str = ""       # why the level-0 resolution needed a choice (``Resolution.note``)

    def __len__(self) -> int:
        return int(len(self.coords))

    def coords_attrs(self) -> Dict[str, Any]:
        """CLAM/TRIDENT-style attributes for the H5 ``coords`` dataset.

        TRIDENT re-reads a patch as ``patch_size * level0_magnification / target_magnification``
        level-0 pixels (mahmoodlab/TRIDENT, trident/wsi_objects/WSI.py ``extract_patch_features``), so
        ``level0_magnification`` is the one this grid implies (``patch_size_level0`` exactly), not the
        metadata's rounded objective.
        """
        return {
            "patch_size": self.patch_size,
            "patch_level": self.read_level,
            "downsample": np.array([self.read_downsample, self.read_downsample], np.float64),
            "level_dim": np.array(self.read_level_dim, np.int64),
            "patch_size_level0": self.patch_size_level0,
            "step_size_level0": self.step_level0,
            "target_mpp": self.target_mpp,
            "target_magnification": self.target_magnification,
            "base_mpp": self.base_mpp,
            "base_magnification": self.base_magnification,
            "mpp_source": self.mpp_source,
            "level0_magnification": self.target_magnification * self.patch_size_level0 / self.patch_size,
            "overlap": self.overlap,
        }

    def summary(self) -> Dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("coords", "tissue_fraction")}
        d["n_patches"] = len(self)
        return d


class SlideTooSmall(SlideChatError):
    """The slide is smaller than one patch. Carries the patch's level-0 side so a caller that lays
    patches under another name (screening's fields) can say it in its own words and flags."""

    def __init__(self, reason: str, path: Optional[PathLike], hint: str, patch_size_level0: int) -> None:
        super().__init__(reason, path, hint)
        self.patch_size_level0 = patch_size_level0


def _snap(scale: float, tol: float = 0.03) -> float:
    r = round(scale)
    return float(r) if r >= 1 and abs(scale - r) <= tol * scale else scale


def plan_patches(slide: Slide, mask: TissueMask, resolution: Resolution,
                 target_magnification: Optional[float] = DEFAULT_MAGNIFICATION,
                 target_mpp: Optional[float] = None, patch_size: int = DEFAULT_PATCH_SIZE,
                 tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD,
                 overlap: int = 0) -> PatchGrid:
    """Lay a non-overlapping (or ``overlap``-px) grid and keep the tissue patches.

    Raises :class:`SlideChatError` when the slide is smaller than one patch or has no tissue patch.
    """
    import cv2

    if patch_size <= 0:
        raise SlideChatError(f"patch size must be > 0, got {patch_size}", slide.path)
    if target_mpp is not None:
        if target_mpp <= 0:
            raise SlideChatError(f"target MPP must be > 0, got {target_mpp}", slide.path)
        scale = target_mpp / resolution.mpp
        target_mag = 10.0 / target_mpp
    else:
        mag = target_magnification or DEFAULT_MAGNIFICATION
        if mag <= 0:
            raise SlideChatError(f"target magnification must be > 0, got {mag}", slide.path)
        scale = _snap((10.0 / mag) / resolution.mpp)
        target_mpp, target_mag = 10.0 / mag, float(mag)
    if scale < 1 - 1e-6:
        logger.warning("%s: target %.3g µm/px is finer than the scan (%.3g µm/px); patches are "
                       "upsampled", slide.name, target_mpp, resolution.mpp)
    ps0 = max(1, int(round(patch_size * scale)))
    step0 = max(1, int(round((patch_size - overlap) * scale)))
    W, H = slide.dimensions
    if W < ps0 or H < ps0:
        raise SlideTooSmall(
            f"slide is {W}x{H} px, smaller than one patch ({patch_size} px at {target_mag:g}x = "
            f"{ps0} level-0 px)", slide.path,
            hint="use a smaller --patch-size or a lower --magnification", patch_size_level0=ps0)
    level = slide.best_level_for_downsample(scale)
    lds = slide.level_downsamples[level]
    read_size = max(1, int(round(ps0 / lds)))

    xs = np.arange(0, W - ps0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, H - ps0 + 1, step0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    frac = _tissue_fractions(mask, coords, ps0, W, H, cv2)
    keep = frac >= tissue_threshold - 1e-9
    if not keep.any():
        raise SlideChatError(
            f"no tissue patch found ({len(coords)} candidate patches of {ps0} level-0 px, tissue covers "
            f"{100 * mask.tissue_fraction:.1f}% of the mask, tissue threshold {tissue_threshold:g})",
            slide.path, hint=NO_TISSUE_HINT)
    return PatchGrid(coords[keep], frac[keep].astype(np.float32), int(patch_size), ps0, step0, level,
                     read_size, float(lds), tuple(int(v) for v in slide.level_dimensions[level]),
                     float(resolution.mpp), float(resolution.magnification), float(target_mpp),
                     float(target_mag), resolution.source, int(len(coords)), int(overlap),
                     resolution.note)


def _tissue_fractions(mask: TissueMask, coords: np.ndarray, ps0: int, W: int, H: int,
                      cv2: Any) -> np.ndarray:
    """Fraction of each patch covered by the mask, via the mask resampled to ps0/8 px cells."""
    if mask.method == "none":
        return np.ones(len(coords), np.float32)
    cell = max(ps0 / 8.0, 1.0)
    gw, gh = max(1, math.ceil(W / cell)), max(1, math.ceil(H / cell))
    m = mask.mask.astype(np.float32)
    # mask pixels are ds level-0 px; map the mask onto the cell grid covering the same area
    src_w, src_h = mask.mask.shape[1] * mask.downsample[0], mask.mask.shape[0] * mask.downsample[1]
    interp = cv2.INTER_AREA if (gw < m.shape[1]) else cv2.INTER_NEAREST
    grid = cv2.resize(m, (max(1, int(round(src_w / cell))), max(1, int(round(src_h / cell)))),
                      interpolation=interp)
    padded = np.zeros((gh + 8, gw + 8), np.float32)
    hh, ww = min(grid.shape[0], gh), min(grid.shape[1], gw)
    padded[:hh, :ww] = grid[:hh, :ww]
    integ = cv2.integral(padded, sdepth=cv2.CV_64F)
    x1 = np.floor(coords[:, 0] / cell + 0.5).astype(np.int64)
    y1 = np.floor(coords[:, 1] / cell + 0.5).astype(np.int64)
    n = max(1, int(round(ps0 / cell)))
    x2, y2 = x1 + n, y1 + n
    s = integ[y2, x2] - integ[y1, x2] - integ[y2, x1] + integ[y1, x1]
    return (s / float(n * n)).astype(np.float32)
