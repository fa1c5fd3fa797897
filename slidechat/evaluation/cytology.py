"""Score a cytology predictions file with one scorer: read, pick the rows of the task, score, report.

Used by ``slidechat eval {mcq,grounding,region,report} FILE`` (:func:`score_file`) and ``slidechat
eval cytology FILE`` (:func:`score_all`: every task in the file, one section each); see
:mod:`cytology_io` for the inputs and task detection, and each scorer's module for its definitions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from slidechat.evaluation.captions import text_task_metrics
from slidechat.evaluation.cytology_io import (SCORER_TASKS, CytoFile, CytoRecord, detect_task, image_size_of,
                                              read_predictions, require_predictions, select_task)
from slidechat.evaluation.cytology_mcq import score_cytology_mcq
from slidechat.evaluation.grounding import IOU_THRESHOLDS, grounding_items, score_grounding
from slidechat.evaluation.referring import referring_items, score_referring
from slidechat.evaluation.tables import text_metrics_markdown
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

CYTOLOGY_SUFFIXES = (".jsonl", ".json", ".xlsx", ".xlsm")


@dataclass
class ScoreResult:
    """The JSON-able report and its Markdown."""

    data: Dict[str, Any]
    markdown: str


def is_cytology_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in CYTOLOGY_SUFFIXES


def _dedupe(records: List[CytoRecord]) -> Tuple[List[CytoRecord], int]:
    seen = set()
    out = []
    for r in records:
        k = (tuple(r.images), r.prompt, r.label, r.predict)
        if k in seen:
            continue
        seen.add(k)
        out.append(r)
    return out, len(records) - len(out)


def score_file(path: PathLike, scorer: str, task: Optional[str] = None, *, sheet: Optional[str] = None,
               image_size: Optional[Tuple[int, int]] = None, image_dir: Optional[PathLike] = None,
               drop_duplicates: bool = False, aliases: Optional[Mapping[str, str]] = None,
               iou_thresholds: Sequence[float] = IOU_THRESHOLDS, box_format: str = "region",
               resize: Optional[Mapping[str, Optional[int]]] = None) -> ScoreResult:
    """Score ``path`` with ``scorer`` (mcq / grounding / region / report); see the module doc.

    ``box_format``/``resize``: the grounding scorer's box convention
    (:func:`slidechat.evaluation.grounding.grounding_items`)."""
    f = read_predictions(path, sheet=sheet)
    return _score(f, scorer, task, image_size=image_size, image_dir=image_dir,
                  drop_duplicates=drop_duplicates, aliases=aliases, iou_thresholds=iou_thresholds,
                  box_format=box_format, resize=resize)


def score_all(path: PathLike, *, sheet: Optional[str] = None, **kw: Any) -> ScoreResult:
    """Score every task a file holds, each with its scorer (a LLaMA-Factory test set mixing tasks).

    Every row must fit a task (else the error names the row); sections follow the order mcq,
    grounding, region, report (with VQA). ``kw`` as for :func:`score_file`.
    """
    f = read_predictions(path, sheet=sheet)
    detected = [detect_task(r.question, r.label, r.turns) for r in f.records]
    for r, t in zip(f.records, detected):
        if t is None:
            raise SlideChatError(f"{r.where} fits no task (question {r.question[:80]!r})", f.path,
                                 hint="score such rows with 'slidechat eval <scorer> --task <task>'")
    data: Dict[str, Any] = {"source": str(f.path), "input_format": f.format, "n_rows": len(f.records),
                            "scorers": {}}
    parts = []
    for scorer, tasks in SCORER_TASKS.items():
        rows = [r for r, t in zip(f.records, detected) if t in tasks]
        if not rows:
            continue
        sub = CytoFile(f.path, f.format, rows, list(f.notes))
        res = _score(sub, scorer, None, **kw)
        data["scorers"][scorer] = res.data
        parts.append(res.markdown)
    return ScoreResult(data, "\n".join(parts))


def _score(f: CytoFile, scorer: str, task: Optional[str], *,
           image_size: Optional[Tuple[int, int]] = None, image_dir: Optional[PathLike] = None,
           drop_duplicates: bool = False, aliases: Optional[Mapping[str, str]] = None,
           iou_thresholds: Sequence[float] = IOU_THRESHOLDS, box_format: str = "region",
           resize: Optional[Mapping[str, Optional[int]]] = None) -> ScoreResult:
    src = str(f.path)
    records, by_task, skipped = select_task(f, scorer, task)
    notes: List[str] = [f"Input: {f.format}, {len(f.records)} row(s)."] + list(f.notes)
    if skipped:
        notes.append("Left out (other tasks, --task " + str(task) + "): "
                     + ", ".join(f"{n} {t}" for t, n in sorted(skipped.items())) + ".")
    if drop_duplicates:
        records, n_dup = _dedupe(records)
        keep = {id(r) for r in records}
        by_task = {t: [r for r in rs if id(r) in keep] for t, rs in by_task.items()}
        if n_dup:
            notes.append(f"{n_dup} row(s) repeating an earlier row exactly were dropped (--drop-duplicates).")
    else:
        _, n_dup = _dedupe(records)
        if n_dup:
            notes.append(f"{n_dup} row(s) repeat an earlier row exactly (same image, prompt, label and "
                         "prediction); all are scored as given (--drop-duplicates scores each once).")
    require_predictions(f, records)

    if scorer == "mcq":
        rep = score_cytology_mcq(records, source=src)
        rep.notes = notes
        data, md = rep.to_dict(), rep.to_markdown()
    elif scorer == "grounding":
        base = Path(image_dir) if image_dir else f.path.parent
        items = grounding_items(records, lambda r: image_size_of(r, base, image_size, f.path), source=src,
                                box_format=box_format, resize=resize)
        rep = score_grounding(items, thresholds=iou_thresholds, aliases=aliases, source=src)
        if box_format != "region":
            notes.append(f"Boxes read as {box_format} and converted to original-image pixels.")
        rep.notes = notes
        data, md = rep.to_dict(), rep.to_markdown()
    elif scorer == "region":
        rep = score_referring(referring_items(records), aliases=aliases, source=src)
        rep.notes = notes
        data, md = rep.to_dict(), rep.to_markdown()
    elif scorer == "report":
        data = text_task_metrics({t: [(r.predict, r.label, r.error) for r in rs]
                                  for t, rs in by_task.items()}, source=f.path)
        data.update(task="report", source=src, notes=notes)
        md = text_metrics_markdown(data, src)
    else:
        raise SlideChatError(f"unknown scorer {scorer!r}")
    data["input_format"] = f.format
    data["skipped"] = skipped
    return ScoreResult(data, md)


def default_report_paths(path: PathLike, scorer: str, out_dir: PathLike) -> Tuple[Path, Path]:
    """``OUT/<file stem>.<scorer>.{json,md}``."""
    stem = Path(path).stem
    out = Path(out_dir)
    return out / f"{stem}.{scorer}.json", out / f"{stem}.{scorer}.md"
