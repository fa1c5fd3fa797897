"""Training inputs shared by the training, cytology-training and resume tests (one builder each).

``slide_train_demo``: 8 tiny feature files of four well-separated classes, a tiny random Qwen2 and the
SlideChat-format stage-1/2 data. ``cyto_train_data``: 6 small synthetic fields whose dark-nucleus count
(0, 1, 2) is the answer of an MCQ row, a tiny random Qwen2-VL and its LLaMA-Factory ``dataset_info.json``,
with the ``--cfg-options`` that point the tiny cytology configs at them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw

LABELS = ["tumor", "normal", "inflamed", "necrotic"]
MCQ_QUESTION = ("Please answer the multiple-choice question based on the image [Dark Nuclei], and select the "
                "best option from the following options [A.None, B.One, C.Two]. Just answer the option.")


def slide_train_demo(root: Path, feature_dim: int = 512, file_attrs: Optional[Dict[str, Any]] = None,
                     llm: Optional[Path] = None, **tiny_llm: Any) -> Dict[str, Any]:
    """Features, tiny LLM and SlideChat training data under ``root`` (keys: root, llm, features, stage1, ...).
    ``feature_dim``/``file_attrs``: the features' width and H5 root attributes (an encoder's provenance);
    ``llm``: an existing tiny LLM folder to reuse; ``tiny_llm``: ``make_tiny_llm`` options (``arch``,
    ``official_template``; default: the demo's Qwen2)."""
    from slidechat.data.synthetic import write_synthetic_dataset
    from slidechat.features.io import write_feature_h5
    from slidechat.model.tiny_llm import make_tiny_llm

    llm = llm or make_tiny_llm(root / "tiny_llm", **tiny_llm)
    feats_dir = root / "features" / "h5_files"
    feats_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, feature_dim)).astype(np.float32)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "path", "label"])
        for i in range(8):
            n = int(rng.integers(40, 70))
            x = centers[i % 4] + 0.5 * rng.normal(size=(n, feature_dim)).astype(np.float32)
            xy = np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64)
            write_feature_h5(feats_dir / f"demo_{i}.h5", x, xy, file_attrs=file_attrs)
            w.writerow([f"demo_{i}", f"slides/demo_{i}.tiff", LABELS[i % 4]])
    paths = write_synthetic_dataset(root / "manifest.csv", root / "data", seed=0)
    return {"root": root, "llm": llm, "features": feats_dir, **paths}


def field(path: Path, seed: int, n_dark: int) -> Path:
    """A small synthetic field: pale cells, ``n_dark`` of them with dark nuclei."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (84, 56), (236, 222, 230))
    d = ImageDraw.Draw(im)
    for k in range(5):
        x, y = rng.integers(6, 70), rng.integers(6, 42)
        d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=(214, 170, 200))
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(60, 20, 80) if k < n_dark else (150, 110, 170))
    im.save(path)
    return path


def write_sharegpt_dataset(data: Path, name: str, rows: List[Dict[str, Any]], file_name: str) -> Path:
    """``rows`` as JSONL in ``data/file_name`` and a ``dataset_info.json`` naming it ``name`` (CytoChat's
    sharegpt columns and tags, as the project's own generator writes them)."""
    from slidechat.data.synthetic_cytology import dataset_info_entry

    (data / file_name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    info = data / "dataset_info.json"
    info.write_text(json.dumps({name: dataset_info_entry(file_name)}), encoding="utf-8")
    return info


def one_image_dataset(data: Path, name: str, question: str, answer: str, image: str) -> Path:
    """A one-row LLaMA-Factory dataset ``name`` in ``data``: a 56x56 random RGB field ``imgs/<image>`` asked
    ``question`` (answer ``answer``), for tests that only need ``slidechat infer`` to run on something."""
    (data / "imgs").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(
        data / "imgs" / image)
    row = {"messages": [{"role": "user", "content": "<image>" + question},
                        {"role": "assistant", "content": answer}], "images": [f"imgs/{image}"]}
    return write_sharegpt_dataset(data, name, [row], f"{name}.jsonl")


def mcq_field_dataset(root: Path, n: int) -> Path:
    """``root/data``: ``n`` synthetic fields with 0, 1, 2 dark nuclei in turn and the MCQ that counts them,
    registered as LLaMA-Factory dataset ``tiny_train`` (``train.jsonl``)."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        n_dark = i % 3
        field(data / "images" / f"f{i}.png", i, n_dark)
        rows.append({"id": f"f{i}", "images": [f"images/f{i}.png"],
                     "messages": [{"role": "user", "content": "<image>" + MCQ_QUESTION},
                                  {"role": "assistant", "content": ["A.None.", "B.One.", "C.Two."][n_dark]}]})
    write_sharegpt_dataset(data, "tiny_train", rows, "train.jsonl")
    return data


def cyto_train_data(root: Path, epochs: int) -> Dict[str, Any]:
    """Tiny Qwen2-VL and a 6-row MCQ dataset under ``root`` (keys: root, tiny, data, opts)."""
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    tiny = make_tiny_qwen2vl(root / "tiny_qwen2vl")
    data = mcq_field_dataset(root, 6)
    opts = [f"model.model_name_or_path={tiny}", f"train_dataloader.dataset.processor={tiny}",
            f"train_dataloader.dataset.dataset_dir={data}", "train_dataloader.dataset.dataset=tiny_train",
            f"train_cfg.max_epochs={epochs}", f"param_scheduler.1.end={epochs}"]
    return {"root": root, "tiny": tiny, "data": data, "opts": opts}
