"""Cellular content of a cytology smear, and the grid of fields of view screening reads.

A smear is sparse: single cells and small clusters on glass. The histology tissue segmentation
(:mod:`slidechat.wsi.tissue`: HSV saturation, Otsu, closing, regions >= 256² px, patches kept when >= 50 %
tissue) is built for solid sections; on a smear Otsu has no tissue mode to find, isolated cells (~80 px
across at 0.5 µm/px) are below its minimum region area, and a field that holds ten cells is only ~15 %
covered, so the 50 % rule drops exactly the fields a cytologist reads. The detector here instead
estimates the glass colour from the slide itself (median of the brightest 2 % of thumbnail pixels),
converts each thumbnail pixel to optical density relative to that glass (max over RGB of
log10(glass / pixel)), and calls a pixel *cellular* when OD >= ``od_threshold`` (0.04: ~9 % darker than
glass in some channel; pale Pap cytoplasm is ~0.08) and *nuclear* when OD >= ``nuclear_od`` (0.2;
thumbnail pixels are ~4 µm, so a nucleus fills one only partly). A field is kept when its cellular
fraction is >= ``min_cellular`` (about one squamous cell in a 256-µm field at 0.02).

Pure image and grid work: no model, no files written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import numpy as np

from slidechat.utils.errors import SlideChatError
from slidechat.wsi.patching import PatchGrid, SlideTooSmall, plan_patches
from slidechat.wsi.slide import Slide, resolve_resolution
from slidechat.wsi.tissue import TissueMask


@dataclass
class CellularMasks:
    """The detector's masks on one thumbnail, the glass colour they are relative to, and the thumbnail."""

    cellular: TissueMask
    nuclear: TissueMask
    glass_rgb: Tuple[float, float, float]
    thumbnail: np.ndarray


def optical_density(rgb: np.ndarray, glass: Sequence[float]) -> np.ndarray:
    """Max over channels of log10(glass / pixel): 0 on glass, larger where stain absorbs light."""
    px = np.maximum(rgb.astype(np.float32), 1.0)
    g = np.maximum(np.asarray(glass, np.float32), 1.0)
    return np.log10(g / px).max(axis=-1)


def estimate_glass(rgb: np.ndarray) -> Tuple[float, float, float]:
    """Glass colour: per-channel median of the brightest 2 % of pixels (by mean intensity)."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    lum = flat.mean(axis=1)
    cut = np.quantile(lum, 0.98)
    top = flat[lum >= cut]
    return tuple(float(v) for v in np.median(top, axis=0))  # type: ignore[return-value]


def cellular_masks(slide: Slide, field_level0: float, od_threshold: float = 0.04,
                   nuclear_od: float = 0.2) -> CellularMasks:
    """Cellular and nuclear masks on a thumbnail where a field spans ~64 px (long side <= 4096)."""
    W, H = slide.dimensions
    ds = max(1.0, field_level0 / 64.0, max(W, H) / 4096.0)
    thumb = slide.read_downsampled(ds)
    glass = estimate_glass(thumb)
    od = optical_density(thumb, glass)
    dsx, dsy = W / thumb.shape[1], H / thumb.shape[0]
    return CellularMasks(TissueMask(od >= od_threshold, (dsx, dsy), od_threshold, "cytology-od"),
                         TissueMask(od >= nuclear_od, (dsx, dsy), nuclear_od, "cytology-nuclear-od"),
                         glass, thumb)


def field_fractions(mask: TissueMask, coords: np.ndarray, size0: float) -> np.ndarray:
    """Exact fraction of mask pixels inside each level-0 square (mask pixels counted by their centre)."""
    m = mask.mask.astype(np.float64)
    integ = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integ[1:, 1:] = m.cumsum(0).cumsum(1)
    dsx, dsy = mask.downsample
    # mask pixel j has its centre at (j + 0.5) * ds; it is inside [x, x + size) when x <= c < x + size
    x1 = np.clip(np.ceil(coords[:, 0] / dsx - 0.5), 0, m.shape[1]).astype(int)
    x2 = np.clip(np.ceil((coords[:, 0] + size0) / dsx - 0.5), 0, m.shape[1]).astype(int)
    y1 = np.clip(np.ceil(coords[:, 1] / dsy - 0.5), 0, m.shape[0]).astype(int)
    y2 = np.clip(np.ceil((coords[:, 1] + size0) / dsy - 0.5), 0, m.shape[0]).astype(int)
    s = integ[y2, x2] - integ[y1, x2] - integ[y2, x1] + integ[y1, x1]
    n = np.maximum((x2 - x1) * (y2 - y1), 1)
    return (s / n).astype(np.float32)


class FieldSettings(Protocol):
    """What field planning reads of a run's settings (``slidechat.apps.screening.ScreenOptions``)."""

    field_size: int
    target_mpp: float
    base_mpp: Optional[float]
    base_magnification: Optional[float]
    min_cellular: float
    od_threshold: float
    nuclear_od: float


@dataclass
class FieldPlan:
    """The fields of one slide that hold cells, and what the detector saw."""

    grid: PatchGrid                 # kept fields only (coords, cellular fraction in tissue_fraction)
    nuclear_fraction: np.ndarray
    n_candidates: int
    masks: CellularMasks
    dimensions: Tuple[int, int]


def plan_fields(slide: Slide, opts: FieldSettings) -> FieldPlan:
    """Field grid at the target MPP/size, filtered by the cellular-content detector."""
    res = resolve_resolution(slide, opts.base_mpp, opts.base_magnification)
    whole = TissueMask(np.ones((1, 1), bool), tuple(float(v) for v in slide.dimensions), None, "none")
    try:
        grid = plan_patches(slide, whole, res, target_magnification=None, target_mpp=opts.target_mpp,
                            patch_size=opts.field_size, tissue_threshold=0.0)
    except SlideTooSmall as e:  # the same check, said with screen's flags (plan_patches names extraction's)
        W, H = slide.dimensions
        raise SlideChatError(
            f"slide is {W}x{H} px, smaller than one field ({opts.field_size} px at {opts.target_mpp:g} "
            f"µm/px = {e.patch_size_level0} px at the slide's {res.mpp:g} µm/px, {res.source})", slide.path,
            hint="use a smaller --field-size or a smaller --mpp; if the slide's own µm/px is wrong, "
                 "give --base-mpp") from None
    masks = cellular_masks(slide, grid.patch_size_level0, opts.od_threshold, opts.nuclear_od)
    cell = field_fractions(masks.cellular, grid.coords, grid.patch_size_level0)
    nuc = field_fractions(masks.nuclear, grid.coords, grid.patch_size_level0)
    keep = cell >= opts.min_cellular
    if not keep.any():
        raise SlideChatError(
            f"no field with cellular content ({len(grid.coords)} candidate fields of {opts.field_size} px "
            f"at {opts.target_mpp:g} µm/px; best cellular fraction {float(cell.max()):.3f} < "
            f"--min-cellular {opts.min_cellular:g})", slide.path,
            hint="blank slide? lower --min-cellular or --od-threshold")
    kept = dataclasses.replace(grid, coords=grid.coords[keep], tissue_fraction=cell[keep])
    return FieldPlan(kept, nuc[keep], int(len(grid.coords)), masks, tuple(slide.dimensions))
