"""Slide-level cytology screening: tile a smear into fields of view, keep the cellular ones, score
each with the cytology copilot (Qwen2-VL), aggregate to a slide score, explain the slide.

Per slide (``screen_slide``):

1. **Open + resolution** with the extraction's reader (:class:`slidechat.wsi.slide.Slide`, OpenSlide
   formats and large PNG/JPEG) and :func:`~slidechat.wsi.slide.resolve_resolution`.
2. **Field grid**: :func:`slidechat.wsi.patching.plan_patches` lays non-overlapping fields of
   ``field_size`` px at ``target_mpp`` (default 512 px at 0.5 µm/px, what the synthetic fields and
   CytoChat's ~512-px images use), reading from the best pyramid level as extraction does.
3. **Cellular-content detector** (:func:`cellular_masks`), instead of the histology tissue
   segmentation. A smear is sparse: single cells and small clusters on glass. The histology pipeline
   (HSV saturation, Otsu, closing, regions >= 256² px, patches kept when >= 50 % tissue) is built for
   solid tissue sections; on a smear Otsu has no tissue mode to find, isolated cells (~80 px across at
   0.5 µm/px) are below its minimum region area, and a field that holds ten cells is only ~15 % covered,
   so the 50 % rule drops exactly the fields a cytologist reads. The detector instead estimates the
   glass colour from the slide itself (median of the brightest 2 % of thumbnail pixels), converts each
   thumbnail pixel to optical density relative to that glass (max over RGB of log10(glass / pixel)),
   and calls a pixel *cellular* when OD >= ``od_threshold`` (0.04: ~9 % darker than glass in some
   channel; pale Pap cytoplasm is ~0.08) and *nuclear* when OD >= ``nuclear_od`` (0.2; thumbnail
   pixels are ~4 µm, so a nucleus fills one only partly). A field is kept when its cellular fraction
   is >= ``min_cellular`` (default 0.02, about one squamous cell in a 256-µm field); both fractions
   are saved per field.
4. **Model**: each kept field, in batches, is asked the screening question
   (:data:`~slidechat.data.synthetic_cytology.SCREENING_QUESTION`, options ``[A.Normal, B.Abnormal]``).
   The field score is the model's **probability** of the abnormal option(s): one forward pass, the
   logits at the answer position restricted to the first token of each option's answer text
   (``A.Normal.`` -> ``A``), softmax over those. Nothing is parsed from generated text. ``option_mass``
   (the full-vocabulary probability on the option tokens) says how much the model believes it is
   answering the question at all.
5. **Grounding** (optional, ``ground_top`` fields per slide, or all): the top fields are asked
   ``Locate all abnormal cells.``; the answers are parsed with
   :func:`slidechat.evaluation.regions.parse_regions` and mapped to level-0 boxes.
6. **Outputs** (under ``out_dir``): ``fields/<slide>.csv`` (one row per kept field, level-0
   coordinates, score, option probabilities, grounded cells; written last = the per-slide "done"
   marker), ``fields/<slide>.json`` (run settings), ``heatmaps/<slide>.png``, ``galleries/<slide>.png``
   (top-k fields with grounded boxes), ``reports/<slide>.md``; then ``slides.csv`` (score + ranking),
   with labels ``metrics.json`` + ``roc.png``, and ``failures.csv`` (``failures_rank<r>.csv``) as in
   extraction. Reruns skip slides whose field table exists; ``reaggregate`` needs no model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from slidechat.apps.runner import SlideFailed, SlideTask, failure_reason, run_slides
from slidechat.data.vocabulary import (GROUND_ABNORMAL_QUESTION, LETTERS, SCREENING_ABNORMAL_INDEX,
                                      SCREENING_OPTIONS, SCREENING_QUESTION)
from slidechat.evaluation.screening import (DEFAULT_AGGREGATOR, DEFAULT_FIELD_THRESHOLD, DEFAULT_TOP_K,
                                            FIELD_COLUMNS, evaluate_slides, plot_roc, read_field_table,
                                            read_labels_csv, slide_scores_from_tables, slide_table,
                                            write_rows_csv)
from slidechat.utils.annotate import ScaleBar, add_title_and_scale_bar
from slidechat.utils.atomic import atomic_path, atomic_write_text, save_figure
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.wsi.patching import PatchGrid, plan_patches
from slidechat.wsi.reader import PatchReader
from slidechat.wsi.slide import Slide, resolve_resolution, slide_id
from slidechat.wsi.tissue import TissueMask

logger = logging.getLogger(__name__)

DEFAULT_FIELD_SIZE = 512
DEFAULT_TARGET_MPP = 0.5


@dataclass
class ScreenOptions:
    """Everything that shapes a screening run (see the module docstring)."""

    field_size: int = DEFAULT_FIELD_SIZE
    target_mpp: float = DEFAULT_TARGET_MPP
    base_mpp: Optional[float] = None
    base_magnification: Optional[float] = None
    min_cellular: float = 0.02
    od_threshold: float = 0.04
    nuclear_od: float = 0.2
    batch_size: int = 8
    prompt: str = SCREENING_QUESTION
    options: Tuple[str, ...] = SCREENING_OPTIONS
    abnormal_options: Tuple[int, ...] = (SCREENING_ABNORMAL_INDEX,)
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    ground_top: int = 0
    ground_all: bool = False
    ground_prompt: str = GROUND_ABNORMAL_QUESTION
    max_new_tokens: int = 256
    top_k: int = DEFAULT_TOP_K
    aggregator: str = DEFAULT_AGGREGATOR
    field_threshold: float = DEFAULT_FIELD_THRESHOLD
    slide_threshold: Optional[float] = None
    n_boot: int = 2000
    gallery_k: int = 8
    device: str = "auto"
    progress: bool = True
    trust_remote_code: bool = False  # --trust-remote-code (slidechat.model.hf_folder)
    allow_partial: bool = False  # --allow-partial: a model folder lacking weights loads, with a warning

    def settings(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k not in ("progress", "device", "trust_remote_code", "allow_partial")}


# ----------------------------------------------------------------------------------------------
# cellular-content detector


@dataclass
class CellularMasks:
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


@dataclass
class FieldPlan:
    grid: PatchGrid                 # kept fields only (coords, cellular fraction in tissue_fraction)
    nuclear_fraction: np.ndarray
    n_candidates: int
    masks: CellularMasks
    dimensions: Tuple[int, int]


def plan_fields(slide: Slide, opts: ScreenOptions) -> FieldPlan:
    """Field grid at the target MPP/size, filtered by the cellular-content detector."""
    res = resolve_resolution(slide, opts.base_mpp, opts.base_magnification)
    W, H = slide.dimensions
    size0 = int(round(opts.field_size * opts.target_mpp / res.mpp))  # plan_patches' level-0 field side
    if opts.field_size > 0 and opts.target_mpp > 0 and (W < size0 or H < size0):
        # checked here, not left to plan_patches: its hint names extract-features' flags
        raise SlideChatError(
            f"slide is {W}x{H} px, smaller than one field ({opts.field_size} px at {opts.target_mpp:g} "
            f"µm/px = {size0} px at the slide's {res.mpp:g} µm/px, {res.source})", slide.path,
            hint="use a smaller --field-size or a smaller --mpp; if the slide's own µm/px is wrong, "
                 "give --base-mpp")
    whole = TissueMask(np.ones((1, 1), bool), tuple(float(v) for v in slide.dimensions), None, "none")
    grid = plan_patches(slide, whole, res, target_magnification=None, target_mpp=opts.target_mpp,
                        patch_size=opts.field_size, tissue_threshold=0.0)
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


def read_fields(path: PathLike, grid: PatchGrid, idx: np.ndarray) -> np.ndarray:
    """uint8 (b, P, P, 3) fields, read exactly as extraction reads patches (same reader class)."""
    reader = PatchReader(Path(path), grid, max(1, len(idx)))
    try:
        return reader.read(np.asarray(idx))
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# the model


def option_token_ids(tokenizer: Any, options: Sequence[str]) -> List[int]:
    """First token of each option's answer text ``"<letter>.<option>."`` (how the model starts it).

    Options whose answers start with the same token cannot be told apart by one logit: an error.
    """
    ids: List[int] = []
    for i, o in enumerate(options):
        toks = tokenizer.encode(f"{LETTERS[i]}.{o}.", add_special_tokens=False)
        if not toks:
            raise SlideChatError(f"option {LETTERS[i]}.{o} tokenizes to nothing")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise SlideChatError(f"the answers of options {list(options)} start with the same token; "
                             f"option probabilities need distinct first tokens")
    return ids


class FieldModel:
    """The cytology copilot as a field scorer: option probabilities (one forward) and grounding."""

    def __init__(self, model_name_or_path: PathLike, adapter_name_or_path: Optional[PathLike] = None,
                 opts: Optional[ScreenOptions] = None, model: Any = None, processor: Any = None) -> None:
        import torch

        from slidechat.data.template import render_qwen2vl_prompt

        self.opts = opts or ScreenOptions()
        if model is None:
            from slidechat.utils.devices import resolve_device
            from slidechat.model.qwen2vl import load_qwen2vl

            dev = resolve_device(self.opts.device)
            model, processor = load_qwen2vl(model_name_or_path, adapter_name_or_path, device=dev,
                                            trust_remote_code=self.opts.trust_remote_code,
                                            allow_partial=self.opts.allow_partial)
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.source = str(model_name_or_path)
        o = self.opts
        if not 2 <= len(o.options) <= 10:
            raise SlideChatError(f"the screening question needs 2-10 options, got {len(o.options)}")
        if not o.abnormal_options or any(not 0 <= i < len(o.options) for i in o.abnormal_options):
            raise SlideChatError(f"abnormal option indices {list(o.abnormal_options)} out of range for "
                                 f"{len(o.options)} options")
        self.option_ids = option_token_ids(processor.tokenizer, o.options)
        from slidechat.data.template import get_vision_template
        from slidechat.model.qwen2vl import family_of

        tpl = get_vision_template(family_of(model).lf_template)
        # a reasoning template (qwen3_vl) trains every answer after an empty thought: the option token is
        # scored after it (LLaMA-Factory's enable_thinking=False prompt), not at the thought's first token
        self.prompt_text = render_qwen2vl_prompt([{"role": "user", "content": "<image>" + o.prompt}],
                                                 template=tpl) + tpl.empty_thought()
        self.ground_text = render_qwen2vl_prompt([{"role": "user", "content": "<image>" + o.ground_prompt}],
                                                 template=tpl)
        self._torch = torch

    def _batch(self, text: str, images: Sequence[Any]) -> Any:
        from slidechat.data.qwen2vl_batch import prepare_generation_batch

        batch = prepare_generation_batch(self.processor, [text] * len(images), [[im] for im in images],
                                         image_max_pixels=self.opts.image_max_pixels,
                                         image_min_pixels=self.opts.image_min_pixels)
        return batch.to(self.device)

    def option_logits(self, images: Sequence[Any]) -> Any:
        """Logits (N, vocab) at the answer position (the last prompt token; prompts are left-padded).

        Same result as a stock ``model(**batch)`` on a fresh model, through
        :func:`slidechat.model.qwen2vl.last_token_logits`: the vision tower runs image by image (a
        batch of 8 would otherwise cost 8x per image) and the M-RoPE ``position_ids`` are explicit (a
        plain forward reuses ``rope_deltas`` cached by an earlier call and falls back to 1-D positions).
        """
        return self.logits_from_batch(self._batch(self.prompt_text, images))

    def logits_from_batch(self, batch: Any) -> Any:
        """Last-position logits of a prepared batch (see :meth:`option_logits`)."""
        from slidechat.model.qwen2vl import last_token_logits

        return last_token_logits(self.model, batch)

    def option_probs(self, images: Sequence[Any]) -> Tuple[np.ndarray, np.ndarray]:
        """(N, n_options) softmax over the option tokens' logits, and the full-vocab mass on them."""
        torch = self._torch
        logits = self.option_logits(images)
        ids = torch.tensor(self.option_ids, device=logits.device)
        sel = logits[:, ids]
        probs = torch.softmax(sel, dim=-1)
        mass = torch.softmax(logits, dim=-1)[:, ids].sum(-1)
        return probs.cpu().numpy().astype(np.float64), mass.cpu().numpy().astype(np.float64)

    def abnormal_score(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, list(self.opts.abnormal_options)].sum(axis=1)

    def ground(self, images: Sequence[Any]) -> List[str]:
        """Greedy answers to the grounding prompt (special tokens skipped, as vllm_infer decodes)."""
        torch = self._torch
        batch = self._batch(self.ground_text, images)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.opts.max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def provenance(self) -> Dict[str, Any]:
        return {"model": self.source, "option_token_ids": self.option_ids}


def model_image_size(field_px: int, opts: ScreenOptions) -> Tuple[int, int]:
    """Size of the field image the model sees after LLaMA-Factory's scaling (boxes are in it)."""
    from PIL import Image

    from slidechat.data.images import scale_image

    return scale_image(Image.new("RGB", (field_px, field_px)), opts.image_max_pixels,
                       opts.image_min_pixels).size


# ----------------------------------------------------------------------------------------------
# one slide


@dataclass
class SlideScreen:
    slide: str
    path: Path
    rows: List[Dict[str, Any]]
    plan: FieldPlan
    timings: Dict[str, float] = field(default_factory=dict)


def output_paths(out_dir: PathLike, sid: str) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"fields": out / "fields" / f"{sid}.csv", "meta": out / "fields" / f"{sid}.json",
            "heatmap": out / "heatmaps" / f"{sid}.png", "gallery": out / "galleries" / f"{sid}.png",
            "report": out / "reports" / f"{sid}.md"}


def screen_slide(path: PathLike, scorer: FieldModel, opts: ScreenOptions) -> SlideScreen:
    """Tile, detect, score (and ground) one slide in memory. Errors are SlideChatErrors naming it."""
    from PIL import Image
    from tqdm.auto import tqdm

    from slidechat.evaluation.regions import parse_regions

    path = Path(path)
    sid = slide_id(path)
    t0 = time.perf_counter()
    with Slide(path) as slide:
        plan = plan_fields(slide, opts)
    t1 = time.perf_counter()
    grid = plan.grid
    n = len(grid)
    probs = np.zeros((n, len(opts.options)))
    mass = np.zeros(n)
    bs = max(1, int(opts.batch_size))
    reader = PatchReader(path, grid, bs)  # one slide handle for the whole slide
    t_read = t_model = 0.0
    bar = tqdm(total=n, desc=sid[:30], unit="field", leave=False, disable=not opts.progress)
    try:
        for s in range(0, n, bs):
            idx = np.arange(s, min(s + bs, n))
            ta = time.perf_counter()
            arr = reader.read(idx)
            tb = time.perf_counter()
            p, m = scorer.option_probs([Image.fromarray(a) for a in arr])
            tc = time.perf_counter()
            probs[idx], mass[idx] = p, m
            t_read += tb - ta
            t_model += tc - tb
            bar.update(len(idx))
        score = scorer.abnormal_score(probs)
        ground_idx: List[int] = []
        if opts.ground_all:
            ground_idx = list(range(n))
        elif opts.ground_top > 0:
            ground_idx = [int(i) for i in np.argsort(-score, kind="stable")[:opts.ground_top]]
        grounded: Dict[int, List[List[Any]]] = {}
        malformed = 0
        if ground_idx:
            mw, mh = model_image_size(grid.patch_size, opts)
            f0 = grid.patch_size_level0 / float(mw)  # model image px -> level-0 px
            f1 = grid.patch_size_level0 / float(mh)
            for s in range(0, len(ground_idx), bs):
                idx = np.array(ground_idx[s:s + bs])
                ta = time.perf_counter()
                arr = reader.read(idx)
                tb = time.perf_counter()
                texts = scorer.ground([Image.fromarray(a) for a in arr])
                t_read += tb - ta
                t_model += time.perf_counter() - tb
                for i, text in zip(idx, texts):
                    parsed = parse_regions(text, image_size=(mw, mh))
                    malformed += len(parsed.malformed)
                    x0, y0 = (float(v) for v in grid.coords[i])
                    grounded[int(i)] = [[r.label or "abnormal", round(x0 + r.x1 * f0, 1),
                                         round(y0 + r.y1 * f1, 1), round(x0 + r.x2 * f0, 1),
                                         round(y0 + r.y2 * f1, 1)] for r in parsed.boxes]
    finally:
        bar.close()
        reader.close()
    rows: List[Dict[str, Any]] = []
    for i in range(n):
        x, y = (int(v) for v in grid.coords[i])
        row: Dict[str, Any] = {
            "slide": sid, "field": i, "x": x, "y": y, "size_level0": grid.patch_size_level0,
            "cellular_fraction": f"{float(grid.tissue_fraction[i]):.4f}",
            "nuclear_fraction": f"{float(plan.nuclear_fraction[i]):.4f}",
            "score": f"{float(score[i]):.6f}", "option_mass": f"{float(mass[i]):.6f}",
            "n_grounded": len(grounded[i]) if i in grounded else "",
            "grounded": json.dumps(grounded[i]) if i in grounded else ""}
        for j, o in enumerate(opts.options):
            row[f"p_{LETTERS[j]}"] = f"{float(probs[i, j]):.6f}"
        rows.append(row)
    timings = {"plan_s": t1 - t0, "read_s": t_read, "model_s": t_model,
               "total_s": time.perf_counter() - t0, "n_fields": n, "n_candidates": plan.n_candidates,
               "malformed_regions": malformed}
    return SlideScreen(sid, path, rows, plan, timings)


def field_columns(opts: ScreenOptions) -> List[str]:
    return list(FIELD_COLUMNS) + [f"p_{LETTERS[j]}" for j in range(len(opts.options))]


# ----------------------------------------------------------------------------------------------
# pictures and report


def write_heatmap(path: PathLike, res: SlideScreen) -> Path:
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
        x1, y1 = int(round(r["x"] * sx)), int(round(r["y"] * sy))
        x2, y2 = int(round((r["x"] + r["size_level0"]) * sx)), int(round((r["y"] + r["size_level0"]) * sy))
        heat[y1:y2, x1:x2] = float(r["score"])
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


BOX_RGB = (230, 30, 30)


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


def _grounding_note(rows: Sequence[Mapping[str, Any]], shown: Sequence[int], malformed: int) -> str:
    """The picture's legend: boxes drawn, or why there are none (grounding off / no regions)."""
    grounded = [r for r in rows if r.get("n_grounded", "") != ""]
    n_boxes = sum(len(json.loads(rows[i]["grounded"])) for i in shown if rows[i].get("grounded"))
    if not grounded:
        return "no boxes: grounding off (slidechat screen --ground-top N draws the N top fields' cells)"
    if n_boxes:
        return f"red boxes: abnormal cells located by the model ({len(grounded)} field(s) grounded)"
    bad = f", {malformed} malformed region(s) ignored" if malformed else ""
    return f"no boxes: the model gave no regions for the {len(grounded)} grounded field(s){bad}"


def render_gallery(slide: str, rows: Sequence[Mapping[str, Any]], order: Sequence[int], fields: np.ndarray,
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
        drawn: List[Tuple[int, int, int, int]] = []
        boxes = json.loads(r["grounded"]) if r.get("grounded") else []
        for lab, *box in boxes:
            b = box_on_tile(box, (float(r["x"]), float(r["y"])), size_level0, t)
            if b is None:
                continue
            cv2.rectangle(tile, (b[0], b[1]), (b[2], b[3]), BOX_RGB, 1 if t < 96 else 2)
            (tw, _), _ = cv2.getTextSize(str(lab), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            cv2.putText(tile, str(lab), (max(0, min(b[0] + 2, t - tw - 1)), max(b[1] - 3, 10)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, BOX_RGB, 1, cv2.LINE_AA)
            drawn.append((b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0))
        canvas[y0:y0 + t, x0:x0 + t] = tile
        if r.get("n_grounded", "") == "":
            gnote = "not grounded"
        else:
            gnote = f"{len(boxes)} box{'es' if len(boxes) != 1 else ''}" if boxes else "no regions"
        cv2.putText(canvas, f"#{j + 1} p={float(r['score']):.3f} ({r['x']},{r['y']})", (x0, y0 + t + 14),
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


def write_gallery(path: PathLike, res: SlideScreen, k: int = 8, max_tile: int = 256) -> Gallery:
    """The top-k fields (highest score first) side by side, grounded boxes drawn (or the picture says
    why there are none), score captioned; returns what was drawn where."""
    from PIL import Image

    order = sorted(range(len(res.rows)), key=lambda i: -float(res.rows[i]["score"]))[:max(1, k)]
    arr = read_fields(res.path, res.plan.grid, np.array(order))
    grid = res.plan.grid
    gallery = render_gallery(res.slide, res.rows, order, arr, float(grid.patch_size_level0), grid.base_mpp,
                             max_tile, int(res.timings.get("malformed_regions", 0) or 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(gallery.image).save(tmp, format="PNG")
    return gallery


def slide_report(res: SlideScreen, opts: ScreenOptions, slide_score: float) -> str:
    """A short Markdown report built from the slide's top fields (scores and grounded findings)."""
    rows = sorted(res.rows, key=lambda r: -float(r["score"]))
    n = len(rows)
    above = sum(float(r["score"]) >= opts.field_threshold for r in rows)
    lines = [f"# Screening report: {res.slide}", "",
             f"- Fields screened: {n} cellular fields of {res.plan.n_candidates} "
             f"({opts.field_size} px at {opts.target_mpp:g} µm/px).",
             f"- Slide score ({opts.aggregator}{', k=' + str(opts.top_k) if opts.aggregator == 'topk_mean' else ''}): "
             f"{slide_score:.3f}; fields with abnormality probability >= {opts.field_threshold:g}: {above}.",
             ]
    grounded = [r for r in rows if r.get("grounded")]
    counts: Dict[str, int] = {}
    for r in grounded:
        for lab, *_ in json.loads(r["grounded"]):
            counts[str(lab)] = counts.get(str(lab), 0) + 1
    if grounded:
        what = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"
        lines.append(f"- Abnormal cells located by the model in its {len(grounded)} most suspicious "
                     f"fields: {what}.")
    lines += ["", "| rank | field (x, y) | abnormality probability | grounded cells |", "|---|---|---|---|"]
    for j, r in enumerate(rows[:max(1, opts.gallery_k)], 1):
        g = json.loads(r["grounded"]) if r.get("grounded") else None
        gtxt = "-" if g is None else (", ".join(str(b[0]) for b in g) or "none")
        lines.append(f"| {j} | ({r['x']}, {r['y']}) | {float(r['score']):.3f} | {gtxt} |")
    if opts.slide_threshold is not None:
        call = "ABNORMAL: review recommended" if slide_score >= opts.slide_threshold else "negative"
        lines += ["", f"Impression: {call} (slide threshold {opts.slide_threshold:g})."]
    elif above:
        lines += ["", f"Impression: {above} suspicious field(s); review the gallery."]
    else:
        lines += ["", "Impression: no field above the field threshold."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# many slides


def _write_slide_outputs(res: SlideScreen, out: Path, opts: ScreenOptions, scorer_info: Dict[str, Any]) -> None:
    from slidechat.evaluation.screening import aggregate

    paths = output_paths(out, res.slide)
    counts = [r["n_grounded"] if r["n_grounded"] != "" else None for r in res.rows]
    agg = opts.aggregator
    if agg == "count_grounded" and all(c is None for c in counts):
        raise SlideChatError("aggregator count_grounded needs grounding", hint="add --ground-top N")
    score = aggregate([float(r["score"]) for r in res.rows], agg, k=opts.top_k,
                      threshold=opts.field_threshold, grounded_counts=counts)
    meta = {"slide": res.slide, "path": str(res.path), "dimensions": list(res.plan.dimensions),
            "grid": res.plan.grid.summary(), "glass_rgb": list(res.plan.masks.glass_rgb),
            "settings": opts.settings(), **scorer_info, "timings": res.timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta["grid"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta["grid"].items()}
    atomic_write_text(paths["meta"], json.dumps(meta, indent=1, default=float) + "\n")
    paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
    write_heatmap(paths["heatmap"], res)
    write_gallery(paths["gallery"], res, opts.gallery_k)
    atomic_write_text(paths["report"], slide_report(res, opts, score))
    write_rows_csv(paths["fields"], res.rows, field_columns(opts))  # last: the "done" marker


class _Screening(SlideTask):
    """Screening as the slide runner's per-slide work."""

    folders = ("fields", "heatmaps", "galleries", "reports")
    finished_word = "screened"
    doing_word = "screening"

    def __init__(self, out: Path, opts: ScreenOptions, scorer: Optional[FieldModel],
                 model_name_or_path: Optional[PathLike], adapter_name_or_path: Optional[PathLike]) -> None:
        self.out, self.opts, self.scorer = out, opts, scorer
        self.model_name_or_path, self.adapter_name_or_path = model_name_or_path, adapter_name_or_path
        self.info: Dict[str, Any] = {}

    def finished_file(self, sid: str) -> Path:
        return output_paths(self.out, sid)["fields"]  # written last

    def counters(self) -> Dict[str, Any]:
        return {"n_fields": 0, "read_s": 0.0, "model_s": 0.0}

    def prepare(self, todo: Sequence[Path], rank: int, world: int) -> None:
        if self.scorer is None:
            if self.model_name_or_path is None:
                raise SlideChatError("screening needs --model_name_or_path (a Qwen2-VL folder)")
            self.scorer = FieldModel(self.model_name_or_path, self.adapter_name_or_path, self.opts)
        self.info = self.scorer.provenance()

    def run(self, path: Path, sid: str) -> SlideScreen:
        stage = "screen"
        try:
            res = screen_slide(path, self.scorer, self.opts)
            stage = "write"
            _write_slide_outputs(res, self.out, self.opts, self.info)
        except Exception as e:  # a failing slide is one failure row; the run goes on
            raise SlideFailed(stage, failure_reason(e)) from e
        return res

    def record(self, sid: str, result: SlideScreen, summary: Dict[str, Any]) -> None:
        summary["n_fields"] += len(result.rows)
        summary["read_s"] += result.timings["read_s"]
        summary["model_s"] += result.timings["model_s"]
        logger.info("%s: %d cellular fields of %d (read %.1fs, model %.1fs)", sid, len(result.rows),
                    result.plan.n_candidates, result.timings["read_s"], result.timings["model_s"])


def screen_slides(slide_paths: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                  model_name_or_path: Optional[PathLike] = None,
                  adapter_name_or_path: Optional[PathLike] = None, labels: Optional[PathLike] = None,
                  opts: Optional[ScreenOptions] = None, overwrite: bool = False,
                  rank: Optional[int] = None, world_size: Optional[int] = None,
                  limit: Optional[int] = None, scorer: Optional[FieldModel] = None) -> Dict[str, Any]:
    """Screen many slides into ``out_dir``; aggregate and (with ``labels``) score them.

    Runs on the slide runner (``apps.runner``) like extraction: sharded round-robin over
    ``rank``/``world_size`` (default: torchrun's env), finished slides skipped, one lock per slide; with
    more than one shard each rank only writes its field tables and ``failures_rank<r>.csv``, and the
    slide table/metrics come from ``reaggregate`` once every rank is done. Returns a summary dict.
    """
    opts = opts or ScreenOptions()
    label_map = read_labels_csv(labels) if labels is not None else None  # fail early on a bad file
    out = Path(out_dir)
    task = _Screening(out, opts, scorer, model_name_or_path, adapter_name_or_path)
    summary = run_slides(slide_paths, out, task, overwrite=overwrite, rank=rank, world_size=world_size,
                         limit=limit, progress=opts.progress)
    if summary["failed"]:
        logger.warning("%d slide(s) failed (see %s); they are not in the slide table or the metrics",
                       len(summary["failed"]), summary["failures_file"])
    if summary["world_size"] == 1:
        summary.update(reaggregate(out, labels=labels, opts=opts, slides=summary["slides"], label_map=label_map))
    else:
        logger.info("rank %d/%d done; when every rank has finished run: slidechat screen --reaggregate %s",
                    summary["rank"], summary["world_size"], out)
    return summary


def reaggregate(out_dir: PathLike, labels: Optional[PathLike] = None, opts: Optional[ScreenOptions] = None,
                slides: Optional[Sequence[str]] = None,
                label_map: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """Slide scores from saved field tables (no model): ``slides.csv``; with labels ``metrics.json``,
    ``roc.png``. ``slides`` restricts to those slide ids (default: every table under ``fields/``)."""
    opts = opts or ScreenOptions()
    out = Path(out_dir)
    fdir = out / "fields"
    if slides is None:
        found = sorted(fdir.glob("*.csv")) if fdir.is_dir() else []
        if not found:
            raise SlideChatError("no field tables (fields/*.csv) to aggregate", out,
                                 hint="run slidechat screen first")
        tables = {p.stem: read_field_table(p) for p in found}
    else:
        tables = {s: read_field_table(fdir / f"{s}.csv") for s in slides if (fdir / f"{s}.csv").is_file()}
    if not tables:
        logger.warning("no slide was screened successfully; nothing to aggregate")
        return {"slides_file": None, "metrics": None}
    scores = slide_scores_from_tables(tables, opts.aggregator, opts.top_k, opts.field_threshold)
    n_fields = {s: len(t) for s, t in tables.items()}
    if label_map is None and labels is not None:
        label_map = read_labels_csv(labels)
    result: Dict[str, Any] = {"scores": scores, "metrics": None}
    thr = opts.slide_threshold
    if label_map is not None:
        missing = [s for s in scores if s not in label_map]
        if missing:
            raise SlideChatError(f"{len(missing)} screened slide(s) have no label: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                                 labels, hint="add them to the labels CSV (slide,label)")
        ids = sorted(scores)
        y = [int(label_map[s]) for s in ids]
        s = [scores[i] for i in ids]
        if len(set(y)) < 2:
            raise SlideChatError("the labels of the screened slides hold one class only: no AUC",
                                 labels)
        m = evaluate_slides(y, s, threshold=thr, n_boot=opts.n_boot)
        thr = m.threshold
        md = m.as_dict()
        md.update({"aggregator": opts.aggregator, "top_k": opts.top_k,
                   "field_threshold": opts.field_threshold})
        atomic_write_text(out / "metrics.json", json.dumps(md, indent=1) + "\n")
        plot_roc(out / "roc.png", y, s, m, title=f"Slide screening ({opts.aggregator})")
        logger.info("%s", m.line())
        result["metrics"] = md
        result["metrics_line"] = m.line()
    rows = slide_table(scores, label_map, thr, n_fields)
    cols = ["slide", "rank", "score", "n_fields"] + (["label"] if label_map is not None else []) + \
        (["call"] if thr is not None else [])
    write_rows_csv(out / "slides.csv", rows, cols)
    result["slides_file"] = str(out / "slides.csv")
    return result


# ----------------------------------------------------------------------------------------------
# demo


def run_screen_demo(work_dir: PathLike, model_dir: PathLike, n_slides: int = 8, seed: int = 101,
                    width: int = 2048, height: int = 2048, batch_size: int = 8, ground_top: int = 1,
                    field_size: int = 224, target_mpp: float = 0.5, image_max_pixels: int = 224 * 224,
                    max_new_tokens: int = 64, n_boot: int = 1000) -> Dict[str, Any]:
    """Held-out synthetic smears -> ``slidechat screen`` with ``model_dir`` -> slide AUC, for the demo.

    Writes ``n_slides`` slides (half abnormal) under ``<work_dir>/cyto_slides`` (reused when present)
    and the screening outputs under ``<work_dir>/screen``. Fields (``field_size`` px at ``target_mpp``)
    and ``image_max_pixels`` must match what the model was trained on: the defaults fit the tiny model
    trained on native 224-px fields at 0.5 µm/px (``configs/tiny/cytochat_sft.py`` feeds 224x224). Returns the summary: ``metrics`` holds
    ``auc``, ``auc_ci_low``, ``auc_ci_high``, ``sensitivity``, ``specificity``; ``metrics_line`` is
    the printable line; pictures are under ``<work_dir>/screen/{heatmaps,galleries}``.
    """
    from slidechat.data.synthetic_cytology import write_cytology_slides

    work = Path(work_dir)
    sl = work / "cyto_slides"
    if not (sl / "labels.csv").is_file():
        write_cytology_slides(sl, n_slides=n_slides, seed=seed, width=width, height=height)
    opts = ScreenOptions(field_size=field_size, target_mpp=target_mpp, batch_size=batch_size,
                         ground_top=ground_top, progress=False, n_boot=n_boot,
                         image_max_pixels=image_max_pixels, max_new_tokens=max_new_tokens)
    return screen_slides(sl / "slides", work / "screen", model_dir, labels=sl / "labels.csv", opts=opts)
