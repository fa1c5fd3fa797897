"""Overlay pictures laid over the whole level-0 extent of a slide: tissue contour, patch grid,
screening field scores, and per-patch heatmaps (the answer's evidence).

Vector layers (SVG) use a ``viewBox`` of ``0 0 W H`` in level-0 pixels; raster layers (RGBA PNG) cover
the same extent at a reduced size, so the viewer places every layer the same way.
"""

from __future__ import annotations

import io
import logging
import math
from typing import List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

import numpy as np

from slidechat.apps.serve.catalog import PatchGrid
from slidechat.evaluation.screening import FieldRow
from slidechat.utils.errors import SlideChatError
from slidechat.wsi.slide import Slide
from slidechat.wsi.tissue import TissueMask, segment_tissue

logger = logging.getLogger(__name__)

#: The colour map of the layers whose scores run low to high (screening probabilities; perceptually
#: uniform, dark = low, yellow = high).
COLORMAP = "inferno"
#: The colour map of signed scores (evidence): blue = against the answer, white = 0, red = for it.
SIGNED_COLORMAP = "RdBu_r"
#: How a per-patch heatmap scales its scores: ``signed`` (``SIGNED_COLORMAP`` of 0.5 + 0.5 s / max|s|,
#: 0 = the map's middle), ``positive`` (``COLORMAP`` of s / max s, patches <= 0 not drawn), ``minmax``.
HEATMAP_SCALES = ("signed", "positive", "minmax")
#: Opacity of a coloured patch or field (the slide stays visible below).
LAYER_ALPHA = 170
LAYER_MAX_SIDE = 2048


def layer_shape(level0_size: Tuple[int, int], max_side: int) -> Tuple[int, int, float]:
    """(height, width, scale) of a raster covering ``level0_size`` with its long side <= ``max_side``
    (never enlarged)."""
    W, H = int(level0_size[0]), int(level0_size[1])
    if W <= 0 or H <= 0:
        raise SlideChatError(f"slide size must be positive, got {W} x {H}")
    scale = min(1.0, float(max_side) / max(W, H))
    return max(1, round(H * scale)), max(1, round(W * scale)), scale


def colormap_rgba(values: np.ndarray, cmap: str = COLORMAP) -> np.ndarray:
    """``cmap`` of values in [0, 1] as RGBA uint8 (alpha ``LAYER_ALPHA``)."""
    from matplotlib import colormaps  # lazy: heavy import, only when a score layer is drawn

    rgba = (colormaps[cmap](np.clip(values, 0.0, 1.0)) * 255).round().astype(np.uint8)
    rgba[..., 3] = LAYER_ALPHA
    return rgba


def render_boxes(boxes: np.ndarray, values: np.ndarray, level0_size: Tuple[int, int],
                 max_side: int = LAYER_MAX_SIDE, cmap: str = COLORMAP,
                 order: Optional[np.ndarray] = None) -> np.ndarray:
    """RGBA raster of level-0 boxes ``(x, y, w, h)`` coloured by ``values`` in [0, 1] through ``cmap``;
    alpha 0 elsewhere. NaN values are not drawn; where boxes overlap the one drawn last wins: the highest
    value, or the highest ``order`` when given."""
    h, w, scale = layer_shape(level0_size, max_side)
    out = np.zeros((h, w, 4), np.uint8)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(boxes) != len(values):
        raise SlideChatError(f"{len(boxes)} boxes but {len(values)} scores")
    keep = np.isfinite(values)
    if not keep.any():
        return out
    colours = colormap_rgba(values[keep], cmap)
    rank = values[keep] if order is None else np.asarray(order, dtype=np.float64).reshape(-1)[keep]
    for i in np.argsort(rank, kind="stable"):
        x, y, bw, bh = boxes[keep][i]
        x0, y0 = max(0, round(x * scale)), max(0, round(y * scale))
        x1, y1 = min(w, max(x0 + 1, round((x + bw) * scale))), min(h, max(y0 + 1, round((y + bh) * scale)))
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = colours[i]
    return out


def render_patch_heatmap(scores: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                         level0_size: Tuple[int, int], max_side: int = 1024,
                         scale: str = "signed") -> np.ndarray:
    """RGBA uint8 ``(h, w, 4)`` heatmap of per-patch scores over the whole level-0 extent; alpha 0 where
    no patch is drawn.

    ``scale`` (``HEATMAP_SCALES``): ``signed`` for signed relevance such as the answer's evidence, where
    the sign is the finding (for or against the answer) and a map of only the positive part would be
    empty whenever every patch argues against the answer; ``positive`` draws only patches > 0, by the
    largest; ``minmax`` stretches all scores over ``COLORMAP``.
    """
    if scale not in HEATMAP_SCALES:
        raise SlideChatError(f"unknown heatmap scale '{scale}' (known: {', '.join(HEATMAP_SCALES)})")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(s) != len(c):
        raise SlideChatError(f"{len(s)} scores but {len(c)} patch coordinates")
    if patch_size_level0 <= 0:
        raise SlideChatError(f"patch_size_level0 must be > 0, got {patch_size_level0}")
    norm = np.full(len(s), np.nan)
    finite = np.isfinite(s)
    boxes = np.column_stack([c, np.full((len(c), 2), float(patch_size_level0))])
    if scale == "signed":
        peak = np.abs(s[finite]).max() if finite.any() else 0.0
        if peak > 0:
            norm[finite] = 0.5 + 0.5 * s[finite] / peak
        elif finite.any():
            norm[finite] = 0.5
        return render_boxes(boxes, norm, level0_size, max_side, SIGNED_COLORMAP, order=np.abs(s))
    if scale == "positive":
        pos = finite & (s > 0)
        if pos.any():
            norm[pos] = s[pos] / s[pos].max()
    elif finite.any():
        lo, hi = s[finite].min(), s[finite].max()
        norm[finite] = (s[finite] - lo) / (hi - lo) if hi > lo else 1.0
    return render_boxes(boxes, norm, level0_size, max_side)


def png_bytes(rgba: np.ndarray) -> bytes:
    """PNG file bytes of an RGBA (or RGB) uint8 array."""
    from PIL import Image  # lazy: only when a picture is encoded

    arr = np.ascontiguousarray(rgba, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA" if arr.ndim == 3 and arr.shape[2] == 4 else "RGB").save(buf, "PNG")
    return buf.getvalue()


# -- screening -------------------------------------------------------------------------------------
def screening_png(rows: Sequence[FieldRow], level0_size: Tuple[int, int], max_side: int = LAYER_MAX_SIDE) -> bytes:
    """The screening layer: each scored field coloured by its score P(abnormal) in [0, 1]."""
    boxes = np.array([[r.x, r.y, r.size_level0, r.size_level0] for r in rows], dtype=np.float64).reshape(-1, 4)
    values = np.array([r.score for r in rows], dtype=np.float64)
    return png_bytes(render_boxes(boxes, values, level0_size, max_side))


# -- grid ------------------------------------------------------------------------------------------
def _svg(width: int, height: int, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" preserveAspectRatio="none">{body}</svg>')


def grid_svg(grid: PatchGrid, level0_size: Tuple[int, int]) -> str:
    """One ``<rect>`` per patch of the feature file, in level-0 pixels."""
    s = grid.patch_size_level0
    rects = "".join(f'<rect x="{int(x)}" y="{int(y)}" width="{s}" height="{s}"/>' for x, y in grid.coords)
    stroke = max(1, round(max(level0_size) / 800))
    body = (f'<g class="patch-grid" fill="none" stroke="#00e5ff" stroke-opacity="0.8" '
            f'stroke-width="{stroke}">{rects}</g>')
    return _svg(int(level0_size[0]), int(level0_size[1]), body)


# -- tissue ----------------------------------------------------------------------------------------
def tissue_contours(mask: TissueMask) -> List[np.ndarray]:
    """Outer and hole contours of the mask, as (K, 2) float arrays in level-0 pixels."""
    import cv2  # lazy: heavy import, only when the tissue layer is drawn

    binary = np.ascontiguousarray(mask.mask.astype(np.uint8))
    contours, _ = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    sx, sy = mask.downsample
    out = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64)
        # mask pixel (i, j) covers [j*sx, (j+1)*sx): the contour runs through pixel centres
        out.append(np.column_stack([(pts[:, 0] + 0.5) * sx, (pts[:, 1] + 0.5) * sy]))
    return out


def segment_slide_tissue(slide_path: str) -> Tuple[List[np.ndarray], Tuple[int, int]]:
    """Tissue contours (level-0 px) and the level-0 size of a slide, by the project's segmentation."""
    with Slide(slide_path) as s:
        size = (int(s.dimensions[0]), int(s.dimensions[1]))
        mask = segment_tissue(s)
    return tissue_contours(mask), size


def tissue_svg(contours: Sequence[np.ndarray], level0_size: Tuple[int, int], title: Optional[str] = None) -> str:
    """The tissue contour as SVG paths (even-odd fill: holes stay open)."""
    parts = []
    for c in contours:
        if len(c) < 2:
            continue
        pts = " L".join(f"{x:.0f},{y:.0f}" for x, y in c)
        parts.append(f"M{pts} Z")
    stroke = max(1, round(max(level0_size) / 500))
    label = f"<title>{escape(title)}</title>" if title else ""
    body = (f'{label}<path class="tissue" fill="none" fill-rule="evenodd" stroke="#32cd32" '
            f'stroke-width="{stroke}" d="{" ".join(parts)}"/>')
    return _svg(int(level0_size[0]), int(level0_size[1]), body)


def tissue_png(contours: Sequence[np.ndarray], level0_size: Tuple[int, int],
               max_side: int = LAYER_MAX_SIDE) -> bytes:
    """The tissue contour drawn as green lines on a transparent RGBA raster."""
    import cv2  # lazy: as above

    h, w, scale = layer_shape(level0_size, max_side)
    out = np.zeros((h, w, 4), np.uint8)
    polys = [np.round(c * scale).astype(np.int32).reshape(-1, 1, 2) for c in contours if len(c) >= 2]
    if polys:
        cv2.polylines(out, polys, True, (50, 205, 50, 255), thickness=max(2, int(math.ceil(max(h, w) / 600))))
    return png_bytes(out)
