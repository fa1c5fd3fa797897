"""Accuracy tables and report files (JSON for machines, Markdown a user can paste)."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import pandas as pd

from slidechat.utils.atomic import atomic_write_text
from slidechat.utils.paths import PathLike

if TYPE_CHECKING:
    from slidechat.evaluation.grounding import GroundingReport
    from slidechat.evaluation.mcq import McqReport
    from slidechat.evaluation.referring import ReferringReport


def accuracy_rows(flags: pd.DataFrame, groups: Optional[pd.Series]) -> List[Dict[str, Any]]:
    """Counts per group from boolean columns ``correct``, ``unparsed``, ``error``.

    ``groups=None`` gives one overall row; groups are listed in order of first appearance.
    """
    def row(f: pd.DataFrame, value: Optional[str]) -> Dict[str, Any]:
        n = int(len(f))
        c = int(f["correct"].sum())
        d: Dict[str, Any] = {} if value is None else {"value": value}
        d.update(n=n, correct=c, accuracy=(c / n) if n else float("nan"),
                 unparsed=int(f["unparsed"].sum()), errors=int(f["error"].sum()))
        return d

    if groups is None:
        return [row(flags, None)]
    return [row(flags[groups == v], str(v)) for v in pd.unique(groups)]


def fmt_pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Optional[Sequence[str]] = None) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


_ACC_HEADERS = ["n", "correct", "accuracy (%)", "unparsed", "errors"]


def _acc_cells(d: Dict[str, Any]) -> List[Any]:
    return [d["n"], d["correct"], fmt_pct(d["accuracy"]), d["unparsed"], d["errors"]]


def mcq_markdown(report: "McqReport", max_listed: int = 20) -> str:
    parts = []
    title = (report.title or "SlideBench-VQA accuracy") + (
        f" — `{os.path.basename(report.source)}`" if report.source else "")
    parts.append(f"## {title}\n")
    parts.append(markdown_table(["", *_ACC_HEADERS], [["**overall**", *_acc_cells(report.overall)]]))
    if report.macro:
        parts.append("\n" + markdown_table(
            ["average", "accuracy (%)"],
            [["micro (all questions)", fmt_pct(report.overall["accuracy"])]]
            + [[f"macro over {g} ({len(report.groups.get(g, []))} groups)", fmt_pct(v)] for g, v in
               report.macro.items()]))
    for g, rows in report.groups.items():
        parts.append(f"\n### By {g}\n")
        parts.append(markdown_table([g, *_ACC_HEADERS], [[r["value"], *_acc_cells(r)] for r in rows]))
    for note in report.notes:
        parts.append(f"\n{note}")
    if report.errors:
        parts.append(f"\n### Rows not run ({len(report.errors)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "error"], [[e["key"], e["error"]] for e in
                                                       report.errors[:max_listed]], ["l", "l"]))
    if report.unparsed:
        parts.append(f"\n### Unparsed answers ({len(report.unparsed)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "output"], [[u["key"], _short(u["output"])] for u in
                                                        report.unparsed[:max_listed]], ["l", "l"]))
    if len(report.unparsed) > max_listed or len(report.errors) > max_listed:
        parts.append(f"\n(first {max_listed} listed; the JSON report has all)")
    return "\n".join(parts) + "\n"


def caption_markdown(report: Dict[str, Any], source: Optional[str] = None) -> str:
    corpus = report["corpus"]
    names = list(corpus.keys())
    title = "SlideBench caption metrics" + (f" — `{os.path.basename(source)}`" if source else "")
    table = markdown_table(["n", *names], [[report["n"], *[f"{corpus[k]:.4f}" for k in names]]])
    note = report.get("note")
    return f"## {title}\n\n{table}\n" + (f"\n{note}\n" if note else "")


def _short(text: str, n: int = 120) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def write_json(path: PathLike, data: Dict[str, Any]) -> None:
    """Strict JSON (NaN written as null), atomically."""
    atomic_write_text(path, json.dumps(_nan_to_none(data), indent=2, ensure_ascii=False,
                                       default=_json_default) + "\n")


def write_reports(data: Dict[str, Any], markdown: str, out_json: Optional[PathLike] = None,
                  out_md: Optional[PathLike] = None) -> None:
    if out_json:
        write_json(out_json, data)
    if out_md:
        atomic_write_text(out_md, markdown)


# --------------------------------------------------------------------------- cytology reports

def _f(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def grounding_markdown(report: "GroundingReport", max_listed: int = 20) -> str:
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
        [[_f(report.mean_iou, 3), _f(report.count_error["mean_abs"]), _f(report.count_error["mean_signed"]),
          fmt_pct(report.count_error["exact"])]], ["r", "r", "r", "r"]))
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
        parts.append(markdown_table(["key", "malformed"], [[m["key"], _short("; ".join(m["malformed"]))]
                                                          for m in mal["listed"][:max_listed]], ["l", "l"]))
    if report.failed:
        parts.append("\n### Failed rows\n")
        parts.append(markdown_table(["key", "error"], [[e["key"], _short(e["error"])] for e in
                                                       report.failed[:max_listed]], ["l", "l"]))
    return "\n".join(parts) + "\n"


def referring_markdown(report: "ReferringReport", max_listed: int = 20) -> str:
    """Region -> description accuracy with per-class rows and confusion table; description -> region."""
    src = f" — `{os.path.basename(report.source)}`" if report.source else ""
    parts = [f"## Referring expressions{src}\n"]
    d, loc = report.describe, report.locate
    rows = []
    if d["n"]:
        rows.append(["region → description (class name)", d["n"], d["correct"], fmt_pct(d["accuracy"]),
                     d["unparsed"], d["errors"]])
    if loc["n"]:
        rows.append([f"description → region (IoU ≥ {loc['iou_threshold']:g})", loc["n"], loc["correct"],
                     fmt_pct(loc["accuracy"]), loc["no_box"] + loc["several_boxes"], loc["errors"]])
    parts.append(markdown_table(["task", "n", "correct", "accuracy (%)", "unparsed", "errors"], rows))
    if loc["n"]:
        parts.append(f"\nDescription → region: mean IoU of single-box answers {_f(loc['mean_iou'], 3)}; "
                     f"{loc['no_box']} answer(s) without a box, {loc['several_boxes']} with several.")
    if report.per_class:
        parts.append("\n### Region → description by true class\n")
        parts.append(markdown_table(["class", "n", "correct", "accuracy (%)"],
                                    [[r["value"], r["n"], r["correct"], fmt_pct(r["accuracy"])]
                                     for r in report.per_class]))
        answers = sorted({a for row in report.confusion.values() for a in row},
                         key=lambda a: (a.startswith("("), a))
        parts.append("\n### Confusion (rows: truth, columns: answer)\n")
        parts.append(markdown_table(["truth \\ answer", *answers],
                                    [[t, *[report.confusion[t].get(a, 0) for a in answers]]
                                     for t in report.confusion]))
    if report.unparsed:
        parts.append(f"\n### Unparsed answers ({len(report.unparsed)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "output", "why"],
                                    [[u["key"], _short(u["output"]), u.get("reason", "")]
                                     for u in report.unparsed[:max_listed]], ["l", "l", "l"]))
    if report.errors:
        parts.append(f"\n### Rows not run ({len(report.errors)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "error"], [[e["key"], _short(e["error"])] for e in
                                                       report.errors[:max_listed]], ["l", "l"]))
    for note in report.notes:
        parts.append(f"\n{note}")
    return "\n".join(parts) + "\n"


def text_metrics_markdown(report: Dict[str, Any], source: Optional[str] = None) -> str:
    """One table: a row per task (report / vqa) with the caption metrics."""
    title = "Cytology reports and VQA" + (f" — `{os.path.basename(source)}`" if source else "")
    tasks = report["tasks"]
    names = next(iter(tasks.values()))["corpus"].keys() if tasks else []
    rows = [[t, v["n"], v.get("failed", 0), *[_f(v["corpus"][k], 4) for k in names]]
            for t, v in tasks.items()]
    parts = [f"## {title}\n", markdown_table(["task", "n", "failed", *names], rows)]
    parts.append("\nScores on a 0-1 scale (BLEU: sacrebleu 13a, lowercase; ROUGE-L: rouge-score stemmed "
                 "F; METEOR: nltk + WordNet 3.0). Failed rows are scored as empty answers.")
    for note in report.get("notes", []):
        parts.append(f"\n{note}")
    return "\n".join(parts) + "\n"
