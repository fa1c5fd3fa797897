"""Patch -> slide in cytology: aggregate per-field abnormality scores into a slide score, and score
slides against labels (ROC AUC with a bootstrap CI, sensitivity/specificity, ROC curve).

No model is needed here: everything works on the per-field tables written by ``slidechat screen``,
so a slide set can be re-aggregated with another rule in seconds.

Aggregators (published practice: a slide is as suspicious as its most suspicious fields; Cheng et
al., Nat Commun 2021 rank the top lesion cells; counts of lesion cells are the cytologist's own rule):

* ``max``            -- the highest field score. Most sensitive, and most exposed to one false positive.
* ``topk_mean``      -- mean of the ``k`` highest field scores (all fields when fewer); the default
  (k = 5): one spurious field cannot decide the slide, a focus of several abnormal fields does.
* ``fraction_above`` -- share of the slide's fields whose score is >= ``threshold`` (burden of disease;
  insensitive to small foci on large slides).
* ``count_grounded`` -- number of abnormal cells the model grounded (``<region>`` boxes) in the fields
  it was asked to ground; needs ``slidechat screen --ground-top N`` (or ``--ground-all``).

Metrics: AUC is the Mann-Whitney probability that a random abnormal slide scores above a random
normal one (ties count 1/2). Its 95 % CI is the percentile interval of ``n_boot`` stratified bootstrap
resamples (slides drawn with replacement within each class, so every resample has both classes).
The operating threshold is the user's or Youden's (max sensitivity + specificity - 1 over the observed
scores); a slide is called abnormal when its score is >= the threshold.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from slidechat.data.vocabulary import LETTERS
from slidechat.utils.atomic import atomic_path, save_figure
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

AGGREGATORS: Tuple[str, ...] = ("max", "topk_mean", "fraction_above", "count_grounded")
DEFAULT_AGGREGATOR = "topk_mean"
DEFAULT_TOP_K = 5
DEFAULT_FIELD_THRESHOLD = 0.5
POSITIVE_LABELS = ("abnormal", "positive", "1", "true", "yes")
NEGATIVE_LABELS = ("normal", "negative", "0", "false", "no")


def aggregate(scores: Sequence[float], method: str = DEFAULT_AGGREGATOR, *, k: int = DEFAULT_TOP_K,
              threshold: float = DEFAULT_FIELD_THRESHOLD,
              grounded_counts: Optional[Sequence[Optional[float]]] = None) -> float:
    """Slide score from its field scores (see the module docstring for each ``method``)."""
    s = np.asarray(scores, dtype=np.float64)
    if method not in AGGREGATORS:
        raise SlideChatError(f"unknown aggregator {method!r}; choose from {', '.join(AGGREGATORS)}")
    if method == "count_grounded":
        if grounded_counts is None:
            raise SlideChatError("aggregator count_grounded needs grounded cells per field",
                                 hint="run slidechat screen with --ground-top N or --ground-all")
        c = [float(v) for v in grounded_counts if v is not None and not _isnan(v)]
        if not c:
            raise SlideChatError("aggregator count_grounded: no field of this slide was grounded",
                                 hint="run slidechat screen with --ground-top N or --ground-all")
        return float(sum(c))
    if s.size == 0:
        raise SlideChatError("cannot aggregate a slide without field scores")
    if not np.isfinite(s).all():
        raise SlideChatError("field scores contain NaN/Inf")
    if method == "max":
        return float(s.max())
    if method == "topk_mean":
        if k < 1:
            raise SlideChatError(f"top-k needs k >= 1, got {k}")
        return float(np.sort(s)[::-1][:k].mean())
    return float((s >= threshold).mean())


def _isnan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def parse_label(value: Any, where: str = "") -> int:
    """``abnormal``/``positive``/1 -> 1, ``normal``/``negative``/0 -> 0; anything else is an error."""
    v = str(value).strip().lower()
    if v in POSITIVE_LABELS:
        return 1
    if v in NEGATIVE_LABELS:
        return 0
    raise SlideChatError(f"unknown slide label {value!r} (use normal/abnormal or 0/1)", where or None)


def read_labels_csv(path: PathLike) -> Dict[str, int]:
    """``slide,label`` CSV -> {slide: 0/1}. Bad rows name the file and row."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise SlideChatError("labels file not found", p)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as e:
        raise SlideChatError(f"cannot read labels CSV: {e}", p) from e
    cols = {c.strip().lower(): c for c in df.columns}
    if "slide" not in cols or "label" not in cols:
        raise SlideChatError(f"labels CSV needs columns slide,label (has: {', '.join(df.columns)})", p)
    out: Dict[str, int] = {}
    for i, (s, lab) in enumerate(zip(df[cols["slide"]], df[cols["label"]])):
        where = f"{p} row {i + 2}"
        s = s.strip()
        if not s:
            raise SlideChatError("empty slide name", where)
        if s in out:
            raise SlideChatError(f"slide {s!r} listed twice", where)
        out[s] = parse_label(lab, where)
    return out


# ----------------------------------------------------------------------------------------------
# metrics


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Mann-Whitney AUC (ties 1/2) via average ranks; needs both classes."""
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        raise SlideChatError(f"AUC needs both classes (abnormal: {n1}, normal: {n0})")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_auc_ci(labels: Sequence[int], scores: Sequence[float], n_boot: int = 2000,
                     alpha: float = 0.05, seed: int = 0) -> Tuple[float, float]:
    """Percentile CI of the AUC over stratified bootstrap resamples (see the module docstring)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise SlideChatError("bootstrap CI needs both classes")
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        aucs[b] = roc_auc(y[idx], s[idx])
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score (descending), starting at (0, 0, +inf)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    n1, n0 = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
    thr = np.unique(s)[::-1]
    tpr = np.array([0.0] + [float(((s >= t) & (y == 1)).sum()) / n1 for t in thr])
    fpr = np.array([0.0] + [float(((s >= t) & (y == 0)).sum()) / n0 for t in thr])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def youden_threshold(labels: Sequence[int], scores: Sequence[float]) -> float:
    """The observed score maximising sensitivity + specificity - 1 (the highest such on ties)."""
    fpr, tpr, thr = roc_curve(labels, scores)
    j = tpr[1:] - fpr[1:]
    return float(thr[1:][int(np.argmax(j))])


def sensitivity_specificity(labels: Sequence[int], scores: Sequence[float],
                            threshold: float) -> Tuple[float, float]:
    """Sensitivity and specificity when score >= ``threshold`` calls a slide abnormal."""
    y = np.asarray(labels, dtype=int)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    sens = float((pred & (y == 1)).sum()) / n1 if n1 else float("nan")
    spec = float((~pred & (y == 0)).sum()) / n0 if n0 else float("nan")
    return sens, spec


@dataclass
class SlideMetrics:
    n_slides: int
    n_abnormal: int
    n_normal: int
    auc: float
    auc_ci: Tuple[float, float]
    threshold: float
    threshold_source: str
    sensitivity: float
    specificity: float

    def as_dict(self) -> Dict[str, Any]:
        return {"n_slides": self.n_slides, "n_abnormal": self.n_abnormal, "n_normal": self.n_normal,
                "auc": self.auc, "auc_ci_low": self.auc_ci[0], "auc_ci_high": self.auc_ci[1],
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "sensitivity": self.sensitivity, "specificity": self.specificity}

    def line(self) -> str:
        return (f"AUC {self.auc:.3f} (95% CI {self.auc_ci[0]:.3f}-{self.auc_ci[1]:.3f}) over "
                f"{self.n_slides} slides ({self.n_abnormal} abnormal); at threshold {self.threshold:.4g} "
                f"({self.threshold_source}): sensitivity {self.sensitivity:.3f}, specificity "
                f"{self.specificity:.3f}")


def evaluate_slides(labels: Sequence[int], scores: Sequence[float], threshold: Optional[float] = None,
                    n_boot: int = 2000, seed: int = 0) -> SlideMetrics:
    """AUC + bootstrap CI + sensitivity/specificity at ``threshold`` (default: Youden's)."""
    y = np.asarray(labels, dtype=int)
    auc = roc_auc(y, scores)
    ci = bootstrap_auc_ci(y, scores, n_boot=n_boot, seed=seed)
    src = "given"
    if threshold is None:
        threshold, src = youden_threshold(y, scores), "youden"
    sens, spec = sensitivity_specificity(y, scores, threshold)
    return SlideMetrics(int(len(y)), int(y.sum()), int((y == 0).sum()), auc, ci, float(threshold), src,
                        sens, spec)


def plot_roc(path: PathLike, labels: Sequence[int], scores: Sequence[float],
             metrics: Optional[SlideMetrics] = None, title: str = "Slide-level screening") -> Path:
    """ROC curve PNG (matplotlib, Agg), the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", c="0.7", lw=1)
    lab = "ROC"
    if metrics is not None:
        lab = f"AUC {metrics.auc:.3f} [{metrics.auc_ci[0]:.2f}, {metrics.auc_ci[1]:.2f}]"
    ax.step(fpr, tpr, where="post", c="C3", lw=2, label=lab)
    if metrics is not None:
        ax.plot([1 - metrics.specificity], [metrics.sensitivity], "ko", ms=5,
                label=f"threshold {metrics.threshold:.3g} ({metrics.threshold_source})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# per-field tables -> slide table


FIELD_COLUMNS = ("slide", "field", "x", "y", "size_level0", "cellular_fraction", "nuclear_fraction",
                 "score", "option_mass", "n_grounded", "grounded")
#: decimals the field table records of the detector's fractions and of the model's probabilities
FRACTION_DECIMALS = 4
PROBABILITY_DECIMALS = 6


@dataclass
class FieldRow:
    """One kept field of a screened slide, numeric from scoring until :func:`write_field_table`.

    Fractions and probabilities are held at the precision the table records (:meth:`measured` rounds
    them), so a live run and ``reaggregate`` of its table rank, aggregate and draw the same numbers.
    """

    slide: str
    field: int
    x: int                                       # level-0 top-left
    y: int
    size_level0: int                             # level-0 side
    cellular_fraction: float
    nuclear_fraction: float
    score: float                                 # P(abnormal option(s))
    option_mass: float                           # full-vocabulary probability on the option tokens
    probs: List[float]                           # p_A, p_B, ... in the options' order
    grounded: Optional[List[List[Any]]] = None   # [label, x1, y1, x2, y2] level-0 boxes; None: not asked

    @classmethod
    def measured(cls, slide: str, field: int, x: int, y: int, size_level0: int, cellular_fraction: float,
                 nuclear_fraction: float, score: float, option_mass: float, probs: Sequence[float],
                 grounded: Optional[List[List[Any]]] = None) -> "FieldRow":
        """A row from the detector's and the model's raw numbers, rounded as the table records them."""
        def frac(v: float) -> float:
            return round(float(v), FRACTION_DECIMALS)

        def prob(v: float) -> float:
            return round(float(v), PROBABILITY_DECIMALS)

        return cls(slide, int(field), int(x), int(y), int(size_level0), frac(cellular_fraction),
                   frac(nuclear_fraction), prob(score), prob(option_mass), [prob(p) for p in probs], grounded)

    @property
    def n_grounded(self) -> Optional[int]:
        """Cells the model located in this field; None when it was not asked."""
        return None if self.grounded is None else len(self.grounded)

    def table_row(self) -> Dict[str, Any]:
        """The row as the field table writes it (the one place a field row is formatted)."""
        row: Dict[str, Any] = {
            "slide": self.slide, "field": self.field, "x": self.x, "y": self.y, "size_level0": self.size_level0,
            "cellular_fraction": f"{self.cellular_fraction:.{FRACTION_DECIMALS}f}",
            "nuclear_fraction": f"{self.nuclear_fraction:.{FRACTION_DECIMALS}f}",
            "score": f"{self.score:.{PROBABILITY_DECIMALS}f}",
            "option_mass": f"{self.option_mass:.{PROBABILITY_DECIMALS}f}",
            "n_grounded": "" if self.grounded is None else len(self.grounded),
            "grounded": "" if self.grounded is None else json.dumps(self.grounded)}
        for j, p in enumerate(self.probs):
            row[f"p_{LETTERS[j]}"] = f"{p:.{PROBABILITY_DECIMALS}f}"
        return row


def field_columns(n_options: int) -> List[str]:
    """The field table's header for a question with ``n_options`` options."""
    return list(FIELD_COLUMNS) + [f"p_{LETTERS[j]}" for j in range(n_options)]


def write_field_table(path: PathLike, rows: Sequence[FieldRow], n_options: int) -> Path:
    """``fields/<slide>.csv``, atomically (a slide's "done" marker)."""
    return write_rows_csv(path, [r.table_row() for r in rows], field_columns(n_options))


def _number(text: Optional[str], kind: Any = float) -> Any:
    """A table cell as a number; an empty (or missing) cell is NaN (an int column: an error)."""
    if text is None or text.strip() == "":
        if kind is int:
            raise ValueError("empty cell in an integer column")
        return float("nan")
    return kind(float(text)) if kind is int else float(text)


def _field_row(r: Mapping[str, Optional[str]], i: int, n_options: int) -> FieldRow:
    """One CSV record as a typed row (a table without a ``field`` column numbers its rows in order)."""
    g = r.get("grounded") or ""
    field = _number(r["field"], int) if (r.get("field") or "").strip() else i
    return FieldRow(r["slide"] or "", field,
                    _number(r["x"], int), _number(r["y"], int), _number(r["size_level0"], int),
                    _number(r.get("cellular_fraction")), _number(r.get("nuclear_fraction")),
                    _number(r["score"]), _number(r.get("option_mass")),
                    [_number(r.get(f"p_{LETTERS[j]}")) for j in range(n_options)],
                    json.loads(g) if g.strip() else None)


def read_field_table(path: PathLike) -> List[FieldRow]:
    """A ``fields/<slide>.csv`` written by ``slidechat screen``, read once into typed rows, checked."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise ValueError("No columns to parse from file")
            columns = list(reader.fieldnames)
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise SlideChatError(f"cannot read field scores: {e}", p) from e
    missing = [c for c in ("slide", "x", "y", "size_level0", "score") if c not in columns]
    if missing:
        raise SlideChatError(f"not a field-score table: missing columns {', '.join(missing)}", p)
    n_options = sum(1 for c in columns if c.startswith("p_") and c[2:] in LETTERS and len(c) == 3)
    try:
        rows = [_field_row(r, i, n_options) for i, r in enumerate(records)]
    except (TypeError, ValueError) as e:
        raise SlideChatError(f"cannot read field scores: {e}", p) from e
    if not all(math.isfinite(r.score) for r in rows):
        raise SlideChatError("field scores contain NaN/Inf", p)
    return rows


def aggregate_rows(rows: Sequence[FieldRow], method: str = DEFAULT_AGGREGATOR, k: int = DEFAULT_TOP_K,
                   threshold: float = DEFAULT_FIELD_THRESHOLD) -> float:
    """A slide's score from its field rows (:func:`aggregate`; grounded counts for ``count_grounded``)."""
    return aggregate([r.score for r in rows], method, k=k, threshold=threshold,
                     grounded_counts=[r.n_grounded for r in rows])


def slide_scores_from_tables(tables: Mapping[str, Sequence[FieldRow]], method: str = DEFAULT_AGGREGATOR,
                             k: int = DEFAULT_TOP_K, threshold: float = DEFAULT_FIELD_THRESHOLD
                             ) -> Dict[str, float]:
    """{slide: aggregated score} from per-slide field rows."""
    out: Dict[str, float] = {}
    for slide, rows in tables.items():
        try:
            out[slide] = aggregate_rows(rows, method, k=k, threshold=threshold)
        except SlideChatError as e:
            raise SlideChatError(f"slide {slide}: {e.reason}", e.path, hint=e.hint) from None
    return out


def write_rows_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Atomic CSV write."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return path


def slide_table(scores: Mapping[str, float], labels: Optional[Mapping[str, int]] = None,
                threshold: Optional[float] = None, n_fields: Optional[Mapping[str, int]] = None
                ) -> List[Dict[str, Any]]:
    """Rows ranked by score (most suspicious first): slide, rank, score, n_fields, label, call."""
    order = sorted(scores, key=lambda s: (-scores[s], s))
    rows: List[Dict[str, Any]] = []
    for r, s in enumerate(order, 1):
        row: Dict[str, Any] = {"slide": s, "rank": r, "score": f"{scores[s]:.6g}",
                               "n_fields": "" if n_fields is None else n_fields.get(s, "")}
        if labels is not None:
            row["label"] = {1: "abnormal", 0: "normal"}.get(labels.get(s, -1), "")
        if threshold is not None:
            row["call"] = "abnormal" if scores[s] >= threshold else "normal"
        rows.append(row)
    return rows
