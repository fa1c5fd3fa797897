"""A model's free-text answer -> the option letter it states: answer parsing, shared by the SlideBench
writer (its ``Pred`` column) and the scorers in :mod:`slidechat.evaluation`.

:func:`parse_choice` turns a model's free text into one option letter, or ``None``. It never guesses:
anything it cannot read without doubt is ``None`` and is scored as wrong (and listed in the report).
Rules, tried in this order on the text with markdown emphasis (``**``, ``__``, backticks) removed and
whitespace collapsed; only letters of the row's non-empty options are valid:

1. Ambiguity first: two different letters joined by ``or``/``and``/``/``/``,`` (``"A or B"``,
   ``"(A) and (C)"``) -> ``None``.
2. The whole answer is one letter, optionally bracketed or followed by ``.``/``)``/``:``
   (``"B"``, ``"b"``, ``"(B)"``, ``"B)"``, ``"B."``). A lowercase letter counts only here. If that
   letter is also the whole text of another option (Milan grade ``"I"`` with options ``C.I`` and
   ``I.IVB``) the answer is ambiguous -> ``None``.
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
from typing import Dict, Iterable, Mapping, Optional, Union

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

#: what a rule returns when it does not apply (``None`` is a decision: no letter can be read)
_NEXT_RULE = "next rule"


def _valid_letters(options: Options) -> Dict[str, str]:
    if isinstance(options, Mapping):
        return {str(k).upper(): str(v) for k, v in options.items()
                if v is not None and not (isinstance(v, float) and v != v) and str(v).strip()}
    return {str(k).upper(): "" for k in options}


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: how option texts are compared."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _text_match(text: str, opts: Mapping[str, str]) -> Optional[str]:
    t = f" {normalize_text(text)} "
    hits = {}
    for letter, otext in opts.items():
        o = normalize_text(otext)
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


def _rule_ambiguous_pair(s: str, opts: Mapping[str, str]) -> Optional[str]:
    """1. two different option letters joined by or/and/,: ambiguous."""
    for m in _PAIR.finditer(s):
        a, b = m.group(1), m.group(2)
        if a != b and a in opts and b in opts:
            return None
    return _NEXT_RULE


def _rule_bare_letter(s: str, opts: Mapping[str, str]) -> Optional[str]:
    """2. the whole answer is one letter."""
    m = _BARE.match(s)
    if not m:
        return _NEXT_RULE
    letter = m.group(1).upper()
    if any(k != letter and normalize_text(v) == letter.lower() for k, v in opts.items() if v):
        return None  # "I" with options "C.I" and "I.IVB": the letter I or the text of C?
    return letter if letter in opts else None


def _rule_explicit_statement(s: str, opts: Mapping[str, str]) -> Optional[str]:
    """3. explicit statements ("the answer is C", "B is correct"), all naming one letter."""
    stated = set()
    for m in _EXPLICIT.finditer(s):
        bracketed = m.group(1) or m.group(2)
        x = bracketed or m.group(3)
        if bracketed or x.isupper():  # "the answer is a tumor": lowercase bare "a" is an article
            stated.add(x.upper())
    for m in _STATED_AFTER.finditer(s):  # "B is correct", "(C) is the answer"
        stated.add(m.group(1) or m.group(2))
    if not stated:
        return _NEXT_RULE
    if len(stated) == 1:
        letter = stated.pop()
        return letter if letter in opts else None
    return None


def _rule_leading_marker(s: str, opts: Mapping[str, str]) -> Optional[str]:
    """4. a leading letter marker ("B. Lung", "(B) ...", "B Lung")."""
    texts = {k: normalize_text(v) for k, v in opts.items() if v}
    m = _LEAD.match(s)
    rest = None
    if m:
        letter = next(g for g in m.groups()[:3] if g)
        rest = m.group(4)
    else:
        m2 = _LEAD_SPACE.match(s)
        letter = None
        if m2 and texts:
            cand, after = m2.group(1), normalize_text(m2.group(2))
            own = texts.get(cand)
            if own and (after == own or after.startswith(own + " ")):
                letter, rest = cand, m2.group(2)
    if letter is None:
        return _NEXT_RULE
    if letter not in opts:
        return None
    if rest and texts:
        r = normalize_text(rest)
        if r != texts.get(letter) and any(r == t for k, t in texts.items() if k != letter):
            return None  # "B. <text of option C>"
    return letter


def _rule_option_text(s: str, opts: Mapping[str, str]) -> Optional[str]:
    """5. the text of exactly one option (longest match)."""
    texts = {k: normalize_text(v) for k, v in opts.items() if v}
    return _text_match(s, texts) if texts else None


_RULES: tuple = (_rule_ambiguous_pair, _rule_bare_letter, _rule_explicit_statement, _rule_leading_marker,
                 _rule_option_text)


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
    for rule in _RULES:
        found = rule(s, opts)
        if found is not _NEXT_RULE:
            return found
    return None


def gold_letter(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """The option a reference answer names: a lone letter, else read like a model's answer."""
    a = answer.strip()
    if len(a) == 1 and a.upper() in options:
        return a.upper()
    return parse_choice(a, options)
