"""Instruction data for synthetic slides: stage-1 captions, stage-2 VQA, SlideBench-style test CSVs.

Text is built from each slide's class label (``manifest.csv`` of :mod:`slidechat.wsi.synthetic`),
so a small model can learn it from the features and the test answers are known. Deterministic for
a given seed.

Test CSV feature layout: the SlideBench-VQA-TCGA original reads ``{root}/{Tumor}/{Slide}.csv``;
our synthetic features are flat (``{feature_root}/{Slide}.h5``), so the ``Tumor`` column is a
constant label (``SYNTH``) and the feature path template to use is ``{feature_root}/{Slide}``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from slidechat.utils.atomic import atomic_write_text
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

TUMOR = "SYNTH"
FEATURE_TEMPLATE = "{feature_root}/{Slide}"

#: What each synthetic class looks like (mirrors the rendering styles of the synthetic slides).
DESCRIPTIONS: Dict[str, Dict[str, str]] = {
    "tumor": {"finding": "a carcinoma with dense sheets of tumor cells",
              "detail": "The nuclei are large, dark and crowded on a purple background.",
              "nuclei": "large dark crowded nuclei", "colour": "purple"},
    "normal": {"finding": "normal tissue with fibrous stroma",
               "detail": "The stroma is pink and fibrous with sparse small nuclei.",
               "nuclei": "sparse small nuclei", "colour": "pink"},
    "inflamed": {"finding": "dense inflammation with many lymphocytes",
                 "detail": "There are many tiny very dark round lymphocytes.",
                 "nuclei": "many tiny dark round nuclei", "colour": "pink"},
    "necrotic": {"finding": "extensive necrosis",
                 "detail": "The tissue is pale grey pink and mottled with few small fragments.",
                 "nuclei": "few small pale fragments", "colour": "grey"},
}

CAPTION_PROMPTS = (
    "Please describe the slide in detail.",
    "Describe the whole slide image.",
    "What does this slide show?",
)
OPEN_QUESTIONS = ("What is the most likely diagnosis?", "What is the main finding in this slide?")


def _describe(label: str) -> Dict[str, str]:
    return DESCRIPTIONS.get(label, {"finding": f"tissue of class {label}",
                                    "detail": f"The appearance is typical of {label} tissue.",
                                    "nuclei": f"nuclei typical of {label} tissue", "colour": "pink"})


def caption_for(label: str) -> str:
    d = _describe(label)
    return f"The slide shows {d['finding']}. {d['detail']}"


def read_manifest(manifest: PathLike) -> List[Dict[str, str]]:
    p = Path(manifest)
    if not p.is_file():
        raise SlideChatError("manifest not found", p)
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SlideChatError("manifest has no rows", p)
    for col in ("slide", "label"):
        if col not in rows[0]:
            raise SlideChatError(f"manifest lacks column '{col}'", p)
    return rows


def _options(rng: random.Random, answer: str, pool: Sequence[str]) -> List[str]:
    others = [x for x in dict.fromkeys(pool) if x != answer]
    rng.shuffle(others)
    opts = [answer] + others[:3]
    while len(opts) < 4:  # fewer than 4 classes: pad with plausible distractors
        opts.append(["hemorrhage", "calcification", "fat", "mucin"][len(opts)])
    rng.shuffle(opts)
    return opts


def _mcq_text(question: str, opts: Sequence[str]) -> str:
    return question + "\n" + "\n".join(f"{k}. {o}" for k, o in zip("ABCD", opts))


def build_synthetic_instructions(manifest: PathLike, seed: int = 0, holdout_every: int = 0,
                                 mcq_variants: int = 1) -> Dict[str, list]:
    """``{'stage1': [...], 'stage2': [...], 'test_vqa': [...], 'test_caption': [...]}`` rows.

    ``holdout_every=k`` keeps every k-th slide (index k-1, 2k-1, ...) out of training and tests on
    those alone, so the benchmark measures slides the model never saw; 0 tests on the training slides.
    ``mcq_variants`` repeats each training MCQ with freshly shuffled options. MCQ answers are the
    option's text (the scorer maps an option's text to its letter), which a tiny model can learn from
    the visual tokens alone.
    """
    rows = read_manifest(manifest)
    if holdout_every < 0 or mcq_variants < 1:
        raise ValueError("holdout_every must be >= 0 and mcq_variants >= 1")
    rng = random.Random(seed)
    labels = sorted({r["label"] for r in rows})
    pool = labels + [x for x in DESCRIPTIONS if x not in labels]
    colours = sorted({_describe(x)["colour"] for x in pool} | {"blue", "green", "yellow"})
    stage1, stage2, test_vqa, test_caption = [], [], [], []
    for i, r in enumerate(rows):
        slide, label = r["slide"], r["label"]
        image = [f"{slide}.csv"]  # SlideChat's naming; the dataset prefers the .h5 beside it
        is_test = holdout_every == 0 or (i + 1) % holdout_every == 0
        if holdout_every == 0 or not is_test:
            caption, mcqs = _training_rows(rng, i, image, label, pool, colours, mcq_variants)
            stage1.append(caption)
            stage2 += mcqs
        if is_test:
            test_vqa += _test_vqa_rows(rng, len(test_vqa), slide, label, pool, colours)
            test_caption.append({"ID": i, "Slide": slide, "Tumor": TUMOR, "Caption": caption_for(label)})
    if not stage1 or not test_vqa:
        raise SlideChatError(f"holdout_every={holdout_every} leaves no training or no test slide "
                             f"among {len(rows)}", manifest)
    return {"stage1": stage1, "stage2": stage2, "test_vqa": test_vqa, "test_caption": test_caption}


def _conversation(row_id: str, image: List[str], *turns: str) -> Dict[str, Any]:
    """A SlideChat training row: alternating human / gpt turns."""
    return {"id": row_id, "image": image,
            "conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": t}
                              for k, t in enumerate(turns)]}


def _training_rows(rng: random.Random, i: int, image: List[str], label: str, pool: List[str],
                   colours: List[str], mcq_variants: int) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Slide ``i``'s stage-1 caption row and its stage-2 rows (MCQs with options shuffled by ``rng``, an
    open two-turn question, a nuclei question); ``rng`` is drawn in a fixed order, so a seed gives the
    same rows."""
    d = _describe(label)
    caption = _conversation(f"caption::{i}", image, f"{rng.choice(CAPTION_PROMPTS)}\n<image>", caption_for(label))
    rows = []
    for v in range(mcq_variants):
        opts = _options(rng, label, pool)
        suffix = "" if v == 0 else f"::{v}"
        rows.append(_conversation(f"vqa::{i}{suffix}", image, "<image>\n" + _mcq_text(
            "Which tissue type dominates this slide?", opts), label))
        copts = _options(rng, d["colour"], colours)
        rows.append(_conversation(f"vqa::{i}::colour{suffix}", image, "<image>\n" + _mcq_text(
            "What is the dominant colour of the tissue?", copts), d["colour"]))
    rows.append(_conversation(f"vqa::{i}::open", image, f"{rng.choice(OPEN_QUESTIONS)}\n<image>",
                              f"The slide shows {d['finding']}.", "How do the nuclei look?",
                              f"The slide has {d['nuclei']}."))
    rows.append(_conversation(f"vqa::{i}::nuclei", image, "How do the nuclei look in this slide?\n<image>",
                              f"The slide has {d['nuclei']}."))
    return caption, rows


def _test_vqa_rows(rng: random.Random, first_id: int, slide: str, label: str, pool: List[str],
                   colours: List[str]) -> List[Dict[str, Any]]:
    """SlideBench-VQA-TCGA style test rows of one slide: two broad categories."""
    colour = _describe(label)["colour"]
    opts = _options(rng, label, pool)
    copts = _options(rng, colour, colours)
    return [{"ID": first_id, "Slide": slide, "Tumor": TUMOR,
             "Broad Category": "Diagnosis", "Narrow Category": "Tissue type",
             "Question": "Which tissue type dominates this slide?",
             **dict(zip("ABCD", opts)), "Answer": "ABCD"[opts.index(label)]},
            {"ID": first_id + 1, "Slide": slide, "Tumor": TUMOR,
             "Broad Category": "Microscopy", "Narrow Category": "Colour",
             "Question": "What is the dominant colour of the tissue?",
             **dict(zip("ABCD", copts)), "Answer": "ABCD"[copts.index(colour)]}]


VQA_COLUMNS = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question",
               "A", "B", "C", "D", "Answer"]
CAPTION_COLUMNS = ["ID", "Slide", "Tumor", "Caption"]


def _csv_text(rows: List[dict], columns: List[str]) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_synthetic_dataset(manifest: PathLike, out_dir: PathLike, seed: int = 0,
                            holdout_every: int = 0, mcq_variants: int = 1) -> Dict[str, Path]:
    """Write ``stage1_caption.json``, ``stage2_vqa.json``, ``test_vqa.csv``, ``test_caption.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_synthetic_instructions(manifest, seed=seed, holdout_every=holdout_every,
                                        mcq_variants=mcq_variants)
    paths = {"stage1": out / "stage1_caption.json", "stage2": out / "stage2_vqa.json",
             "test_vqa": out / "test_vqa.csv", "test_caption": out / "test_caption.csv"}
    atomic_write_text(paths["stage1"], json.dumps(data["stage1"], indent=1))
    atomic_write_text(paths["stage2"], json.dumps(data["stage2"], indent=1))
    atomic_write_text(paths["test_vqa"], _csv_text(data["test_vqa"], VQA_COLUMNS))
    atomic_write_text(paths["test_caption"], _csv_text(data["test_caption"], CAPTION_COLUMNS))
    logger.info("synthetic instructions: %d captions, %d VQA, %d test VQA rows -> %s",
                len(data["stage1"]), len(data["stage2"]), len(data["test_vqa"]), out)
    return paths
