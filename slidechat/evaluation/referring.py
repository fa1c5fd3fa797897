"""Referring-expression comprehension: region -> description and description -> region.

* **Region -> description** (CytoChat: ``"Give a brief description of region.<region>…</region>"`` ->
  ``"hsil"``): the answer's class is read by :func:`read_class` and compared with the truth's class,
  both through :func:`canonical_class` (case, punctuation, hyphens, ``cell(s)``, plurals, aliases such
  as ``"high-grade squamous intraepithelial lesion"`` -> ``hsil``). An answer naming no known class, or
  two different ones, is *unparsed* (wrong, listed), never guessed. A confusion table truth x answer
  comes with it.
* **Description -> region** (the truth is one ``<region>``): correct when the answer holds exactly one
  box and its IoU with the truth is >= 0.5; no box, several boxes or a malformed box are wrong and
  listed (several boxes would let a model list every cell and be right by chance).

Known limit: negation is not understood (``"not hsil"`` names hsil), as in the MCQ rules.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from slidechat.evaluation.regions import Region, iou, parse_regions
from slidechat.evaluation.tables import fmt_number, fmt_pct, markdown_table, shorten
from slidechat.utils.errors import SlideChatError

#: Cytology class aliases (keys and values go through the same normalisation as the answers).
#: Values are the class names of CytoChat's benchmark (which spells herpes ``herps``).
DEFAULT_ALIASES: Dict[str, str] = {
    "high-grade squamous intraepithelial lesion": "hsil",
    "high grade squamous intraepithelial lesion": "hsil",
    "low-grade squamous intraepithelial lesion": "lsil",
    "low grade squamous intraepithelial lesion": "lsil",
    "atypical squamous cells of undetermined significance": "ascus",
    "asc-us": "ascus",
    "atypical squamous cells cannot exclude hsil": "asch",
    "atypical squamous cells, cannot exclude high-grade squamous intraepithelial lesion": "asch",
    "asc-h": "asch",
    "atypical glandular cells": "agc",
    "squamous cell carcinoma": "scc",
    "herpes": "herps",
    "herpes simplex": "herps",
    "herpes simplex virus": "herps",
    "trichomonas vaginalis": "trichomonas",
    "trichomonad": "trichomonas",
    "candida albicans": "candida",
    "actinomyces israelii": "actinomyces",
    "shift in flora": "flora",
    "shift in vaginal flora": "flora",
}
#: Classes searched for in free-text answers besides those of the truth (CytoChat's grounding classes).
KNOWN_CLASSES = ("hsil", "lsil", "ascus", "asch", "agc", "scc", "trichomonas", "candida", "herps",
                 "actinomyces", "flora")

_ARTICLE = re.compile(r"^(?:(?:this|it|these|they)\s+(?:is|are)\s+)?(?:(?:an?|the)\s+)?")
_CELL = re.compile(r"\s+(?:cell|cells)$")


def norm_key(text: str) -> str:
    """Lower case, NFKC, hyphens/apostrophes dropped (``ASC-US`` = ``ascus``), other punctuation to
    spaces, single spaces."""
    t = unicodedata.normalize("NFKC", str(text)).lower()
    t = re.sub(r"[-\u2010-\u2015'’]", "", t)
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def _alias_table(aliases: Optional[Mapping[str, str]]) -> Dict[str, str]:
    return dict(_alias_table_cached(tuple(sorted((aliases or {}).items()))))


@functools.lru_cache(maxsize=16)
def _alias_table_cached(extra: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[str, str], ...]:
    table = {norm_key(k): norm_key(v) for k, v in DEFAULT_ALIASES.items()}
    for k, v in extra:
        table[norm_key(k)] = norm_key(v)
    # follow chains (trichomonas vaginalis -> trichomonad -> trichomonas)
    for k in list(table):
        seen = {k}
        v = table[k]
        while v in table and v not in seen:
            seen.add(v)
            v = table[v]
        table[k] = v
    return tuple(table.items())


def canonical_class(name: Optional[str], vocabulary: Iterable[str] = (),
                    aliases: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The class a short name stands for: normalised, ``cell(s)`` dropped, alias applied, and a plural
    mapped to a ``vocabulary`` member (``hsils`` -> ``hsil``; ``ascus`` stays ``ascus``). ``None``
    for an empty name."""
    if name is None:
        return None
    table = _alias_table(aliases)
    vocab = {norm_key(v) for v in vocabulary}
    vocab |= {table.get(v, v) for v in vocab}
    k = norm_key(name)
    k = _ARTICLE.sub("", k)
    if not k:
        return None
    cands = [k]
    stripped = _CELL.sub("", k)
    if stripped != k and stripped:
        cands.append(stripped)
    for c in cands:
        if c in table:
            return table[c]
        if c in vocab:
            return c
    for c in cands:
        for suffix in ("s", "es"):  # plural of a known class: "hsils", "ascuses"
            if len(c) > len(suffix) + 1 and c.endswith(suffix):
                base = c[: -len(suffix)]
                base = table.get(base, base)
                if base in vocab:
                    return base
    last = cands[-1]
    return table.get(last, last)


def read_class(answer: Optional[str], vocabulary: Iterable[str],
               aliases: Optional[Mapping[str, str]] = None) -> Tuple[Optional[str], str]:
    """The class a free-text answer names: ``(class, "")`` or ``(None, reason)``.

    First the whole answer as a name (``"HSIL."``, ``"hsil cells"``); otherwise every vocabulary class
    and alias is searched as whole words (plural too); exactly one class found -> it, none or several
    -> None.
    """
    if answer is None or not str(answer).strip():
        return None, "empty answer"
    vocab = sorted({canonical_class(v, (), aliases) or "" for v in vocabulary} - {""})
    whole = canonical_class(answer, vocab, aliases)
    if whole in vocab:
        return whole, ""
    table = _alias_table(aliases)
    text = f" {norm_key(answer)} "
    phrases: Dict[str, str] = {v: v for v in vocab}
    for k, v in table.items():
        if v in vocab:
            phrases[k] = v
    hits: Dict[str, List[str]] = {}
    for phrase, cls in phrases.items():
        for form in (phrase, phrase + "s", phrase + "es"):
            if f" {form} " in text:
                hits.setdefault(cls, []).append(phrase)
                break
    found = set(hits)
    if len(found) == 1:
        return found.pop(), ""
    if not found:
        return None, "names no known class"
    return None, f"names several classes: {sorted(found)}"


@dataclass
class ReferringReport:
    """Region -> description accuracy (with confusion table) and description -> region accuracy."""

    describe: Dict[str, Any]
    locate: Dict[str, Any]
    confusion: Dict[str, Dict[str, int]] = field(default_factory=dict)
    per_class: List[Dict[str, Any]] = field(default_factory=list)
    unparsed: List[Dict[str, str]] = field(default_factory=list)
    errors: List[Dict[str, str]] = field(default_factory=list)
    source: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"task": "region", "source": self.source, "describe": self.describe, "locate": self.locate,
                "per_class": self.per_class, "confusion": self.confusion, "unparsed": self.unparsed,
                "errors": self.errors, "notes": self.notes}

    def to_markdown(self) -> str:
        return referring_markdown(self)


def referring_markdown(report: ReferringReport, max_listed: int = 20) -> str:
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
        parts.append(f"\nDescription → region: mean IoU of single-box answers {fmt_number(loc['mean_iou'], 3)}; "
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
                                    [[u["key"], shorten(u["output"]), u.get("reason", "")]
                                     for u in report.unparsed[:max_listed]], ["l", "l", "l"]))
    if report.errors:
        parts.append(f"\n### Rows not run ({len(report.errors)}, counted as wrong)\n")
        parts.append(markdown_table(["key", "error"], [[e["key"], shorten(e["error"])] for e in
                                                       report.errors[:max_listed]], ["l", "l"]))
    for note in report.notes:
        parts.append(f"\n{note}")
    return "\n".join(parts) + "\n"


@dataclass
class ReferringItem:
    """One scored row: ``predict`` is None when the row failed (``error`` set)."""

    key: str
    predict: Optional[str]
    label: str
    error: str = ""


UNPARSED = "(unparsed)"


def score_referring(items: Sequence[ReferringItem], aliases: Optional[Mapping[str, str]] = None,
                    iou_threshold: float = 0.5, source: Optional[str] = None) -> ReferringReport:
    """Score region -> description rows (truth is a class name) and description -> region rows (truth
    is one ``<region>``) separately; failed rows count as wrong and are listed."""
    desc_items, loc_items = _split_tasks(items, source)
    unparsed: List[Dict[str, str]] = []
    errors: List[Dict[str, str]] = []
    describe, per_class, confusion = _score_describe(desc_items, aliases, source, unparsed, errors)
    locate = _score_locate(loc_items, iou_threshold, unparsed, errors)
    return ReferringReport(describe=describe, locate=locate, confusion=confusion, per_class=per_class,
                           unparsed=unparsed, errors=errors, source=source)


def _split_tasks(items: Sequence[ReferringItem], source: Optional[str]
                 ) -> Tuple[List[ReferringItem], List[Tuple[ReferringItem, Region]]]:
    """Region -> description rows, and description -> region rows with their one true box."""
    desc_items, loc_items = [], []
    for it in items:
        truth_boxes = parse_regions(it.label)
        if truth_boxes.boxes or truth_boxes.malformed:
            if len(truth_boxes.boxes) != 1 or truth_boxes.malformed:
                raise SlideChatError(f"row {it.key}: a description -> region label must hold exactly one "
                                     f"readable <region> (got {len(truth_boxes.boxes)} box(es), "
                                     f"{len(truth_boxes.malformed)} malformed)", source)
            loc_items.append((it, truth_boxes.boxes[0]))
        else:
            desc_items.append(it)
    return desc_items, loc_items


def _score_describe(desc_items: Sequence[ReferringItem], aliases: Optional[Mapping[str, str]],
                    source: Optional[str], unparsed: List[Dict[str, str]], errors: List[Dict[str, str]]
                    ) -> Tuple[Dict[str, Any], List[Dict[str, Any]], Dict[str, Dict[str, int]]]:
    """Region -> description: ``(totals, per true class, confusion)``; unreadable and failed rows are
    appended to ``unparsed`` / ``errors``."""
    truths = [canonical_class(it.label, (), aliases) for it in desc_items]
    vocab: Set[str] = {t for t in truths if t} | set(KNOWN_CLASSES)
    truths = [canonical_class(it.label, vocab, aliases) for it in desc_items]
    confusion: Dict[str, Dict[str, int]] = {}
    per: Dict[str, List[int]] = {}
    n_ok = n_unparsed = n_err = 0
    for it, t in zip(desc_items, truths):
        if not t:
            raise SlideChatError(f"row {it.key}: empty label", source)
        if it.error:
            errors.append({"key": it.key, "error": it.error})
            got = "(failed)"
            n_err += 1
        else:
            cls, why = read_class(it.predict, vocab, aliases)
            if cls is None:
                unparsed.append({"key": it.key, "output": str(it.predict or ""), "reason": why})
                got = UNPARSED
                n_unparsed += 1
            else:
                got = cls
        ok = got == t
        n_ok += ok
        confusion.setdefault(t, {}).setdefault(got, 0)
        confusion[t][got] += 1
        per.setdefault(t, []).append(int(ok))
    n = len(desc_items)
    describe = {"n": n, "correct": n_ok, "accuracy": n_ok / n if n else float("nan"),
                "unparsed": n_unparsed, "errors": n_err}
    per_class = [{"value": c, "n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)}
                 for c, v in sorted(per.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return describe, per_class, confusion


def _score_locate(loc_items: Sequence[Tuple[ReferringItem, Region]], iou_threshold: float,
                  unparsed: List[Dict[str, str]], errors: List[Dict[str, str]]) -> Dict[str, Any]:
    """Description -> region: a single predicted box at IoU >= ``iou_threshold`` is correct; none or
    several are unparsed, failed rows errors (both appended to the lists)."""
    l_ok = l_none = l_multi = l_err = 0
    ious: List[float] = []
    for it, tb in loc_items:
        if it.error:
            errors.append({"key": it.key, "error": it.error})
            l_err += 1
            continue
        p = parse_regions(it.predict)
        if len(p.boxes) != 1:
            reason = "no box" if not p.boxes else f"{len(p.boxes)} boxes"
            if p.malformed:
                reason += f", {len(p.malformed)} malformed"
            unparsed.append({"key": it.key, "output": str(it.predict or ""), "reason": reason})
            if p.boxes:
                l_multi += 1
            else:
                l_none += 1
            continue
        v = iou(p.boxes[0], tb)
        ious.append(v)
        l_ok += v >= iou_threshold
    m = len(loc_items)
    return {"n": m, "correct": l_ok, "accuracy": l_ok / m if m else float("nan"),
            "iou_threshold": iou_threshold, "no_box": l_none, "several_boxes": l_multi, "errors": l_err,
            "mean_iou": sum(ious) / len(ious) if ious else float("nan")}


def referring_items(records: Sequence[Any]) -> List[ReferringItem]:
    """:class:`ReferringItem` rows from :class:`~slidechat.evaluation.cytology_io.CytoRecord` rows."""
    return [ReferringItem(key=r.key, predict=r.predict, label=r.label, error=r.error) for r in records]
