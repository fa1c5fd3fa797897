"""Regenerate the cytology scoring examples in this folder and their reports, with the library itself.

    .venv/bin/python dataset/cytology_eval/make_examples.py

One small file per input type the cytology scorers read: ``slidechat infer`` JSONL, LLaMA-Factory's
``generated_predictions.jsonl`` and CytoChat-shaped ``.xlsx`` sheets. Everything is invented here
(seeded boxes, made-up questions, hand-written stand-in answers; no model is run and no row of
CytoChat's benchmark is used); every number in the ``*.report.{md,json}`` files comes from
``slidechat eval``. The answers are chosen to exercise the rules: exact and shifted boxes, a wrong
class, a Qwen2-VL native answer, an answer cut off by the token limit, a failed row, letter / text /
ambiguous multiple-choice answers, aliases and plurals of class names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

from slidechat.cli.main import main

HERE = Path(__file__).resolve().parent
SYS = "system\nYou are a helpful assistant.\nuser\n{}\nassistant\n"
SIZE = 512

Box = Tuple[float, float, float, float]


def boxes(rng: np.random.Generator, n: int) -> List[Box]:
    out = []
    for _ in range(n):
        w, h = rng.uniform(20, 60, size=2)
        x, y = rng.uniform(0, SIZE - 60, size=2)
        out.append((round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)))
    return out


def region(b: Box) -> str:
    return "<region>" + " ".join(f"{v:g}" for v in b) + "</region>"


def answer(cls: str, bs: Sequence[Box]) -> str:
    return " ".join(f"{cls} {i} is located at {region(b)}." for i, b in enumerate(bs, 1))


def shift(b: Box, dx: float) -> Box:
    return (round(b[0] + dx, 2), b[1], round(b[2] + dx, 2), b[3])


def width(b: Box) -> float:
    return b[2] - b[0]


def qwen(cls: str, bs: Sequence[Box]) -> str:
    def k(v: float) -> int:
        return int(round(v * 1000 / SIZE))

    return f"<|object_ref_start|>{cls}<|object_ref_end|>" + "".join(
        f"<|box_start|>({k(b[0])},{k(b[1])}),({k(b[2])},{k(b[3])})<|box_end|>" for b in bs)


def grounding_rows() -> List[Dict[str, object]]:
    rng = np.random.default_rng(7)
    counts = [("f1", 3), ("f2", 4), ("f3", 2), ("f4", 2), ("f5", 3), ("f6", 1)]
    t = {name: boxes(rng, n) for name, n in counts}
    rows = [
        # f1: three hsil cells found, one shifted by 1/4 of its width (IoU 0.75/1.25 = 0.6)
        ("f1", "hsil", answer("hsil", t["f1"][:2] + [shift(t["f1"][2], width(t["f1"][2]) * 0.25)]), ""),
        # f2: two found, one shifted by 0.45 of its width (IoU 0.55/1.45 = 0.38), one missed, one extra
        ("f2", "lsil", answer("lsil", [t["f2"][0], t["f2"][1],
                                       shift(t["f2"][2], width(t["f2"][2]) * 0.45),
                                       (400.0, 400.0, 430.0, 440.0)]), ""),
        # f3: the right boxes but the wrong class: no matches
        ("f3", "agc", answer("ascus", t["f3"]), ""),
        # f4: a base Qwen2-VL answer (0-1000 scale; needs --image-size 512 512)
        ("f4", "agc", qwen("agc", t["f4"]), ""),
        # f5: cut off by the token limit inside the third region (malformed, not guessed)
        ("f5", "hsil", answer("hsil", t["f5"])[: answer("hsil", t["f5"]).rfind("</region>") - 3], ""),
        # f6: inference failed
        ("f6", "trichomonas", "", "image not found: fields/f6.png"),
    ]
    out = []
    for img, cls, pred, err in rows:
        truth_cls = cls
        r = {"id": f"{img}-{cls}", "images": [f"fields/{img}.png"],
             "prompt": SYS.format(f"<image>Locate all {cls}."), "predict": pred,
             "label": answer(truth_cls, t[img])}
        if err:
            r["error"] = err
        out.append(r)
    return out


def mcq_prompt(topic: str, options: Sequence[str]) -> str:
    opts = ", ".join(f"{chr(65 + i)}.{o}" for i, o in enumerate(options))
    return SYS.format(f"<image>Please answer the multiple-choice question based on the image [{topic}], and "
                      f"select the best option from the following options [{opts}]. Just answer the option.")


BM = ("Benign or Malignant Effusion", ["Benign", "Malignant"])
GRADE = ("Grading of Made-up Cells", ["Negative", "Low Grade", "High Grade", "Carcinoma"])
TEN = ("Origin of Made-up Metastasis", ["Lung", "Breast", "Stomach", "Colon", "Thyroid", "Kidney", "Ovary",
                                        "Prostate", "Melanoma", "Lymphoma"])
MCQ = [  # (question, correct letter, stand-in answer)
    (BM, "A", "A.Benign."),
    (BM, "B", "B"),
    (BM, "B", "The cells look benign."),          # option text, wrong
    (BM, "A", "Benign"),                           # option text, right
    (GRADE, "C", "C.High Grade."),
    (GRADE, "B", "Low grade or high grade."),      # ambiguous: refused
    (GRADE, "D", "Answer: D"),
    (TEN, "J", "J.Lymphoma."),
    (TEN, "H", "prostate"),                        # option text, right
    (TEN, "E", "K"),                               # not an option: unparsed
]


TASK_NAMES = {"Benign or Malignant Effusion": "Effusion−BM", "Grading of Made-up Cells": "Madeup−grade",
              "Origin of Made-up Metastasis": "Madeup−origin"}


def mcq_rows() -> List[Dict[str, object]]:
    out = []
    for (topic, opts), gold, pred in MCQ:
        i = ord(gold) - 65
        out.append({"prompt": mcq_prompt(topic, opts), "predict": pred, "label": f"{gold}.{opts[i]}."})
    return out


def region_rows() -> List[Dict[str, object]]:
    rng = np.random.default_rng(11)
    b = boxes(rng, 8)
    describe = [("hsil", "hsil"), ("hsil", "HSIL cells."),
                ("lsil", "Low-grade squamous intraepithelial lesion"),
                ("lsil", "hsil"), ("ascus", "ASC-US"), ("agc", "It could be agc or hsil.")]
    out = []
    for k, (truth, pred) in enumerate(describe):
        out.append({"id": f"r{k + 1}", "images": [f"fields/r{k + 1}.png"],
                    "prompt": SYS.format(f"<image>Give a brief description of region.{region(b[k])}"),
                    "predict": pred, "label": truth})
    out.append({"id": "l1", "images": ["fields/l1.png"],
                "prompt": SYS.format("<image>Where is the high-grade squamous intraepithelial lesion?"),
                "predict": f"The lesion is at {region(shift(b[6], 2))}.", "label": region(b[6])})
    out.append({"id": "l2", "images": ["fields/l2.png"],
                "prompt": SYS.format("<image>Where is the atypical glandular cell?"),
                "predict": f"{region(b[7])} or {region(b[6])}", "label": region(b[7])})
    return out


def report_rows() -> List[Dict[str, object]]:
    return [
        {"prompt": SYS.format("<image>Describe the Cytology diagnosis results."),
         "predict": "(Urine) smear shows a few atypical urothelial cells.",
         "label": "(Urine) smear shows a small amount of atypical urothelial cells."},
        {"prompt": SYS.format("<image>Describe the Cytology diagnosis results."),
         "predict": "Negative for intraepithelial lesion or malignancy.",
         "label": "(Cervix) Negative for intraepithelial lesion or malignancy."},
        {"prompt": SYS.format("<image>Were any abnormal cells found during the examination?"),
         "predict": "Yes, high-grade urothelial carcinoma cells were found.",
         "label": "Yes, high-grade urothelial carcinoma cells were seen."},
        {"prompt": SYS.format("<image>What cells are present in the background of smears?"),
         "predict": "Neutrophils.",
         "label": "Neutrophils and a few macrophages."},
    ]


def write_jsonl(name: str, rows: Sequence[Dict[str, object]], keep: Sequence[str]) -> None:
    text = "".join(json.dumps({k: r[k] for k in keep if k in r}, ensure_ascii=False) + "\n" for r in rows)
    (HERE / name).write_text(text, encoding="utf-8")


def write_xlsx(name: str, df: pd.DataFrame) -> None:
    """Rewrite only when the content changed (xlsx bytes carry zip timestamps)."""
    path = HERE / name
    if path.exists():
        old = pd.read_excel(path, dtype=object)
        if old.shape == df.shape and old.astype(str).equals(df.astype(str).reset_index(drop=True)):
            return
    df.to_excel(path, index=False)


#: (input, scorer, extra flags) -- tests/test_eval_cytology.py runs the same commands
EXAMPLES = [("grounding.infer.example.jsonl", "grounding", ["--image-size", "512", "512"]),
            ("grounding.cytochat.example.xlsx", "grounding", []),
            ("mcq.llamafactory.example.jsonl", "mcq", []),
            ("mcq.cytochat.example.xlsx", "mcq", []),
            ("region.infer.example.jsonl", "region", []),
            ("reports.llamafactory.example.jsonl", "report", [])]


def main_() -> None:
    g = grounding_rows()
    write_jsonl("grounding.infer.example.jsonl", g, ["id", "images", "prompt", "predict", "label", "error"])
    # CytoChat's grounding sheet: Image, Prompt (a Python-literal dict holding the prediction), Lable
    gx = [r for r in g if not r.get("error") and "<|box_start|>" not in str(r["predict"])]
    write_xlsx("grounding.cytochat.example.xlsx", pd.DataFrame({
        "Image": [r["images"][0] for r in gx],
        "Prompt": [repr({"prompt": r["prompt"].replace("<image>", ""), "images": r["images"][0],
                         "predict": r["predict"], "label": r["label"] + "\n"}) for r in gx],
        "Lable": [str(r["label"]) + "\n" for r in gx]}))
    m = mcq_rows()
    write_jsonl("mcq.llamafactory.example.jsonl", m, ["prompt", "predict", "label"])
    # CytoChat's MCQ sheet (Image, Task, Class number, Prompt, Lable) + a predict column
    write_xlsx("mcq.cytochat.example.xlsx", pd.DataFrame({
        "Image": [f"Multiple choice-{i + 1}" for i in range(len(MCQ))],
        "Task": [TASK_NAMES[q[0][0]] for q in MCQ],
        "Class number": [len(q[0][1]) for q in MCQ],
        "Prompt": [r["prompt"].replace("<image>", "") for r in m],
        "Lable": [r["label"] + "\n" for r in m],
        "predict": [r["predict"] for r in m]}))
    write_jsonl("region.infer.example.jsonl", region_rows(), ["id", "images", "prompt", "predict", "label"])
    write_jsonl("reports.llamafactory.example.jsonl", report_rows(), ["prompt", "predict", "label"])

    os.chdir(HERE)  # reports name the files relative to this folder
    for name, scorer, extra in EXAMPLES:
        rc = main(["eval", scorer, name, "--out", "."] + extra)
        if rc != 0:
            raise SystemExit(f"slidechat eval {scorer} {name} failed")


if __name__ == "__main__":
    main_()
