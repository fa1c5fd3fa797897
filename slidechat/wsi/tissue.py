"""Tissue segmentation on a low-resolution copy of the slide (CLAM-style, fast, no model).

Default pipeline, all on a mask whose downsample is chosen so its long side is ~1–2k px:
HSV saturation -> median blur -> threshold (Otsu, floored at ``min_saturation`` so a blank slide is
not split into "tissue" noise; or a fixed value) -> morphological closing -> contours, keeping tissue
regions whose area (minus holes) >= ``min_tissue_area`` and holes >= ``min_hole_area``
(at most ``max_holes`` per region, largest first). Areas are in level-0 pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from slidechat.wsi.slide import Slide

logger = logging.getLogger(__name__)


@dataclass
class TissueParams:
    """Segmentation knobs. ``downsample=None`` picks a power of two giving a ~1–2k px mask."""

    downsample: Optional[float] = None
    median_kernel: int = 7            # odd, mask pixels
    threshold: Optional[int] = None   # saturation 0–255; None = Otsu
    min_saturation: int = 15          # floor for the Otsu threshold (white glass is ~0–8)
    close_kernel: int = 4             # mask pixels; 0 = no closing
    min_tissue_area: float = 256 * 256       # level-0 px² (one 256-px patch)
    min_hole_area: float = 128 * 128         # level-0 px²
    max_holes: int = 8


@dataclass
class TissueMask:
    """Boolean mask; pixel (i, j) covers level-0 [j*ds_x, (j+1)*ds_x) × [i*ds_y, (i+1)*ds_y)."""

    mask: np.ndarray
    downsample: Tuple[float, float]
    threshold: Optional[float] = None
    method: str = "hsv-otsu"

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def auto_downsample(width: int, height: int, target_long_side: int = 1024) -> float:
    """Largest power of two keeping the mask's long side >= ``target_long_side`` (at least 1)."""
    ratio = max(width, height) / target_long_side
    return float(2 ** max(0, int(math.floor(math.log2(ratio))))) if ratio >= 1 else 1.0


def segment_tissue(slide: Slide, params: Optional[TissueParams] = None) -> TissueMask:
    """Tissue mask of ``slide`` (see module docstring)."""
    p = params or TissueParams()
    W, H = slide.dimensions
    ds = p.downsample or auto_downsample(W, H)
    rgb = slide.read_downsampled(ds)
    tm = segment_rgb(rgb, p, level0_per_px=(W / rgb.shape[1], H / rgb.shape[0]))
    logger.debug("%s: tissue %.1f%% at downsample %g (threshold %s)", slide.name,
                 100 * tm.tissue_fraction, ds, tm.threshold)
    return tm


def segment_rgb(rgb: np.ndarray, params: Optional[TissueParams] = None,
                level0_per_px: Tuple[float, float] = (1.0, 1.0)) -> TissueMask:
    """Segment an RGB uint8 image already at low resolution."""
    import cv2

    p = params or TissueParams()
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    k = max(1, int(p.median_kernel) | 1)
    if k > 1:
        sat = cv2.medianBlur(sat, k)
    if p.threshold is None:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = max(float(otsu), float(p.min_saturation))
        method = "hsv-otsu"
    else:
        thr, method = float(p.threshold), "hsv-fixed"
    binary = (sat > thr).astype(np.uint8)
    if p.close_kernel > 0:
        kern = np.ones((int(p.close_kernel), int(p.close_kernel)), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kern)
    px_area = level0_per_px[0] * level0_per_px[1]
    mask = _filter_contours(binary, p.min_tissue_area / px_area, p.min_hole_area / px_area,
                            p.max_holes)
    return TissueMask(mask.astype(bool), (float(level0_per_px[0]), float(level0_per_px[1])), thr, method)


def _filter_contours(binary: np.ndarray, min_tissue: float, min_hole: float,
                     max_holes: int) -> np.ndarray:
    """Redraw the mask from contours: drop small tissue regions, keep only sizeable holes."""
    import cv2

    contours, hier = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(binary)
    if hier is None or not contours:
        return out
    hier = hier[0]
    for i, c in enumerate(contours):
        if hier[i][3] != -1:  # a hole; handled with its parent
            continue
        holes = []
        child = hier[i][2]
        while child != -1:
            holes.append(contours[child])
            child = hier[child][0]
        hole_areas = [cv2.contourArea(h) for h in holes]
        area = cv2.contourArea(c) - sum(hole_areas)
        if area < min_tissue or area <= 0:
            continue
        cv2.drawContours(out, [c], -1, 1, thickness=cv2.FILLED)
        kept = sorted((a, j) for j, a in enumerate(hole_areas) if a >= min_hole)[::-1][:max_holes]
        if kept:
            cv2.drawContours(out, [holes[j] for _, j in kept], -1, 0, thickness=cv2.FILLED)
    return out


def whole_slide_mask(slide: Slide) -> TissueMask:
    """Everything is tissue (``--no-tissue-seg``): a 1×1-cell mask covering the slide."""
    W, H = slide.dimensions
    return TissueMask(np.ones((1, 1), bool), (float(W), float(H)), None, "none")
