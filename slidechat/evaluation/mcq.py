"""Multiple-choice scoring (SlideBench-VQA accuracy) and the options and labels a prompt holds.

Answers are read into option letters by :func:`slidechat.data.answers.parse_choice` (its rules are
written there); this module scores them and reads options and reference labels out of prompts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from slidechat.data.answers import gold_letter, normalize_text, parse_choice
from slidechat.data.vocabulary import LETTERS
from slidechat.evaluation.tables import (ACCURACY_HEADERS, accuracy_cells, accuracy_rows, fmt_pct, markdown_table,
                                         shorten)
from slidechat.utils.errors import SlideChatError


def _s(v: object) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


# --------------------------------------------------------------------------- scoring

GROUP_COLUMNS = ("Broad Category", "Narrow Category", "Tumor", "Task")


@dataclass
class McqReport:
    """Accuracy overall and per group; ``accuracy`` values are fractions in [0, 1]."""

    overall: Dict[str, object]
    groups: Dict[str, List[Dict[str, object]]] = field(default_factory=dict)
    unparsed: List[Dict[str, str]] = field(default_factory=list)
    errors: List[Dict[str, str]] = field(default_factory=list)
    source: Optional[str] = None
    #: Markdown heading (default: SlideBench-VQA accuracy); ``macro``: mean of the group accuracies
    #: per grouping; ``notes``: lines printed under the tables. Empty extras are left out of the JSON.
    title: Optional[str] = None
    macro: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    task: Optional[str] = None

    def to_dict(self) -> Dict[str, object]:
        d: Dict[str, object] = {"source": self.source, "overall": self.overall, "groups": self.groups,
                                "unparsed": self.unparsed, "errors": self.errors}
        if self.task:
            d = {"task": self.task, **d}
        if self.macro:
            d["macro"] = self.macro
        if self.notes:
            d["notes"] = self.notes
        return d

    def to_markdown(self) -> str:
        return mcq_markdown(self)


def mcq_markdown(report: McqReport, max_listed: int = 20) -> str:
    parts = []
    title = (report.title or "SlideBench-VQA accuracy") + (
        f" — `{os.path.basename(report.source)}`" if report.source else "")
    parts.append(f"## {title}\n")
    parts.append(markdown_table(["", *ACCURACY_HEADERS], [["**overall**", *accuracy_cells(report.overall)]]))
    if report.macro:
        parts.append("\n" + markdown_table(
            ["average", "accuracy (%)"],
            [["micro (all questions)", fmt_pct(report.overall["accuracy"])]]
            + [[f"macro over {g} ({len(report.groups.get(g, []))} groups)", fmt_pct(v)] for g, v in
               report.macro.items()]))
    for g, rows in report.groups.items():
        parts.append(f"\n### By {g}\n")
        parts.append(markdown_table([g, *ACCURACY_HEADERS], [[r["value"], *accuracy_cells(r)] for r in rows]))
    for note in report.notes:
        parts.append(f"\n{note}")
    if report.errors:
        parts.append(f"\n### Rows not run ({len(report.errors)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "error"], [[e["key"], e["error"]] for e in
                                                       report.errors[:max_listed]], ["l", "l"]))
    if report.unparsed:
        parts.append(f"\n### Unparsed answers ({len(report.unparsed)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "output"], [[u["key"], shorten(u["output"])] for u in
                                                        report.unparsed[:max_listed]], ["l", "l"]))
    if len(report.unparsed) > max_listed or len(report.errors) > max_listed:
        parts.append(f"\n(first {max_listed} listed; the JSON report has all)")
    return "\n".join(parts) + "\n"


def score_mcq(df: pd.DataFrame, group_columns: Optional[Sequence[str]] = None,
              source: Optional[str] = None, use_pred: bool = True) -> McqReport:
    """Score an output frame (``Answer`` + ``Pred`` or ``Output``; optional ``Error``).

    ``Pred`` is used when present (empty = unparsed), else ``Output`` is parsed. Rows with a non-empty
    ``Error`` count as wrong and are listed under ``errors``, not ``unparsed``.
    """
    cols = list(df.columns)
    need = ["Answer"] + ([] if "Pred" in cols and use_pred else ["Output"])
    missing = [c for c in need if c not in cols]
    if missing:
        raise SlideChatError(f"missing column(s) {missing} needed for scoring", source,
                             hint=f"columns found: {cols}")
    letters = [c for c in LETTERS if c in cols]
    if not letters:  # without options an Answer cannot be checked: refuse rather than assume A-D
        raise SlideChatError("no option columns (A, B, ...): not a multiple-choice output", source,
                             hint=f"columns found: {cols}; score captions with `slidechat eval caption`")
    if len(df) == 0:
        raise SlideChatError("no rows to score: the file has a header and no rows", source)
    has_id = "ID" in cols and df["ID"].is_unique
    recs = []
    unparsed, errors, bad_gold = [], [], []
    for i, r in enumerate(df.to_dict("records")):
        key = _s(r["ID"]) if has_id else str(i)
        opts = {c: _s(r[c]) for c in letters if _s(r[c]).strip()}
        if not opts:
            opts = {c: "" for c in "ABCD"}
        gold = gold_letter(_s(r["Answer"]), opts)
        if gold is None:
            bad_gold.append(key)
        err = _s(r["Error"]).strip() if "Error" in cols else ""
        out = _s(r["Output"]) if "Output" in cols else ""
        if err:
            pred = None
            errors.append({"key": key, "error": err})
        elif "Pred" in cols and use_pred:
            p = _s(r["Pred"]).strip().upper()
            pred = p if p in opts else None
        else:
            pred = parse_choice(out, opts)
        if pred is None and not err:
            unparsed.append({"key": key, "output": out})
        recs.append({"correct": pred is not None and pred == gold, "unparsed": pred is None and not err,
                     "error": bool(err)})
    if bad_gold:
        raise SlideChatError(f"{len(bad_gold)} row(s) have an Answer that is not one of their options "
                             f"(keys {bad_gold[:10]})", source)
    flags = pd.DataFrame(recs, index=df.index)
    groups = [c for c in (GROUP_COLUMNS if group_columns is None else group_columns) if c in cols]
    if group_columns is not None:
        absent = [c for c in group_columns if c not in cols]
        if absent:
            raise SlideChatError(f"group column(s) {absent} not in the CSV", source)
    overall = accuracy_rows(flags, None)[0]
    by = {g: accuracy_rows(flags, df[g].astype(str)) for g in groups}
    return McqReport(overall=overall, groups=by, unparsed=unparsed, errors=errors, source=source)


# --------------------------------------------------------------------------- options inside a prompt

_BRACKET_START = re.compile(r"\[\s*A\s*[.)]")
_LINE_OPT = re.compile(r"^\s*\(?([A-J])\s*[.)]\s*(.+?)\s*$", re.MULTILINE)


def options_from_prompt(text: str) -> Dict[str, str]:
    """The options a prompt lists, ``{letter: text}`` (``{}`` when it lists none).

    Two layouts: CytoChat's bracket list ``[A.Benign, B.Mild Dysplasia, ...]`` (split at ``", B."``,
    ``", C."``... in letter order, so commas inside an option text are kept) and one option per line
    (``"A. Benign"`` / ``"(B) Lung"``, SlideBench's prompt). Letters must run A, B, C... without gaps.
    """
    text = str(text or "")
    for m in _BRACKET_START.finditer(text):
        end = text.find("]", m.end())
        # the list ends at the last "]" before the next "[" or the end (option texts may hold "]")
        nxt = text.find("[", m.end())
        stop = len(text) if nxt < 0 else nxt
        last = text.rfind("]", m.end(), stop)
        if last >= 0:
            end = last
        if end < 0:
            continue
        body = text[m.start() + 1:end]
        opts: Dict[str, str] = {}
        pos = 0
        letters = LETTERS
        k = 0
        head = re.match(r"\s*A\s*[.)]\s*", body)
        pos = head.end()
        while True:
            nxt_letter = letters[k + 1] if k + 1 < len(letters) else None
            sep = re.compile(r",\s*" + nxt_letter + r"\s*[.)]\s*") if nxt_letter else None
            m2 = sep.search(body, pos) if sep else None
            if m2 is None:
                opts[letters[k]] = body[pos:].strip()
                break
            opts[letters[k]] = body[pos:m2.start()].strip()
            pos = m2.end()
            k += 1
        if len(opts) >= 2:
            return opts
    lines = _LINE_OPT.findall(text)
    opts = {}
    for letter, body in lines:
        expected = LETTERS[len(opts)] if len(opts) < 10 else None
        if letter == expected:
            opts[letter] = body
        elif opts:
            break
    return opts if len(opts) >= 2 else {}


def label_letter(label: str, options: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """The option a reference answer names (``"A.Benign."`` -> ``A``), or ``(None, why)``.

    A label that names a letter and a text must agree with the option list (``"A.Malignant."`` when
    A is ``Benign`` is a broken label, not a guess either way).
    """
    lab = " ".join(str(label or "").split())
    if not lab:
        return None, "empty label"
    m = re.match(r"^\(?([A-J])\)?\s*[.):]\s*(.*)$", lab)
    if m and m.group(1) in options:  # "A.Benign." -- the usual form
        letter = m.group(1)
        told, own = normalize_text(m.group(2)), normalize_text(options.get(letter, ""))
        if told and own and told != own:
            return None, f"label {lab!r} names option {letter} but {letter} is {options[letter]!r}"
        return letter, ""
    letter = gold_letter(lab, options)
    if letter is None:
        return None, f"label {lab!r} names none of the options {sorted(options)}"
    return letter, ""


@dataclass
class ChoiceRow:
    """One multiple-choice answer to score (``output`` None / ``error`` set when the row failed)."""

    key: str
    options: Mapping[str, str]
    gold: str
    output: Optional[str]
    error: str = ""
    groups: Mapping[str, str] = field(default_factory=dict)


def score_choice_rows(rows: Sequence[ChoiceRow], group_names: Sequence[str] = (),
                      source: Optional[str] = None, title: Optional[str] = None,
                      macro_over: Sequence[str] = (), task: Optional[str] = None) -> McqReport:
    """Accuracy of free-text answers (parsed with :func:`parse_choice`) overall, per group and the macro
    average (mean of the group accuracies) for each grouping in ``macro_over``."""
    recs, unparsed, errors = [], [], []
    for r in rows:
        if r.error:
            pred = None
            errors.append({"key": r.key, "error": r.error})
        else:
            pred = parse_choice(r.output, r.options)
            if pred is None:
                unparsed.append({"key": r.key, "output": _s(r.output)})
        recs.append({"correct": pred is not None and pred == r.gold, "unparsed": pred is None and not r.error,
                     "error": bool(r.error)})
    flags = pd.DataFrame(recs, columns=["correct", "unparsed", "error"])
    overall = accuracy_rows(flags, None)[0]
    by = {g: accuracy_rows(flags, pd.Series([str(r.groups.get(g, "")) for r in rows], dtype=object))
          for g in group_names}
    macro = {}
    for g in macro_over:
        accs = [row["accuracy"] for row in by.get(g, []) if row["n"]]
        macro[g] = float(sum(accs) / len(accs)) if accs else float("nan")
    return McqReport(overall=overall, groups=by, unparsed=unparsed, errors=errors, source=source,
                     title=title, macro=macro, task=task)
