"""What ``slidechat serve`` tests run on: the demo's generators at test size, built once per session.

``build_serve_setup(root)`` writes (and on a second call reuses):

- ``slides``: 3 demo slides (``make_demo_slides``: 2560x2048 at 20x, Aperio SVS) and, in the same folder,
  one plain PNG field of view (a plain image is one field);
- ``features``: ``extract_slides`` with the ``tiny_test`` encoder (its ``h5_files/`` per slide);
- ``slide_model``: a tiny random SlideChat (``configs/tiny/stage_2.py``, random init) exported as a folder,
  and ``slide_config`` + ``slide_ckpt`` + ``slide_overrides`` for the config + checkpoint way in;
- ``cyto_slides``: 2 synthetic cytology slides (1536 px square) and ``qwen2vl``: a tiny random Qwen2-VL folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
SLIDE_CONFIG = REPO / "configs" / "tiny" / "stage_2.py"


def build_serve_setup(root: Path) -> Dict[str, object]:
    """The slide folders and tiny models the serve tests use; built once (``root/READY`` marks it)."""
    root = Path(root)
    info: Dict[str, object] = {
        "root": root, "slides": root / "slides" / "slides", "features": root / "features",
        "h5": root / "features" / "h5_files", "llm": root / "tiny_llm", "slide_model": root / "slide_model",
        "slide_config": SLIDE_CONFIG, "slide_ckpt": root / "slide_ckpt.pth",
        "cyto_root": root / "cyto", "cyto_slides": root / "cyto" / "slides", "qwen2vl": root / "qwen2vl",
        "fov": root / "slides" / "slides" / "field_tumor.png",
    }
    info["slide_overrides"] = {"llm_name_or_path": str(info["llm"]),
                               "tokenizer.pretrained_model_name_or_path": str(info["llm"]),
                               "model.llm.pretrained_model_name_or_path": str(info["llm"]),
                               "model.pretrained_pth": None}
    if (root / "READY").is_file():
        return info
    import torch
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from slidechat.apps.extract import extract_slides
    from slidechat.data.synthetic_cytology import write_cytology_slides
    from slidechat.model.tiny_llm import make_tiny_llm
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl
    from slidechat.wsi.synthetic import make_demo_slides, write_fov_png

    root.mkdir(parents=True, exist_ok=True)
    make_demo_slides(root / "slides", n_slides=3, seed=0)
    extract_slides(info["slides"], info["features"], encoder="tiny_test", num_workers=1, batch_size=16,
                   progress=False)
    write_fov_png(info["fov"], "tumor", size=512, seed=1)  # after extraction: a field, not a slide to encode
    make_tiny_llm(info["llm"])
    cfg = Config.fromfile(str(SLIDE_CONFIG))
    cfg.merge_from_dict(info["slide_overrides"])
    torch.manual_seed(0)
    model = BUILDER.build(cfg.model)
    torch.save({"meta": {}, "state_dict": model.state_dict()}, info["slide_ckpt"])
    model.core.save_pretrained(info["slide_model"], tokenizer=BUILDER.build(cfg.tokenizer))
    write_cytology_slides(info["cyto_root"], n_slides=2, seed=0, width=1536, height=1536)
    make_tiny_qwen2vl(info["qwen2vl"])
    (root / "READY").write_text("ok")
    return info


def write_screening_output(out_dir: Path, slide: str, fields: Sequence[Tuple[int, int, int, float]]) -> Path:
    """A ``slidechat screen`` output folder holding one field table, ``fields/<slide>.csv``, written by the
    screening writer itself; ``fields`` are ``(x, y, size_level0, score)`` in level-0 px. Returns the CSV."""
    from slidechat.evaluation.screening import FieldRow, write_field_table

    rows = [FieldRow.measured(slide, i, x, y, size, 0.5, 0.1, score, 1.0, [1.0 - score, score])
            for i, (x, y, size, score) in enumerate(fields)]
    path = Path(out_dir) / "fields" / f"{slide}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_field_table(path, rows, n_options=2)
