"""What a screened slide leaves behind: its heatmap, its gallery of top fields (grounded boxes drawn), its
Markdown report, its settings file and its field table, under ``out_dir`` (see :func:`output_paths`).

The field table is written last: it is the slide's "done" marker (a rerun skips slides that have one).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

from slidechat.evaluation.screening import FieldRow, write_field_table
from slidechat.utils.annotate import ScaleBar, add_title_and_scale_bar
from slidechat.utils.atomic import atomic_path, atomic_write_text, save_figure
from slidechat.utils.paths import PathLike
from slidechat.wsi.cellularity import FieldPlan
from slidechat.wsi.patching import PatchGrid
from slidechat.wsi.reader import PatchReader

BOX_RGB = (230, 30, 30)


class ScreenedSlide(Protocol):
    """What the writers read of one screened slide (``slidechat.apps.screening.SlideScreen``)."""

    slide: str
    path: Path
    rows: List[FieldRow]
    plan: FieldPlan
    timings: Dict[str, float]


class ReportSettings(Protocol):
    """What the writers read of a run's settings (``slidechat.apps.screening.ScreenOptions``)."""

    field_size: int
    target_mpp: float
    options: Tuple[str, ...]
    aggregator: str
    top_k: int
    field_threshold: float
    slide_threshold: Optional[float]
    gallery_k: int

    def settings(self) -> Dict[str, Any]: ...


def output_paths(out_dir: PathLike, sid: str) -> Dict[str, Path]:
    """Where one slide's files go under ``out_dir``."""
    out = Path(out_dir)
    return {"fields": out / "fields" / f"{sid}.csv", "meta": out / "fields" / f"{sid}.json",
            "heatmap": out / "heatmaps" / f"{sid}.png", "gallery": out / "galleries" / f"{sid}.png",
            "report": out / "reports" / f"{sid}.md"}


def read_fields(path: PathLike, grid: PatchGrid, idx: np.ndarray) -> np.ndarray:
    """uint8 (b, P, P, 3) fields, read exactly as extraction reads patches (same reader class)."""
    reader = PatchReader(Path(path), grid, max(1, len(idx)))
    try:
        return reader.read(np.asarray(idx))
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# heatmap


def write_heatmap(path: PathLike, res: ScreenedSlide) -> Path:
    """Thumbnail with each kept field tinted by its score (colour bar 0-1); unkept fields untinted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = res.plan.masks.thumbnail
    W, H = res.plan.dimensions
    th, tw = thumb.shape[:2]
    heat = np.full((th, tw), np.nan, np.float32)
    sx, sy = tw / W, th / H
    for r in res.rows:
        x1, y1 = int(round(r.x * sx)), int(round(r.y * sy))
        x2, y2 = int(round((r.x + r.size_level0) * sx)), int(round((r.y + r.size_level0) * sy))
        heat[y1:y2, x1:x2] = r.score
    aspect = th / max(tw, 1)
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * aspect + 0.4), dpi=110)
    ax.imshow(thumb, interpolation="bilinear")
    im = ax.imshow(np.ma.masked_invalid(heat), cmap="inferno", vmin=0, vmax=1, alpha=0.45,
                   interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{res.slide}: field abnormality scores ({len(res.rows)} cellular fields)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# gallery


@dataclass
class GalleryTile:
    """One field in a gallery picture: where it is and which boxes were drawn on it (picture px)."""

    field: int
    origin: Tuple[int, int]                      # (x, y) of the tile's top-left pixel
    size: int                                    # tile side, px
    boxes: List[Tuple[int, int, int, int]]       # drawn rectangles (x1, y1, x2, y2), inclusive
    grounding: str                               # "2 boxes", "no regions", "not grounded"


@dataclass
class Gallery:
    """A gallery picture and what was drawn where (the tests check boxes against the pixels)."""

    image: np.ndarray
    tiles: List[GalleryTile]
    note: str                                    # the legend, or why no box is drawn
    scale_bar: Optional[ScaleBar]


def box_on_tile(box: Sequence[float], field_xy: Tuple[float, float], size_level0: float,
                tile_px: int) -> Optional[Tuple[int, int, int, int]]:
    """A level-0 box ``(x1, y1, x2, y2)`` of a field (top-left ``field_xy``, side ``size_level0``)
    as inclusive tile pixels, clipped to the tile; None when it lies outside the tile."""
    f = tile_px / float(size_level0)
    x1, y1, x2, y2 = ((float(box[i]) - float(field_xy[i % 2])) * f for i in range(4))
    if x2 < x1:
        x1, x2 = x2, x1
    if y2 < y1:
        y1, y2 = y2, y1
    c = [int(round(x1)), int(round(y1)), int(round(x2)) - 1, int(round(y2)) - 1]  # [x1, x2) -> inclusive
    c[2], c[3] = max(c[2], c[0]), max(c[3], c[1])
    if c[2] < 0 or c[3] < 0 or c[0] > tile_px - 1 or c[1] > tile_px - 1:
        return None
    lo, hi = 0, tile_px - 1
    return (min(max(c[0], lo), hi), min(max(c[1], lo), hi), min(max(c[2], lo), hi), min(max(c[3], lo), hi))


def _grounding_note(rows: Sequence[FieldRow], shown: Sequence[int], malformed: int) -> str:
    """The picture's legend: boxes drawn, or why there are none (grounding off / no regions)."""
    grounded = [r for r in rows if r.grounded is not None]
    n_boxes = sum(len(rows[i].grounded or []) for i in shown)
    if not grounded:
        return "no boxes: grounding off (slidechat screen --ground-top N draws the N top fields' cells)"
    if n_boxes:
        return f"red boxes: abnormal cells located by the model ({len(grounded)} field(s) grounded)"
    bad = f", {malformed} malformed region(s) ignored" if malformed else ""
    return f"no boxes: the model gave no regions for the {len(grounded)} grounded field(s){bad}"


def _draw_boxes(tile: np.ndarray, r: FieldRow, size_level0: float) -> List[Tuple[int, int, int, int]]:
    """Draw the row's grounded boxes (labelled) on its tile; the drawn rectangles in tile px."""
    import cv2

    t = tile.shape[0]
    drawn: List[Tuple[int, int, int, int]] = []
    for lab, *box in r.grounded or []:
        b = box_on_tile(box, (float(r.x), float(r.y)), size_level0, t)
        if b is None:
            continue
        cv2.rectangle(tile, (b[0], b[1]), (b[2], b[3]), BOX_RGB, 1 if t < 96 else 2)
        (tw, _), _ = cv2.getTextSize(str(lab), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        cv2.putText(tile, str(lab), (max(0, min(b[0] + 2, t - tw - 1)), max(b[1] - 3, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, BOX_RGB, 1, cv2.LINE_AA)
        drawn.append(b)
    return drawn


def render_gallery(slide: str, rows: Sequence[FieldRow], order: Sequence[int], fields: np.ndarray,
                   size_level0: float, base_mpp: Optional[float], max_tile: int = 256,
                   malformed: int = 0) -> Gallery:
    """The gallery picture of ``rows[order]`` (their field pixels in ``fields``, same order): tiles
    scaled to ``max_tile`` px, grounded level-0 boxes drawn where they are on each tile, each tile
    captioned with its score and its grounding, a title, a legend (or why no boxes) and a scale bar."""
    import cv2

    P = fields.shape[1]
    t = min(P, max_tile)
    cap = 34
    cols = min(4, len(order))
    rows_n = math.ceil(len(order) / cols)
    canvas = np.full((rows_n * (t + cap) + 4, cols * (t + 4) + 4, 3), 255, np.uint8)
    tiles: List[GalleryTile] = []
    for j, i in enumerate(order):
        r = rows[i]
        tile = np.ascontiguousarray(cv2.resize(fields[j], (t, t), interpolation=cv2.INTER_AREA) if t != P
                                    else fields[j].copy())
        gy, gx = divmod(j, cols)
        y0, x0 = 4 + gy * (t + cap), 4 + gx * (t + 4)
        drawn = [(a + x0, b + y0, c + x0, d + y0) for a, b, c, d in _draw_boxes(tile, r, size_level0)]
        canvas[y0:y0 + t, x0:x0 + t] = tile
        boxes = r.grounded or []
        if r.grounded is None:
            gnote = "not grounded"
        else:
            gnote = f"{len(boxes)} box{'es' if len(boxes) != 1 else ''}" if boxes else "no regions"
        cv2.putText(canvas, f"#{j + 1} p={r.score:.3f} ({r.x},{r.y})", (x0, y0 + t + 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.38, (20, 20, 20), 1, cv2.LINE_AA)
        cv2.putText(canvas, gnote, (x0, y0 + t + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    BOX_RGB if boxes else (90, 90, 90), 1, cv2.LINE_AA)
        tiles.append(GalleryTile(int(i), (x0, y0), t, drawn, gnote))
    note = _grounding_note(rows, order, malformed)
    title = [f"{slide}: top {len(order)} of {len(rows)} fields by abnormality probability", note]
    um_per_px = base_mpp * size_level0 / t if base_mpp else None
    image, bar, top = add_title_and_scale_bar(canvas, title, um_per_px)
    for tile in tiles:
        tile.origin = (tile.origin[0], tile.origin[1] + top)
        tile.boxes = [(a, b + top, c, d + top) for a, b, c, d in tile.boxes]
    return Gallery(image, tiles, note, bar)


def write_gallery(path: PathLike, res: ScreenedSlide, k: int = 8, max_tile: int = 256) -> Gallery:
    """The top-k fields (highest score first) side by side, grounded boxes drawn (or the picture says
    why there are none), score captioned; returns what was drawn where."""
    from PIL import Image

    order = sorted(range(len(res.rows)), key=lambda i: -res.rows[i].score)[:max(1, k)]
    arr = read_fields(res.path, res.plan.grid, np.array(order))
    grid = res.plan.grid
    gallery = render_gallery(res.slide, res.rows, order, arr, float(grid.patch_size_level0), grid.base_mpp,
                             max_tile, int(res.timings.get("malformed_regions", 0) or 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(gallery.image).save(tmp, format="PNG")
    return gallery


# ----------------------------------------------------------------------------------------------
# report and the slide's files


def _located_cells(grounded: Sequence[FieldRow]) -> str:
    """``"3 HSIL, 1 ASC-US"``: the grounded cells' labels, most frequent first."""
    counts: Dict[str, int] = {}
    for r in grounded:
        for lab, *_ in r.grounded or []:
            counts[str(lab)] = counts.get(str(lab), 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def slide_report(res: ScreenedSlide, opts: ReportSettings, slide_score: float) -> str:
    """A short Markdown report built from the slide's top fields (scores and grounded findings)."""
    rows = sorted(res.rows, key=lambda r: -r.score)
    n = len(rows)
    above = sum(r.score >= opts.field_threshold for r in rows)
    lines = [f"# Screening report: {res.slide}", "",
             f"- Fields screened: {n} cellular fields of {res.plan.n_candidates} "
             f"({opts.field_size} px at {opts.target_mpp:g} µm/px).",
             f"- Slide score ({opts.aggregator}{', k=' + str(opts.top_k) if opts.aggregator == 'topk_mean' else ''}): "
             f"{slide_score:.3f}; fields with abnormality probability >= {opts.field_threshold:g}: {above}.",
             ]
    grounded = [r for r in rows if r.grounded is not None]
    if grounded:
        lines.append(f"- Abnormal cells located by the model in its {len(grounded)} most suspicious "
                     f"fields: {_located_cells(grounded)}.")
    lines += ["", "| rank | field (x, y) | abnormality probability | grounded cells |", "|---|---|---|---|"]
    for j, r in enumerate(rows[:max(1, opts.gallery_k)], 1):
        gtxt = "-" if r.grounded is None else (", ".join(str(b[0]) for b in r.grounded) or "none")
        lines.append(f"| {j} | ({r.x}, {r.y}) | {r.score:.3f} | {gtxt} |")
    if opts.slide_threshold is not None:
        call = "ABNORMAL: review recommended" if slide_score >= opts.slide_threshold else "negative"
        lines += ["", f"Impression: {call} (slide threshold {opts.slide_threshold:g})."]
    elif above:
        lines += ["", f"Impression: {above} suspicious field(s); review the gallery."]
    else:
        lines += ["", "Impression: no field above the field threshold."]
    return "\n".join(lines) + "\n"


def write_slide_outputs(res: ScreenedSlide, out: Path, opts: ReportSettings, scorer_info: Mapping[str, Any],
                        slide_score: float) -> None:
    """Every file of one screened slide; the field table last (the "done" marker)."""
    paths = output_paths(out, res.slide)
    meta = {"slide": res.slide, "path": str(res.path), "dimensions": list(res.plan.dimensions),
            "grid": res.plan.grid.summary(), "glass_rgb": list(res.plan.masks.glass_rgb),
            "settings": opts.settings(), **scorer_info, "timings": res.timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta["grid"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta["grid"].items()}
    atomic_write_text(paths["meta"], json.dumps(meta, indent=1, default=float) + "\n")
    paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
    write_heatmap(paths["heatmap"], res)
    write_gallery(paths["gallery"], res, opts.gallery_k)
    atomic_write_text(paths["report"], slide_report(res, opts, slide_score))
    write_field_table(paths["fields"], res.rows, len(opts.options))  # last: the "done" marker
