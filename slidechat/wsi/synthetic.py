"""Synthetic whole-slide images with a known tissue mask and a learnable class label.

Real slides cannot ship with the repository, yet every stage (extraction, training, tests, the demo)
needs slides that OpenSlide opens like the real thing. These are pyramidal, tiled, JPEG-compressed
TIFFs with an Aperio ``ImageDescription`` (``...|AppMag = 20|MPP = 0.5``), so OpenSlide 4 reports vendor
``aperio`` with ``openslide.mpp-x`` and ``openslide.objective-power``.

Content is procedural: a smooth low-resolution "tissue field" (blobs) decides where tissue is; the
ground-truth mask is that field thresholded at :data:`MASK_DOWNSAMPLE`. Inside tissue the stroma colour,
texture and nuclei (size, density, darkness) depend on the slide's class label so that a tiny model can
learn to tell the classes apart. Every pixel is a pure function of its level-0 coordinates, so any level
is rendered tile by tile without ever holding a whole level in memory (gigapixel slides are possible).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from slidechat.utils.atomic import atomic_path
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

#: Class labels, in a fixed order. Each has a clearly different colour/texture (see ``_STYLES``).
LABELS: Tuple[str, ...] = ("tumor", "normal", "inflamed", "necrotic")
#: Downsample (w.r.t. level 0) of the saved ground-truth masks ``masks/<slide>_mask.png``.
MASK_DOWNSAMPLE = 16
MANIFEST_COLUMNS = ("slide", "path", "label", "mpp", "magnification", "width", "height", "mask_path",
                    "variant")
BACKGROUND = np.array([243.0, 242.0, 245.0], dtype=np.float32)


@dataclass(frozen=True)
class _Style:
    stroma: Tuple[float, float, float]       # RGB of the tissue between nuclei
    nucleus: Tuple[float, float, float]      # RGB of nuclei
    radius_um: float                         # nucleus radius
    cell_um: float                           # spacing of the nucleus lattice
    presence: float                          # fraction of lattice cells holding a nucleus
    fibre_period_um: float                   # stripe period of the stroma texture (0 = none)
    blotch: float                            # amplitude of low-frequency mottling


_STYLES: Dict[str, _Style] = {
    # dense, large, dark-purple nuclei on a purple-pink background
    "tumor": _Style((196, 118, 178), (72, 32, 112), 5.0, 13.0, 0.85, 0.0, 0.10),
    # pink fibrous stroma, sparse small nuclei
    "normal": _Style((236, 158, 188), (98, 52, 142), 3.0, 22.0, 0.30, 9.0, 0.05),
    # many tiny, very dark round lymphocytes
    "inflamed": _Style((226, 150, 186), (44, 22, 92), 2.5, 7.5, 0.75, 0.0, 0.05),
    # pale grey-pink mottled tissue with a few small fragments
    "necrotic": _Style((214, 176, 196), (128, 92, 136), 1.5, 11.0, 0.40, 0.0, 0.25),
}


@dataclass
class SlideSpec:
    """What to draw. ``base_mpp`` sets the physical scale even when ``write_metadata`` is False.

    ``stated_magnification`` writes an ``AppMag`` other than 10 / ``base_mpp`` (a slide whose objective
    power and MPP disagree, as some converted or mislabelled files do); None: the consistent value.
    """

    name: str
    label: str = "tumor"
    width: int = 2560
    height: int = 2048
    base_mpp: float = 0.5
    seed: int = 0
    blank: bool = False
    write_metadata: bool = True
    tile: int = 256
    quality: int = 85
    variant: str = field(default="slide")
    stated_magnification: Optional[float] = None

    @property
    def magnification(self) -> float:
        """The objective power the metadata states."""
        if self.stated_magnification is not None:
            return float(self.stated_magnification)
        return round(10.0 / self.base_mpp, 3)


# ----------------------------------------------------------------------------------------------
# procedural content


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) from integer lattice coordinates (splitmix-style mixing)."""
    with np.errstate(over="ignore"):
        h = (ix.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64((salt * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF))
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(32)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _value_noise(X: np.ndarray, Y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with feature size ``scale`` (same units as X, Y)."""
    u, v = X / scale, Y / scale
    ix, iy = np.floor(u), np.floor(v)
    fx, fy = u - ix, v - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    a, b = _hash01(ix, iy, salt), _hash01(ix + 1, iy, salt)
    c, d = _hash01(ix, iy + 1, salt), _hash01(ix + 1, iy + 1, salt)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def tissue_field(spec: SlideSpec) -> np.ndarray:
    """Smooth field at :data:`MASK_DOWNSAMPLE`; tissue is where it is >= 0.5."""
    from scipy.ndimage import gaussian_filter

    mh, mw = math.ceil(spec.height / MASK_DOWNSAMPLE), math.ceil(spec.width / MASK_DOWNSAMPLE)
    if spec.blank:
        return np.zeros((mh, mw), np.float32)
    rng = np.random.default_rng(spec.seed * 7919 + 17)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    f = np.zeros((mh, mw), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.25, 0.75) * mw, rng.uniform(0.25, 0.75) * mh
        sx, sy = rng.uniform(0.10, 0.22) * mw, rng.uniform(0.10, 0.22) * mh
        th = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        a = (dx * np.cos(th) + dy * np.sin(th)) / sx
        b = (-dx * np.sin(th) + dy * np.cos(th)) / sy
        f = np.maximum(f, np.exp(-0.5 * (a * a + b * b)))
    noise = gaussian_filter(rng.standard_normal((mh, mw)).astype(np.float32), sigma=max(mh, mw) / 40)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    f = f + 0.18 * noise
    # keep a margin of background round the edge so tissue never touches the border
    edge = np.minimum.reduce([xx, yy, mw - 1 - xx, mh - 1 - yy]) / max(2.0, 0.06 * min(mh, mw))
    return (f * np.clip(edge, 0, 1)).astype(np.float32)


def _slide_style(spec: SlideSpec) -> _Style:
    """The class style with a small per-slide stain jitter (keeps classes clearly separable)."""
    base = _STYLES[spec.label]
    rng = np.random.default_rng(spec.seed * 104729 + 3)
    jit = lambda c: tuple(float(np.clip(v + rng.uniform(-8, 8), 0, 255)) for v in c)  # noqa: E731
    return _Style(jit(base.stroma), jit(base.nucleus), base.radius_um, base.cell_um, base.presence,
                  base.fibre_period_um, base.blotch)


def render_region(spec: SlideSpec, fld: np.ndarray, x0: float, y0: float, w: int, h: int,
                  downsample: float) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the region whose top-left is level-0 (x0, y0), at ``downsample``."""
    import cv2

    d = float(downsample)
    # tissue field, bilinearly sampled at the pixel centres
    s = d / MASK_DOWNSAMPLE
    M = np.array([[s, 0, (x0 + 0.5 * d) / MASK_DOWNSAMPLE - 0.5],
                  [0, s, (y0 + 0.5 * d) / MASK_DOWNSAMPLE - 0.5]], np.float32)
    f = cv2.warpAffine(fld, M, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
    rng = np.random.default_rng([spec.seed, int(x0), int(y0), int(d * 16)])
    grain = rng.normal(0, 1, (h, w, 1)).astype(np.float32)
    img = np.broadcast_to(BACKGROUND, (h, w, 3)) + 2.0 * grain
    alpha = np.clip((f - 0.5) / 0.01 + 0.5, 0, 1)[..., None]
    if alpha.max() <= 0:
        return np.clip(img, 0, 255).astype(np.uint8)

    st = _slide_style(spec)
    mpp = spec.base_mpp
    X = (x0 + (np.arange(w, dtype=np.float64) + 0.5) * d)[None, :] * mpp  # micrometres
    Y = (y0 + (np.arange(h, dtype=np.float64) + 0.5) * d)[:, None] * mpp
    X, Y = np.broadcast_to(X, (h, w)), np.broadcast_to(Y, (h, w))
    stroma = np.array(st.stroma, np.float32)
    nucleus = np.array(st.nucleus, np.float32)

    mod = 1.0 + st.blotch * (2 * _value_noise(X, Y, 60.0, spec.seed + 11) - 1)
    if st.fibre_period_um > 0:
        warp = 6.0 * _value_noise(X, Y, 40.0, spec.seed + 13)
        mod = mod + 0.07 * np.sin(2 * np.pi * (X * 0.8 + Y * 0.6) / st.fibre_period_um + warp)
    tissue = stroma[None, None, :] * mod[..., None].astype(np.float32)

    # nuclei on a jittered lattice: each lattice cell holds at most one disc
    c, r = st.cell_um, st.radius_um
    r_px = r / (mpp * d)
    if r_px >= 0.75:
        cx, cy = np.floor(X / c).astype(np.int64), np.floor(Y / c).astype(np.int64)
        span = max(c - 2 * r, 0.0)
        ncx = (cx + 0.0) * c + r + _hash01(cx, cy, spec.seed + 1) * span
        ncy = (cy + 0.0) * c + r + _hash01(cx, cy, spec.seed + 2) * span
        present = _hash01(cx, cy, spec.seed + 3) < st.presence
        rr = r * (0.8 + 0.4 * _hash01(cx, cy, spec.seed + 4))
        dist = np.sqrt((X - ncx) ** 2 + (Y - ncy) ** 2)
        cover = np.clip((rr - dist) / (mpp * d) + 0.5, 0, 1) * present
        cover = cover.astype(np.float32)[..., None]
        tissue = tissue * (1 - cover) + nucleus[None, None, :] * cover
    else:  # nuclei below a pixel: blend their mean coverage
        frac = st.presence * np.pi * r * r / (c * c)
        tissue = tissue * (1 - frac) + nucleus[None, None, :] * frac
    tissue = tissue + 5.0 * grain
    img = img * (1 - alpha) + tissue * alpha
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# writers


def _level_downsamples(width: int, height: int) -> List[int]:
    ds = [1]
    while max(width, height) / (ds[-1] * 4) >= 512:
        ds.append(ds[-1] * 4)
    return ds


def _aperio_description(spec: SlideSpec, w: int, h: int, first: bool) -> str:
    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({spec.tile}x{spec.tile}) " \
           f"JPEG/RGB Q={spec.quality}"
    if not first or not spec.write_metadata:
        return head
    return f"{head}|AppMag = {spec.magnification:g}|MPP = {spec.base_mpp:g}|Filename = {spec.name}"


def write_pyramid(path: PathLike, spec: SlideSpec,
                  render: Callable[[int, int, int, int, float], np.ndarray]) -> Path:
    """Write a pyramidal, tiled, JPEG Aperio-style TIFF of ``spec.width`` x ``spec.height`` pixels.

    ``render(x0, y0, w, h, downsample)`` returns RGB uint8 (h, w, 3) of the region whose level-0
    top-left is (x0, y0) at ``downsample``; it is called tile by tile, so no level is held whole.
    Geometry and metadata (MPP, AppMag, tile, quality) come from ``spec``; its ``label`` is unused here.
    Shared by the histology slides below and the cytology smears of ``slidechat.data.synthetic_cytology``.
    """
    import tifffile

    path = Path(path)
    T = spec.tile
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height > 2 ** 31) as tw:
            for li, ds in enumerate(_level_downsamples(spec.width, spec.height)):
                lw, lh = spec.width // ds, spec.height // ds

                def tiles(ds: int = ds, lw: int = lw, lh: int = lh) -> Iterator[np.ndarray]:
                    for ty in range(0, lh, T):
                        for tx in range(0, lw, T):
                            yield render(tx * ds, ty * ds, T, T, ds)

                tw.write(tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(T, T),
                         compression="jpeg", compressionargs={"level": spec.quality},
                         photometric="rgb", subsampling=(2, 2), metadata=None,
                         description=_aperio_description(spec, lw, lh, li == 0))
    return path


def write_slide(path: PathLike, spec: SlideSpec, mask_path: Optional[PathLike] = None) -> Dict[str, str]:
    """Write one pyramidal Aperio-style TIFF (and its truth mask PNG); returns its manifest row."""
    from PIL import Image

    if spec.label not in _STYLES:
        raise ValueError(f"unknown label {spec.label!r}; choose from {LABELS}")
    path = Path(path)
    fld = tissue_field(spec)
    write_pyramid(path, spec, lambda x0, y0, w, h, ds: render_region(spec, fld, x0, y0, w, h, ds))
    if mask_path is not None:
        Path(mask_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((fld >= 0.5).astype(np.uint8) * 255).save(mask_path)
    return {
        "slide": spec.name, "path": str(path), "label": spec.label if not spec.blank else "",
        "mpp": f"{spec.base_mpp:g}" if spec.write_metadata else "",
        "magnification": f"{spec.magnification:g}" if spec.write_metadata else "",
        "width": str(spec.width), "height": str(spec.height),
        "mask_path": "" if mask_path is None else str(mask_path), "variant": spec.variant,
    }


def write_fov_png(path: PathLike, label: str, size: int = 768, seed: int = 0,
                  mpp: float = 0.5) -> Dict[str, str]:
    """A cytology-like plain-image field of view: scattered cells on a light background."""
    import cv2
    from PIL import Image

    st = _STYLES[label]
    rng = np.random.default_rng(seed * 31 + 7)
    img = np.broadcast_to(BACKGROUND, (size, size, 3)).copy()
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(size * size / 4000)):
        x, y = rng.uniform(0, size, 2)
        rc = rng.uniform(2.5, 4.0) * st.radius_um / mpp
        ax = (int(rc), int(rc * rng.uniform(0.7, 1.0)))
        ang = float(rng.uniform(0, 180))
        cv2.ellipse(img, (int(x), int(y)), ax, ang, 0, 360, tuple(float(v) for v in st.stroma), -1)
        cv2.ellipse(mask, (int(x), int(y)), ax, ang, 0, 360, 255, -1)
        cv2.circle(img, (int(x), int(y)), max(1, int(st.radius_um / mpp)),
                   tuple(float(v) for v in st.nucleus), -1)
    img += rng.normal(0, 3, img.shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return {"slide": path.stem, "path": str(path), "label": label, "mpp": "", "magnification": "",
            "width": str(size), "height": str(size), "mask_path": "", "variant": "fov"}


def write_manifest(path: PathLike, rows: Sequence[Dict[str, str]]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
            w.writeheader()
            w.writerows(rows)
    return path


def make_synthetic_dataset(out_dir: PathLike, n_slides: int = 8, width: int = 2560, height: int = 2048,
                           base_magnification: float = 20.0, seed: int = 0,
                           labels: Sequence[str] = LABELS, n_blank: int = 0, n_no_metadata: int = 0,
                           n_fov: int = 0, prefix: str = "synth") -> Path:
    """Write slides (labels cycled), optional blank/no-metadata/FOV variants; returns the manifest.

    Slides go to ``<out>/slides/<name>.svs``, truth masks to ``<out>/masks/<name>_mask.png`` (at
    :data:`MASK_DOWNSAMPLE`), FOV PNGs to ``<out>/fov/``, and ``<out>/manifest.csv`` lists them all.
    """
    out = Path(out_dir)
    mpp = 10.0 / base_magnification
    rows: List[Dict[str, str]] = []
    jobs: List[SlideSpec] = []
    for i in range(n_slides):
        lab = labels[i % len(labels)]
        jobs.append(SlideSpec(f"{prefix}_{i:03d}_{lab}", lab, width, height, mpp, seed * 1000 + i))
    for i in range(n_no_metadata):
        lab = labels[i % len(labels)]
        jobs.append(SlideSpec(f"{prefix}_nometa_{i:03d}", lab, width, height, mpp, seed * 1000 + 500 + i,
                              write_metadata=False, variant="no_metadata"))
    for i in range(n_blank):
        jobs.append(SlideSpec(f"{prefix}_blank_{i:03d}", labels[0], width, height, mpp,
                              seed * 1000 + 900 + i, blank=True, variant="blank"))
    for spec in jobs:
        rows.append(write_slide(out / "slides" / f"{spec.name}.svs", spec,
                                out / "masks" / f"{spec.name}_mask.png"))
        logger.info("wrote %s (%s)", spec.name, spec.label)
    for i in range(n_fov):
        lab = labels[i % len(labels)]
        rows.append(write_fov_png(out / "fov" / f"{prefix}_fov_{i:03d}_{lab}.png", lab,
                                  seed=seed * 1000 + 700 + i))
    return write_manifest(out / "manifest.csv", rows)


def make_demo_slides(out_dir: PathLike, n_slides: int = 8, seed: int = 0) -> Path:
    """Small 20x slides (2560×2048, ~15–40 tissue patches each at 20x/224), labels cycled over
    :data:`LABELS`; returns ``<out_dir>/manifest.csv``. Existing slides are reused."""
    out = Path(out_dir)
    man = out / "manifest.csv"
    if man.is_file():
        import pandas as pd

        df = pd.read_csv(man)
        if len(df) == n_slides and all(Path(p).is_file() for p in df["path"]):
            return man
    return make_synthetic_dataset(out, n_slides=n_slides, seed=seed, prefix="demo")
