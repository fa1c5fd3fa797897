"""Multiple-choice answer extraction and SlideBench-VQA accuracy.

:func:`parse_choice` turns a model's free text into one option letter, or ``None``. It never guesses:
anything it cannot read without doubt is ``None`` and is scored as wrong (and listed in the report).
Rules, tried in this order on the text with markdown emphasis (``**``, ``__``, backticks) removed and
whitespace collapsed; only letters of the row's non-empty options are valid:

1. Ambiguity first: two different letters joined by ``or``/``and``/``/``/``,`` (``"A or B"``,
   ``"(A) and (C)"``) -> ``None``.
2. The whole answer is one letter, optionally bracketed or followed by ``.``/``)``/``:``
   (``"B"``, ``"b"``, ``"(B)"``, ``"B)"``, ``"B."``). A lowercase letter counts only here.
3. An explicit statement: ``answer``/``option``/``choice`` (+ ``is``/``:``/``would be``...) followed by
   an UPPERCASE letter standing alone or bracketed (``"Answer: C"``, ``"The answer is C"``,
   ``"The correct option is (D) ..."``, ``"Option B"``; lowercase only when bracketed, ``"(b)"``), or
   a letter followed by ``is correct/right/best/the answer``. All such statements must name the
   same letter.
4. A leading letter marker: the answer starts with ``B.``, ``B)``, ``(B)``, ``B:``, ``B -`` or
   ``B <option B's text>``. A bare ``"A "`` followed by other words is the English article and does not
   count (``"A tumor is seen"``). If the text after the marker is exactly another option's text the
   answer contradicts itself -> ``None``.
5. Option text: each option's text (lower-cased, punctuation and extra spaces removed) is searched as
   whole words in the answer likewise normalised; options whose text lies inside a longer matched
   option's text are dropped (longest match). Exactly one option left -> its letter; two or more ->
   ``None``.

Known limit: negation is not understood (``"not positive"`` matches the option ``Positive``).

In rules 3-4 a letter that is not one of the row's options (``"Answer: E"`` with options A-D) makes
the answer ``None`` rather than falling through to a weaker rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import pandas as pd

from slidechat.utils.errors import SlideChatError

Options = Union[Mapping[str, str], Iterable[str]]

_MD = re.compile(r"(\*\*|\*|__|`+)")
_PAIR = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?\s*(?:or|and|/|,|&)\s*\(?([A-J])\)?(?![A-Za-z])")
_BARE = re.compile(r"^\(?([A-Za-j])\)?\s*[.:)]?$")
_EXPLICIT = re.compile(
    r"\b(?:answer|option|choice)s?\b\s*(?:is|would be|will be|should be|=|:|-)?\s*"
    r"(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*)?[:\-]?\s*"
    r"(?:\(([A-J])\)|\[([A-J])\]|([A-J])(?![A-Za-z0-9'\-]))",
    re.IGNORECASE)
_STATED_AFTER = re.compile(
    r"(?<![A-Za-z])(?:\(([A-J])\)|([A-J]))\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b")
_LEAD = re.compile(r"^(?:\(([A-J])\)|\[([A-J])\]|([A-J])\s*(?:[.:)]|\s-\s|\s*$))\s*(.*)$", re.DOTALL)
_LEAD_SPACE = re.compile(r"^([A-J])\s+(.+)$", re.DOTALL)
_PUNCT = re.compile(r"[^\w\s]")


def _valid_letters(options: Options) -> Dict[str, str]:
    if isinstance(options, Mapping):
        return {str(k).upper(): str(v) for k, v in options.items()
                if v is not None and not (isinstance(v, float) and v != v) and str(v).strip()}
    return {str(k).upper(): "" for k in options}


def _norm(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _s(v: object) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def _text_match(text: str, opts: Mapping[str, str]) -> Optional[str]:
    t = f" {_norm(text)} "
    hits = {}
    for letter, otext in opts.items():
        o = _norm(otext)
        if o and f" {o} " in t:
            hits[letter] = o
    if not hits:
        return None
    # longest match: drop options whose text is contained in another matched option's text
    keep = [k for k, o in hits.items()
            if not any(k2 != k and len(o2) > len(o) and f" {o} " in f" {o2} " for k2, o2 in hits.items())]
    if len(set(hits[k] for k in keep)) == 1 and len(keep) > 1:
        return None  # two options with the same text: cannot tell them apart
    return keep[0] if len(keep) == 1 else None


def parse_choice(text: Optional[str], options: Options) -> Optional[str]:
    """The option letter a free-text answer states, or ``None`` if absent/ambiguous (see module doc).

    ``options`` is ``{letter: text}`` (empty texts are not options) or just the valid letters.
    """
    if text is None or (isinstance(text, float) and text != text):
        return None
    opts = _valid_letters(options)
    if not opts:
        return None
    s = " ".join(_MD.sub("", str(text)).split())
    if not s:
        return None

    # 1. ambiguity between letters
    for m in _PAIR.finditer(s):
        a, b = m.group(1), m.group(2)
        if a != b and a in opts and b in opts:
            return None

    # 2. the whole answer is one letter
    m = _BARE.match(s)
    if m:
        letter = m.group(1).upper()
        return letter if letter in opts else None

    # 3. explicit statements ("the answer is C")
    stated = set()
    for m in _EXPLICIT.finditer(s):
        bracketed = m.group(1) or m.group(2)
        x = bracketed or m.group(3)
        if bracketed or x.isupper():  # "the answer is a tumor": lowercase bare "a" is an article
            stated.add(x.upper())
    for m in _STATED_AFTER.finditer(s):  # "B is correct", "(C) is the answer"
        stated.add(m.group(1) or m.group(2))
    if stated:
        if len(stated) == 1:
            letter = stated.pop()
            return letter if letter in opts else None
        return None

    # 4. a leading letter marker ("B. Lung", "(B) ...", "B Lung")
    texts = {k: _norm(v) for k, v in opts.items() if v}
    m = _LEAD.match(s)
    rest = None
    if m:
        letter = next(g for g in m.groups()[:3] if g)
        rest = m.group(4)
    else:
        m2 = _LEAD_SPACE.match(s)
        letter = None
        if m2 and texts:
            cand, after = m2.group(1), _norm(m2.group(2))
            own = texts.get(cand)
            if own and (after == own or after.startswith(own + " ")):
                letter, rest = cand, m2.group(2)
    if letter is not None:
        if letter not in opts:
            return None
        if rest and texts:
            r = _norm(rest)
            if r != texts.get(letter) and any(r == t for k, t in texts.items() if k != letter):
                return None  # "B. <text of option C>"
        return letter

    # 5. option text
    if texts:
        return _text_match(s, texts)
    return None


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

    def to_dict(self) -> Dict[str, object]:
        return {"source": self.source, "overall": self.overall, "groups": self.groups,
                "unparsed": self.unparsed, "errors": self.errors}

    def to_markdown(self) -> str:
        from slidechat.evaluation.tables import mcq_markdown

        return mcq_markdown(self)


def _gold_letter(ans: str, opts: Mapping[str, str]) -> Optional[str]:
    a = ans.strip()
    if len(a) == 1 and a.upper() in opts:
        return a.upper()
    return parse_choice(a, opts)


def score_mcq(df: pd.DataFrame, group_columns: Optional[Sequence[str]] = None,
              source: Optional[str] = None, use_pred: bool = True) -> McqReport:
    """Score an output frame (``Answer`` + ``Pred`` or ``Output``; optional ``Error``).

    ``Pred`` is used when present (empty = unparsed), else ``Output`` is parsed. Rows with a non-empty
    ``Error`` count as wrong and are listed under ``errors``, not ``unparsed``.
    """
    from slidechat.evaluation.tables import accuracy_rows

    cols = list(df.columns)
    need = ["Answer"] + ([] if "Pred" in cols and use_pred else ["Output"])
    missing = [c for c in need if c not in cols]
    if missing:
        raise SlideChatError(f"missing column(s) {missing} needed for scoring", source,
                             hint=f"columns found: {cols}")
    letters = [c for c in "ABCDEFGHIJ" if c in cols]
    has_id = "ID" in cols and df["ID"].is_unique
    recs = []
    unparsed, errors, bad_gold = [], [], []
    for i, r in enumerate(df.to_dict("records")):
        key = _s(r["ID"]) if has_id else str(i)
        opts = {c: _s(r[c]) for c in letters if _s(r[c]).strip()}
        if not opts:
            opts = {c: "" for c in "ABCD"}
        gold = _gold_letter(_s(r["Answer"]), opts)
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
