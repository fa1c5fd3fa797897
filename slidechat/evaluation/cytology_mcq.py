"""Cytology multiple-choice accuracy (CytoChat's format) with SlideBench's answer-extraction rules.

Options come from the question (``[A.Benign, B.Mild Dysplasia, …]``, 2-10 options A-J,
:func:`slidechat.evaluation.mcq.options_from_prompt`), the truth from the label (``A.Benign.``,
:func:`~slidechat.evaluation.mcq.label_letter`: a label contradicting its option list is an error),
the answer from :func:`~slidechat.data.answers.parse_choice` (letter, option text, ambiguity
refused, no random guess). Accuracy overall (micro), per task and per number of classes, and the
macro averages (mean of the per-task / per-class-count accuracies).

Task = the ``Task`` column of CytoChat's sheet, else the bracketed topic of the question ("based on
the image [Grading of Bile Cells]"); number of classes = ``Class number`` when given (CytoChat's Milan
task lists 9 options for 7 classes), else the number of options.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

from slidechat.evaluation.cytology_io import CytoRecord
from slidechat.evaluation.mcq import (ChoiceRow, McqReport, label_letter, options_from_prompt,
                                      score_choice_rows)
from slidechat.utils.errors import SlideChatError

_TOPIC = re.compile(r"based on the image \[([^\]]+)\]", re.IGNORECASE)


def question_topic(question: str) -> str:
    """The bracketed topic of a CytoChat question, or ``""``."""
    m = _TOPIC.search(question or "")
    return m.group(1).strip() if m else ""


def choice_rows(records: Sequence[CytoRecord], source: Optional[str] = None) -> List[ChoiceRow]:
    """One :class:`ChoiceRow` per record; rows without options or with a broken label are errors."""
    rows: List[ChoiceRow] = []
    for r in records:
        opts = options_from_prompt(r.question)
        if not 2 <= len(opts) <= 10:
            raise SlideChatError(f"{r.where}: the question lists no options (expected [A.x, B.y, ...] "
                                 "with 2-10 options)", source)
        gold, why = label_letter(r.label, opts)
        if gold is None:
            raise SlideChatError(f"{r.where}: {why}", source)
        task = str(r.fields.get("Task") or r.fields.get("task") or question_topic(r.question) or "(none)")
        classes = str(r.fields.get("Class number") or r.fields.get("classes") or len(opts))
        rows.append(ChoiceRow(key=r.key, options=opts, gold=gold, output=r.predict, error=r.error,
                              groups={"task": task, "number of classes": classes}))
    return rows


def score_cytology_mcq(records: Sequence[CytoRecord], source: Optional[str] = None) -> McqReport:
    """Accuracy overall, per task and per number of classes, with macro averages over both."""
    rows = choice_rows(records, source)
    groups = ["task", "number of classes"]
    report = score_choice_rows(rows, groups, source=source, title="Cytology multiple-choice accuracy",
                               macro_over=groups, task="mcq")
    # per number of classes in numeric order (2, 3, ..., 10)
    report.groups["number of classes"].sort(key=lambda g: (not str(g["value"]).isdigit(),
                                                 int(g["value"]) if str(g["value"]).isdigit() else 0))
    if all(g["value"] == "(none)" for g in report.groups["task"]):
        del report.groups["task"]
        del report.macro["task"]
    return report
