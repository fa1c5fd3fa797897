"""Accuracy tables and report files (JSON for machines, Markdown a user can paste).

The pieces every report shares; each scorer renders its own report from them (this module imports no
scorer, so the scorers import it at module level).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from slidechat.utils.atomic import atomic_write_text
from slidechat.utils.paths import PathLike


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


#: the columns of an accuracy row in a Markdown report
ACCURACY_HEADERS = ["n", "correct", "accuracy (%)", "unparsed", "errors"]


def accuracy_cells(d: Dict[str, Any]) -> List[Any]:
    """An :func:`accuracy_rows` row as Markdown cells (after its label)."""
    return [d["n"], d["correct"], fmt_pct(d["accuracy"]), d["unparsed"], d["errors"]]


def caption_markdown(report: Dict[str, Any], source: Optional[str] = None) -> str:
    corpus = report["corpus"]
    names = list(corpus.keys())
    title = "SlideBench caption metrics" + (f" — `{os.path.basename(source)}`" if source else "")
    table = markdown_table(["n", *names], [[report["n"], *[f"{corpus[k]:.4f}" for k in names]]])
    note = report.get("note")
    return f"## {title}\n\n{table}\n" + (f"\n{note}\n" if note else "")


def shorten(text: str, n: int = 120) -> str:
    """One line of at most ``n`` characters (a long answer in a report table)."""
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

def fmt_number(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def text_metrics_markdown(report: Dict[str, Any], source: Optional[str] = None) -> str:
    """One table: a row per task (report / vqa) with the caption metrics."""
    title = "Cytology reports and VQA" + (f" — `{os.path.basename(source)}`" if source else "")
    tasks = report["tasks"]
    names = next(iter(tasks.values()))["corpus"].keys() if tasks else []
    rows = [[t, v["n"], v.get("failed", 0), *[fmt_number(v["corpus"][k], 4) for k in names]]
            for t, v in tasks.items()]
    parts = [f"## {title}\n", markdown_table(["task", "n", "failed", *names], rows)]
    parts.append("\nScores on a 0-1 scale (BLEU: sacrebleu 13a, lowercase; ROUGE-L: rouge-score stemmed "
                 "F; METEOR: nltk + WordNet 3.0). Failed rows are scored as empty answers.")
    for note in report.get("notes", []):
        parts.append(f"\n{note}")
    return "\n".join(parts) + "\n"
