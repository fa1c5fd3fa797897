"""Slide-level cytology screening: tile a smear into fields of view, keep the cellular ones, score
each with the cytology copilot (Qwen2-VL), aggregate to a slide score, explain the slide.

Per slide (``screen_slide``):

1. **Open + resolution** with the extraction's reader (:class:`slidechat.wsi.slide.Slide`, OpenSlide
   formats and large PNG/JPEG) and :func:`~slidechat.wsi.slide.resolve_resolution`.
2. **Field grid**: :func:`slidechat.wsi.patching.plan_patches` lays non-overlapping fields of
   ``field_size`` px at ``target_mpp`` (default 512 px at 0.5 µm/px, what the synthetic fields and
   CytoChat's ~512-px images use), reading from the best pyramid level as extraction does.
3. **Cellular-content detector** (:mod:`slidechat.wsi.cellularity`), instead of the histology tissue
   segmentation, which drops exactly the sparse fields a cytologist reads: glass colour estimated from
   the slide, optical density per thumbnail pixel, a field kept when its cellular fraction is
   >= ``min_cellular`` (default 0.02); cellular and nuclear fractions are saved per field.
4. **Model** (:class:`slidechat.inference.field_scorer.FieldModel`): each kept field, in batches, is
   asked the screening question (:data:`~slidechat.data.vocabulary.SCREENING_QUESTION`, options
   ``[A.Normal, B.Abnormal]``). The field score is the model's **probability** of the abnormal
   option(s) from one forward pass; nothing is parsed from generated text.
5. **Grounding** (optional, ``ground_top`` fields per slide, or all): the top fields are asked
   ``Locate all abnormal cells.``; the answers are parsed with
   :func:`slidechat.evaluation.regions.parse_regions` and mapped to level-0 boxes.
6. **Outputs** (:mod:`slidechat.apps.screening_report`, under ``out_dir``): ``fields/<slide>.csv`` (one
   row per kept field, level-0 coordinates, score, option probabilities, grounded cells; written last =
   the per-slide "done" marker), ``fields/<slide>.json`` (run settings), ``heatmaps/<slide>.png``,
   ``galleries/<slide>.png`` (top-k fields with grounded boxes), ``reports/<slide>.md``; then
   ``slides.csv`` (score + ranking), with labels ``metrics.json`` + ``roc.png``, and ``failures.csv``
   (``failures_rank<r>.csv``) as in extraction. Reruns skip slides whose field table exists;
   ``reaggregate`` needs no model.

A field's numbers stay numeric (:class:`slidechat.evaluation.screening.FieldRow`) from scoring to the
table, which formats them once; ``reaggregate`` reads the tables back into the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from slidechat.apps.runner import SlideFailed, SlideTask, failure_reason, run_slides
from slidechat.apps.screening_report import output_paths, write_slide_outputs
from slidechat.data.synthetic_cytology import write_cytology_slides
from slidechat.data.vocabulary import (GROUND_ABNORMAL_QUESTION, SCREENING_ABNORMAL_INDEX, SCREENING_OPTIONS,
                                       SCREENING_QUESTION)
from slidechat.evaluation.regions import parse_regions
from slidechat.evaluation.screening import (DEFAULT_AGGREGATOR, DEFAULT_FIELD_THRESHOLD, DEFAULT_TOP_K, FieldRow,
                                            aggregate_rows, evaluate_slides, plot_roc, read_field_table,
                                            read_labels_csv, slide_scores_from_tables, slide_table,
                                            write_rows_csv)
from slidechat.inference.field_scorer import FieldModel, model_image_size
from slidechat.utils.atomic import atomic_write_text
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.wsi.cellularity import FieldPlan, plan_fields
from slidechat.wsi.patching import PatchGrid
from slidechat.wsi.reader import PatchReader
from slidechat.wsi.slide import Slide, slide_id

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
        """The settings a field table's ``.json`` records (what shapes the numbers, not how they ran)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k not in ("progress", "device", "trust_remote_code", "allow_partial")}


# ----------------------------------------------------------------------------------------------
# one slide


@dataclass
class SlideScreen:
    """One screened slide in memory: its field rows, its plan and where the time went."""

    slide: str
    path: Path
    rows: List[FieldRow]
    plan: FieldPlan
    timings: Dict[str, float] = field(default_factory=dict)


@dataclass
class _Clock:
    """Seconds spent reading fields vs running the model (the throughput benchmark's split)."""

    read_s: float = 0.0
    model_s: float = 0.0

    def run(self, reader: PatchReader, idx: np.ndarray, model_step: Any) -> Any:
        """Read the fields ``idx`` and hand them (as PIL images) to ``model_step``, timing both."""
        from PIL import Image

        ta = time.perf_counter()
        arr = reader.read(idx)
        tb = time.perf_counter()
        out = model_step([Image.fromarray(a) for a in arr])
        self.read_s += tb - ta
        self.model_s += time.perf_counter() - tb
        return out


def _option_probabilities(reader: PatchReader, scorer: FieldModel, n: int, bs: int, clock: _Clock,
                          bar: Any) -> Tuple[np.ndarray, np.ndarray]:
    """(n, n_options) option probabilities and the option mass of every field, batch by batch."""
    probs = np.zeros((n, len(scorer.option_ids)))
    mass = np.zeros(n)
    for s in range(0, n, bs):
        idx = np.arange(s, min(s + bs, n))
        probs[idx], mass[idx] = clock.run(reader, idx, scorer.option_probs)
        bar.update(len(idx))
    return probs, mass


def _fields_to_ground(score: np.ndarray, opts: ScreenOptions) -> List[int]:
    """All fields (``ground_all``), the ``ground_top`` highest-scoring ones, or none."""
    if opts.ground_all:
        return list(range(len(score)))
    if opts.ground_top > 0:
        return [int(i) for i in np.argsort(-score, kind="stable")[:opts.ground_top]]
    return []


def _ground(reader: PatchReader, scorer: FieldModel, grid: PatchGrid, fields: List[int], opts: ScreenOptions,
            clock: _Clock) -> Tuple[Dict[int, List[List[Any]]], int]:
    """Level-0 boxes ``[label, x1, y1, x2, y2]`` the model locates in each of ``fields``, and the number of
    malformed regions in its answers."""
    if not fields:
        return {}, 0
    mw, mh = model_image_size(grid.patch_size, opts)
    f0 = grid.patch_size_level0 / float(mw)  # model image px -> level-0 px
    f1 = grid.patch_size_level0 / float(mh)
    grounded: Dict[int, List[List[Any]]] = {}
    malformed = 0
    bs = max(1, int(opts.batch_size))
    for s in range(0, len(fields), bs):
        idx = np.array(fields[s:s + bs])
        texts = clock.run(reader, idx, scorer.ground)
        for i, text in zip(idx, texts):
            parsed = parse_regions(text, image_size=(mw, mh))
            malformed += len(parsed.malformed)
            x0, y0 = (float(v) for v in grid.coords[i])
            grounded[int(i)] = [[r.label or "abnormal", round(x0 + r.x1 * f0, 1), round(y0 + r.y1 * f1, 1),
                                 round(x0 + r.x2 * f0, 1), round(y0 + r.y2 * f1, 1)] for r in parsed.boxes]
    return grounded, malformed


def _field_rows(sid: str, plan: FieldPlan, probs: np.ndarray, mass: np.ndarray, score: np.ndarray,
                grounded: Mapping[int, List[List[Any]]]) -> List[FieldRow]:
    grid = plan.grid
    return [FieldRow.measured(sid, i, int(grid.coords[i][0]), int(grid.coords[i][1]), grid.patch_size_level0,
                              grid.tissue_fraction[i], plan.nuclear_fraction[i], score[i], mass[i], probs[i],
                              grounded.get(i))
            for i in range(len(grid))]


def screen_slide(path: PathLike, scorer: FieldModel, opts: ScreenOptions) -> SlideScreen:
    """Tile, detect, score (and ground) one slide in memory. Errors are SlideChatErrors naming it."""
    from tqdm.auto import tqdm

    path = Path(path)
    sid = slide_id(path)
    t0 = time.perf_counter()
    with Slide(path) as slide:  # opened once: planning and every field read use this handle
        plan = plan_fields(slide, opts)
        t1 = time.perf_counter()
        n = len(plan.grid)
        bs = max(1, int(opts.batch_size))
        clock = _Clock()
        reader = PatchReader(path, plan.grid, bs, slide=slide)
        bar = tqdm(total=n, desc=sid[:30], unit="field", leave=False, disable=not opts.progress)
        try:
            probs, mass = _option_probabilities(reader, scorer, n, bs, clock, bar)
            score = scorer.abnormal_score(probs)
            grounded, malformed = _ground(reader, scorer, plan.grid, _fields_to_ground(score, opts), opts,
                                          clock)
        finally:
            bar.close()
            reader.close()
    timings = {"plan_s": t1 - t0, "read_s": clock.read_s, "model_s": clock.model_s,
               "total_s": time.perf_counter() - t0, "n_fields": n, "n_candidates": plan.n_candidates,
               "malformed_regions": malformed}
    return SlideScreen(sid, path, _field_rows(sid, plan, probs, mass, score, grounded), plan, timings)


def _write_slide_outputs(res: SlideScreen, out: Path, opts: ScreenOptions, scorer_info: Dict[str, Any]) -> None:
    """The slide's score by ``opts.aggregator``, then its files (the field table last)."""
    if opts.aggregator == "count_grounded" and all(r.n_grounded is None for r in res.rows):
        raise SlideChatError("aggregator count_grounded needs grounding", hint="add --ground-top N")
    score = aggregate_rows(res.rows, opts.aggregator, k=opts.top_k, threshold=opts.field_threshold)
    write_slide_outputs(res, out, opts, scorer_info, score)


# ----------------------------------------------------------------------------------------------
# many slides


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
    trained on native 224-px fields at 0.5 µm/px (``configs/tiny/cytochat_sft.py`` feeds 224x224).
    Returns the summary: ``metrics`` holds ``auc``, ``auc_ci_low``, ``auc_ci_high``, ``sensitivity``,
    ``specificity``; ``metrics_line`` is the printable line; pictures are under ``<work_dir>/screen/{heatmaps,galleries}``.
    """
    work = Path(work_dir)
    sl = work / "cyto_slides"
    if not (sl / "labels.csv").is_file():
        write_cytology_slides(sl, n_slides=n_slides, seed=seed, width=width, height=height)
    opts = ScreenOptions(field_size=field_size, target_mpp=target_mpp, batch_size=batch_size,
                         ground_top=ground_top, progress=False, n_boot=n_boot,
                         image_max_pixels=image_max_pixels, max_new_tokens=max_new_tokens)
    return screen_slides(sl / "slides", work / "screen", model_dir, labels=sl / "labels.csv", opts=opts)
