"""Multi-cell grounding: how well predicted boxes find the true cells of the asked class.

Definition (neither CytoChat nor LLaMA-Factory publishes one; this is the usual one):

* Per row (one image and one ``"Locate all <class>."`` question), predicted and true boxes are matched
  one-to-one, **same class only**, maximising the total IoU (Hungarian assignment,
  ``scipy.optimize.linear_sum_assignment``). Pairs below the IoU threshold are set to 0 before the
  assignment and dropped after it, so they can neither count as matches nor block a valid pair.
  A greedy best-IoU-first matching can find fewer matches (see the tests).
* Micro precision = matched / predicted boxes, recall = matched / true boxes, F1 = their harmonic mean;
  overall and per class, at IoU 0.3, 0.5 (headline) and 0.75. Mean IoU of the matched pairs at 0.5.
* Count error per row: predicted - true number of boxes (mean absolute and mean signed).
* A predicted box without a label (``<region>`` not preceded by ``"hsil 3 is located at"``) takes the
  class the question asked for; with no class in the question it matches only unlabelled truth.
  Class names go through :func:`slidechat.evaluation.referring.canonical_class` (``HSIL`` = ``hsil``).
* Malformed predicted regions are not boxes: they are counted and listed. Rows whose inference failed
  (``error``) count as rows with no predictions (wrong, never skipped) and are listed.
* IoU uses continuous coordinates (no +1 pixel convention).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from slidechat.evaluation.boxes import box_format as get_format
from slidechat.evaluation.referring import canonical_class
from slidechat.evaluation.regions import Region, iou_matrix
from slidechat.evaluation.tables import fmt_number, fmt_pct, markdown_table, shorten
from slidechat.utils.errors import SlideChatError

IOU_THRESHOLDS = (0.3, 0.5, 0.75)
HEADLINE_IOU = 0.5


def match_boxes(pred: Sequence[Region], truth: Sequence[Region], iou_threshold: float = HEADLINE_IOU
                ) -> List[Tuple[int, int, float]]:
    """One-to-one matches ``(pred_index, truth_index, iou)`` with IoU >= threshold, same label only,
    maximising the total IoU of valid pairs."""
    out: List[Tuple[int, int, float]] = []
    labels = {r.label for r in pred} & {r.label for r in truth}
    for lab in labels:
        pi = [i for i, r in enumerate(pred) if r.label == lab]
        ti = [j for j, r in enumerate(truth) if r.label == lab]
        m = iou_matrix([pred[i] for i in pi], [truth[j] for j in ti])
        valid = np.where(m >= iou_threshold, m, 0.0)
        if not valid.any():
            continue
        rows, cols = linear_sum_assignment(valid, maximize=True)
        for r, c in zip(rows, cols):
            if m[r, c] >= iou_threshold and valid[r, c] > 0:
                out.append((pi[r], ti[c], float(m[r, c])))
    return sorted(out)


@dataclass
class GroundingItem:
    """One row to score: boxes already parsed; ``failed`` is the inference error, if any."""

    key: str
    pred: List[Region]
    truth: List[Region]
    query_class: Optional[str] = None
    malformed: List[str] = field(default_factory=list)
    failed: str = ""


def _prf(tp: int, n_pred: int, n_true: int) -> Dict[str, Any]:
    p = tp / n_pred if n_pred else float("nan")
    r = tp / n_true if n_true else float("nan")
    if n_pred == 0 and n_true == 0:
        f1 = float("nan")
    elif tp == 0:
        f1 = 0.0
    else:
        f1 = 2 * p * r / (p + r)
    return {"tp": tp, "n_pred": n_pred, "n_true": n_true, "precision": p, "recall": r, "f1": f1}


def _key(t: float) -> str:
    return f"{t:g}"


@dataclass
class GroundingReport:
    """Everything the grounding scorer measured (fractions in [0, 1]; NaN when undefined)."""

    n_rows: int
    overall: Dict[str, Dict[str, Any]]
    per_class: Dict[str, Dict[str, Dict[str, Any]]]
    mean_iou: float
    count_error: Dict[str, float]
    malformed: Dict[str, Any]
    failed: List[Dict[str, str]] = field(default_factory=list)
    unlabelled_pred: int = 0
    off_query_pred: int = 0
    thresholds: Tuple[float, ...] = IOU_THRESHOLDS
    source: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"task": "grounding", "source": self.source, "n_rows": self.n_rows,
                "iou_thresholds": list(self.thresholds), "headline_iou": HEADLINE_IOU,
                "overall": self.overall, "per_class": self.per_class, "mean_iou_of_matches": self.mean_iou,
                "count_error": self.count_error, "malformed": self.malformed, "failed": self.failed,
                "unlabelled_pred_boxes": self.unlabelled_pred, "off_query_pred_boxes": self.off_query_pred,
                "notes": self.notes}

    def to_markdown(self) -> str:
        return grounding_markdown(self)


def grounding_markdown(report: GroundingReport, max_listed: int = 20) -> str:
    """Overall P/R/F1 at each IoU, per class, count error and the malformed/failed rows."""
    src = f" — `{os.path.basename(report.source)}`" if report.source else ""
    parts = [f"## Multi-cell grounding{src}\n",
             f"{report.n_rows} rows (image + question); boxes matched one-to-one per row, same class, "
             "maximising total IoU (Hungarian).\n"]
    ts = list(report.overall.keys())
    rows = []
    for t in ts:
        d = report.overall[t]
        rows.append([f"IoU ≥ {t}", d["n_pred"], d["n_true"], d["tp"], fmt_pct(d["precision"]),
                     fmt_pct(d["recall"]), fmt_pct(d["f1"])])
    parts.append(markdown_table(["", "predicted", "true", "matched", "precision (%)", "recall (%)", "F1 (%)"],
                                rows))
    parts.append("\n" + markdown_table(
        ["mean IoU of matches (IoU ≥ 0.5)", "count error / row (mean abs)",
         "count error / row (mean signed)", "rows with exact count (%)"],
        [[fmt_number(report.mean_iou, 3), fmt_number(report.count_error["mean_abs"]),
          fmt_number(report.count_error["mean_signed"]), fmt_pct(report.count_error["exact"])]], ["r", "r", "r", "r"]))
    parts.append("\n### By class\n")
    crow = []
    for c, by_t in report.per_class.items():
        h = by_t["0.5"]
        crow.append([c, h["n_true"], h["n_pred"], fmt_pct(h["precision"]), fmt_pct(h["recall"]),
                     fmt_pct(h["f1"])] + [fmt_pct(by_t[t]["f1"]) for t in ts if t != "0.5"])
    parts.append(markdown_table(["class", "true", "predicted", "P@0.5 (%)", "R@0.5 (%)", "F1@0.5 (%)"]
                                + [f"F1@{t} (%)" for t in ts if t != "0.5"], crow))
    extra = []
    if report.unlabelled_pred:
        extra.append(f"{report.unlabelled_pred} predicted box(es) had no class label and took the "
                     "question's class.")
    if report.off_query_pred:
        extra.append(f"{report.off_query_pred} predicted box(es) name a class neither asked for nor in the "
                     "row's truth (they can only be false positives).")
    mal = report.malformed
    extra.append(f"Malformed predicted regions (not boxes, not guessed): {mal['n']} in {mal['rows']} row(s).")
    if report.failed:
        extra.append(f"Rows whose inference failed (scored as no predictions): {len(report.failed)}.")
    extra += report.notes
    parts.append("\n" + "\n".join(f"- {e}" for e in extra))
    if mal["listed"]:
        shown = min(max_listed, len(mal["listed"]))
        parts.append(f"\n### Malformed regions ({mal['rows']} row(s)" + (
            f", first {shown} listed; the JSON report has all)\n" if shown < mal["rows"] else ")\n"))
        parts.append(markdown_table(["key", "malformed"], [[m["key"], shorten("; ".join(m["malformed"]))]
                                                          for m in mal["listed"][:max_listed]], ["l", "l"]))
    if report.failed:
        parts.append("\n### Failed rows\n")
        parts.append(markdown_table(["key", "error"], [[e["key"], shorten(e["error"])] for e in
                                                       report.failed[:max_listed]], ["l", "l"]))
    return "\n".join(parts) + "\n"


def _canon_items(items: Sequence[GroundingItem], aliases: Optional[Mapping[str, str]]
                 ) -> Tuple[List[GroundingItem], int, int]:
    vocab: Set[str] = set()
    for it in items:
        for r in it.truth:
            if r.label:
                vocab.add(canonical_class(r.label, (), aliases) or "")
        if it.query_class:
            vocab.add(canonical_class(it.query_class, (), aliases) or "")
    vocab.discard("")
    out = []
    unlabelled = off_query = 0
    for it in items:
        q = canonical_class(it.query_class, vocab, aliases) if it.query_class else None

        def fix(r: Region, is_pred: bool) -> Region:
            nonlocal unlabelled
            lab = canonical_class(r.label, vocab, aliases) if r.label else None
            if lab is None:
                lab = q
                unlabelled += is_pred
            return Region(lab, r.x1, r.y1, r.x2, r.y2)

        truth = [fix(r, False) for r in it.truth]
        pred = [fix(r, True) for r in it.pred]
        # a class neither asked for nor present in this row's truth ("Locate all hsil." -> "lsil 1 ...")
        allowed = {q} | {r.label for r in truth}
        off_query += sum(1 for r in pred if q is not None and r.label not in allowed)
        out.append(GroundingItem(it.key, pred, truth, q, it.malformed, it.failed))
    return out, unlabelled, off_query


def score_grounding(items: Sequence[GroundingItem], thresholds: Sequence[float] = IOU_THRESHOLDS,
                    aliases: Optional[Mapping[str, str]] = None, source: Optional[str] = None,
                    max_listed: int = 1000) -> GroundingReport:
    """Micro P/R/F1 overall and per class at each IoU threshold, mean IoU of matches, count error."""
    thresholds = tuple(sorted(set(float(t) for t in thresholds) | {HEADLINE_IOU}))
    items, unlabelled, off_query = _canon_items(items, aliases)
    tp = {t: 0 for t in thresholds}
    cls_tp: Dict[str, Dict[float, int]] = {}
    cls_pred: Dict[str, int] = {}
    cls_true: Dict[str, int] = {}
    n_pred = n_true = 0
    ious: List[float] = []
    count_err: List[int] = []
    malformed_rows: List[Dict[str, Any]] = []
    n_malformed = 0
    failed = []
    for it in items:
        pred = [] if it.failed else it.pred
        if it.failed:
            failed.append({"key": it.key, "error": it.failed})
        if it.malformed and not it.failed:
            n_malformed += len(it.malformed)
            malformed_rows.append({"key": it.key, "malformed": list(it.malformed)})
        n_pred += len(pred)
        n_true += len(it.truth)
        count_err.append(len(pred) - len(it.truth))
        for r in pred:
            c = r.label or "(none)"
            cls_pred[c] = cls_pred.get(c, 0) + 1
        for r in it.truth:
            c = r.label or "(none)"
            cls_true[c] = cls_true.get(c, 0) + 1
        for t in thresholds:
            matches = match_boxes(pred, it.truth, t)
            tp[t] += len(matches)
            for _, j, v in matches:
                c = it.truth[j].label or "(none)"
                cls_tp.setdefault(c, {}).setdefault(t, 0)
                cls_tp[c][t] += 1
                if t == HEADLINE_IOU:
                    ious.append(v)
    overall = {_key(t): _prf(tp[t], n_pred, n_true) for t in thresholds}
    classes = sorted(set(cls_pred) | set(cls_true), key=lambda c: (-cls_true.get(c, 0), c))
    per_class = {c: {_key(t): _prf(cls_tp.get(c, {}).get(t, 0), cls_pred.get(c, 0), cls_true.get(c, 0))
                     for t in thresholds} for c in classes}
    ce = np.asarray(count_err, dtype=np.float64)
    count_error = {"mean_abs": float(np.abs(ce).mean()) if ce.size else float("nan"),
                   "mean_signed": float(ce.mean()) if ce.size else float("nan"),
                   "exact": float((ce == 0).mean()) if ce.size else float("nan")}
    malformed = {"n": n_malformed, "rows": len(malformed_rows), "listed": malformed_rows[:max_listed]}
    return GroundingReport(n_rows=len(items), overall=overall, per_class=per_class,
                           mean_iou=float(np.mean(ious)) if ious else float("nan"), count_error=count_error,
                           malformed=malformed, failed=failed, unlabelled_pred=unlabelled,
                           off_query_pred=off_query, thresholds=thresholds, source=source)


_LOCATE = re.compile(r"\blocate all\s+(.+?)\s*[.?!]?\s*$", re.IGNORECASE | re.DOTALL)


def query_class(question: str) -> Optional[str]:
    """The class a grounding question asks for: ``"Locate all hsil."`` -> ``"hsil"``."""
    m = _LOCATE.search(question or "")
    return m.group(1).strip() if m else None


def grounding_items(records: Sequence[Any], image_size: Callable[[Any], Optional[Tuple[int, int]]],
                    source: Optional[str] = None, box_format: str = "region",
                    resize: Optional[Mapping[str, Optional[int]]] = None) -> List[GroundingItem]:
    """Parse truth and predicted boxes of each record (:class:`~.cytology_io.CytoRecord`).

    ``box_format`` (:mod:`slidechat.evaluation.boxes`): ``region`` reads CytoChat's ``<region>`` pixels
    and Qwen2-VL native boxes as always; ``qwen2_vl``/``qwen2_5_vl``/``qwen3_vl`` read that family's
    native boxes (and any ``<region>``) in both label and prediction and convert them to original-image
    pixels; ``resize`` holds the LLaMA-Factory scaling (``image_max_pixels``/``image_min_pixels``) the
    Qwen2.5-VL conversion needs. ``image_size(record)`` is asked only when a text holds boxes that need
    it. A truth label with a malformed region is an error (the reference must be exact); a prediction's
    are counted.
    """
    fmt = get_format(box_format)
    native = box_format != "region"
    items = []
    for r in records:
        where = f"{source}: {r.where}" if source else r.where
        pred_text = r.predict if not r.error else ""
        if native:
            needs = fmt.present(pred_text) or fmt.present(r.label)
        else:  # <region> is in pixels already; Qwen2-VL box tokens are read too and need the size
            needs = "<|box_start|>" in (r.predict or "") or "<|box_start|>" in r.label
        size = image_size(r) if needs else None
        if needs and size is None:
            what = (f"{box_format} boxes need the image size and it is unknown" if native else
                    "Qwen2-VL boxes are on a 0-1000 scale and the image size is unknown")
            raise SlideChatError(f"{r.where}: {what}", source,
                                 hint="give readable image paths (--image-dir) or --image-size W H")
        truth = fmt.to_pixels(r.label, size, source=where, **dict(resize or {}))
        if truth.malformed:
            raise SlideChatError(f"{r.where}: malformed {'box(es)' if native else 'region(s)'} in the label: "
                                 f"{truth.malformed[:3]}", source)
        pred = fmt.to_pixels(pred_text, size, source=where, **dict(resize or {}))
        items.append(GroundingItem(key=r.key, pred=pred.boxes, truth=truth.boxes,
                                   query_class=query_class(r.question), malformed=pred.malformed,
                                   failed=r.error))
    return items


__all__ = ["IOU_THRESHOLDS", "GroundingItem", "GroundingReport", "match_boxes", "score_grounding",
           "grounding_items", "query_class"]
