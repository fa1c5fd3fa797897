"""The first hour (issue 16): the demo's summary block, pictures that say what they show (QC title and
scale bar, gallery boxes where the cells are), a screening message that names real flags, and no known
third-party noise on a command's output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from train_data import one_image_dataset

REPO = Path(__file__).resolve().parents[1]
#: the CLI of this checkout (run from REPO, so `python -m` imports this checkout's package)
SLIDECHAT = [sys.executable, "-m", "slidechat.cli.main"]

#: The known-noise messages, written out here (not imported from slidechat.utils.quiet) so the test
#: checks the output, not the list.
NOISE = [
    r"bitsandbytes was compiled without GPU support",
    r"Setting accelerator to CPU\. If you have GPU or other accelerator",
    r"Qwen2VLRotaryEmbedding` can now be fully parameterized",
]


def _env() -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)  # deepspeed's accelerator notice must be silenced, not avoided
    return env


# ----------------------------------------------------------------------------------------------
# QC picture: title and scale bar


def _grid(n: int, base_mpp: float, ps0: int):
    from slidechat.wsi.patching import PatchGrid

    coords = np.array([[i * ps0, 0] for i in range(n)], np.int64)
    return PatchGrid(coords, np.ones(n, np.float32), 224, ps0, ps0, 0, ps0, 1.0, (4000, 3000), base_mpp,
                     10.0 / base_mpp, 0.5, 20.0, "metadata-mpp", n)


def _dark_run(row: np.ndarray, start: int) -> int:
    """Length of the run of near-black pixels in ``row`` starting at column ``start``."""
    dark = (row.max(axis=-1) < 60)
    n = 0
    while start + n < len(dark) and dark[start + n]:
        n += 1
    return n


def test_qc_png_has_a_title_and_a_scale_bar_of_the_right_length(tmp_path: Path) -> None:
    from slidechat.features.extract import write_qc_png
    from slidechat.wsi.tissue import TissueMask

    dims, base_mpp = (4000, 3000), 0.25
    thumb = np.full((300, 400, 3), 235, np.uint8)  # 10x downsample of a 4000x3000 slide
    mask = TissueMask(np.ones((30, 40), bool), (100.0, 100.0), 0.5, "hsv-otsu")
    out = tmp_path / "qc.png"
    bar = write_qc_png(out, thumb, dims, mask, _grid(3, base_mpp, 448), slide_name="case_0042")
    img = np.asarray(Image.open(out).convert("RGB"))
    # independent: µm per thumbnail pixel = level-0 MPP x (level-0 width / thumbnail width)
    um_per_px = base_mpp * dims[0] / thumb.shape[1]
    assert bar is not None and bar.um_per_px == pytest.approx(um_per_px)
    assert bar.length_px == round(bar.length_um / um_per_px)
    assert 0.05 * 400 <= bar.length_px <= 0.25 * 400  # a readable bar, at most a quarter of the width
    assert bar.length_um in {m * 10.0 ** e for m in (1, 2, 5) for e in range(-1, 5)}
    x0, y0, x1, y1 = bar.box
    # the drawn bar: exactly length_px black pixels in each of its rows, below the thumbnail
    for y in range(y0, y1 + 1):
        assert _dark_run(img[y], x0) == bar.length_px
    assert img.shape[0] > thumb.shape[0] + 40 and y0 > thumb.shape[0]
    # a title band above the thumbnail holds text (dark pixels) on a white ground
    top = img[: img.shape[0] - thumb.shape[0] - 30]
    assert top.shape[0] >= 20 and (top.max(axis=-1) < 100).sum() > 50


# ----------------------------------------------------------------------------------------------
# screening gallery: grounded boxes on the right pixels, or the picture says why none


def _rows(grounded: List[object], size0: int) -> List[object]:
    from slidechat.evaluation.screening import FieldRow

    return [FieldRow.measured("s", i, 1000 + i * size0, 2000, size0, 0.5, 0.1, 0.9 - 0.1 * i, 1.0,
                              [0.1 + 0.1 * i, 0.9 - 0.1 * i], g) for i, g in enumerate(grounded)]


def test_gallery_draws_a_known_box_on_the_right_pixels() -> None:
    from slidechat.apps.screening_report import render_gallery

    size0, P, t = 896, 448, 224  # level-0 field side, field pixels, gallery tile side
    # field 0: a box 200..400 x 100..300 level-0 px inside the field (top-left 1000, 2000)
    box = ["abnormal", 1000 + 200, 2000 + 100, 1000 + 400, 2000 + 300]
    rows = _rows([[box], [], None], size0)
    fields = np.full((3, P, P, 3), 128, np.uint8)
    g = render_gallery("s", rows, [0, 1, 2], fields, float(size0), 0.5, max_tile=t)
    img = g.image
    tile = g.tiles[0]
    ox, oy = tile.origin
    assert tile.size == t and img[oy + t // 2, ox + t // 2].tolist() == [128, 128, 128]
    # independent: tile px = level-0 offset x tile / field side = offset / 4
    ex1, ey1, ex2, ey2 = 200 * t / size0, 100 * t / size0, 400 * t / size0, 300 * t / size0
    assert tile.boxes == [(ox + round(ex1), oy + round(ey1), ox + round(ex2) - 1, oy + round(ey2) - 1)]

    def red(x: int, y: int) -> bool:
        r, gg, b = (int(v) for v in img[y, x])
        return r > 180 and gg < 90 and b < 90

    xa, ya, xb, yb = tile.boxes[0]
    assert red(xa, ya) and red(xb, yb) and red(xa, (ya + yb) // 2) and red((xa + xb) // 2, yb)
    assert not red((xa + xb) // 2, (ya + yb) // 2)  # outline only
    assert not red(xa - 6, ya) and not red(xb + 6, yb)  # nothing outside the box's place
    # the other tiles: no box, and their captions say why
    assert g.tiles[1].boxes == [] and g.tiles[1].grounding == "no regions"
    assert g.tiles[2].boxes == [] and g.tiles[2].grounding == "not grounded"
    assert g.note.startswith("red boxes")
    assert g.scale_bar is not None and g.scale_bar.um_per_px == pytest.approx(0.5 * size0 / t)


def test_gallery_says_why_there_are_no_boxes() -> None:
    from slidechat.apps.screening_report import render_gallery

    fields = np.full((2, 64, 64, 3), 200, np.uint8)
    off = render_gallery("s", _rows([None, None], 128), [0, 1], fields, 128.0, 0.5)
    assert off.note.startswith("no boxes: grounding off") and "--ground-top" in off.note
    empty = render_gallery("s", _rows([[], None], 128), [0, 1], fields, 128.0, 0.5, malformed=2)
    assert empty.note.startswith("no boxes: the model gave no regions") and "2 malformed" in empty.note
    assert all(not t.boxes for t in off.tiles + empty.tiles)


# ----------------------------------------------------------------------------------------------
# screen: a slide smaller than one field names screen's own flags


def _help_flags(command: str) -> set:
    res = subprocess.run([*SLIDECHAT, command, "--help"], capture_output=True, text=True,
                         timeout=120, env=_env(), cwd=str(REPO))
    assert res.returncode == 0, res.stderr
    return set(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", res.stdout))


def test_screen_small_slide_message_names_only_screen_flags(tmp_path: Path) -> None:
    from slidechat.apps.screening import ScreenOptions
    from slidechat.utils.errors import SlideChatError
    from slidechat.wsi.cellularity import plan_fields
    from slidechat.wsi.slide import Slide

    png = tmp_path / "tiny_smear.png"
    Image.fromarray(np.full((300, 300, 3), 230, np.uint8)).save(png)
    with Slide(png) as slide, pytest.raises(SlideChatError) as ei:
        plan_fields(slide, ScreenOptions(base_mpp=0.5, field_size=512, target_mpp=0.5))
    msg = str(ei.value)
    assert "smaller than one field" in msg and str(png) in msg
    named = set(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", msg))
    flags = _help_flags("screen")
    assert named and named <= flags, f"{sorted(named - flags)} are not flags of slidechat screen"
    assert "--field-size" in named and "--mpp" in named


# ----------------------------------------------------------------------------------------------
# no known third-party noise on a command's output


def _noise(text: str) -> List[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in NOISE)]


def test_commands_print_none_of_the_known_noise(tmp_path: Path) -> None:
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    model = make_tiny_qwen2vl(tmp_path / "tiny_qwen2vl")
    data = tmp_path / "data"
    one_image_dataset(data, "t", "Normal or abnormal?", "A.Normal.", "a.png")
    out = tmp_path / "pred.jsonl"
    infer = subprocess.run([*SLIDECHAT, "infer", "--model_name_or_path", str(model), "--dataset", "t",
                            "--dataset_dir", str(data), "--template", "qwen2_vl", "--save_name", str(out),
                            "--max_new_tokens", "4", "--temperature", "0", "--no_progress"],
                           capture_output=True, text=True, timeout=600, env=_env(), cwd=str(REPO))
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert out.is_file()
    # what `slidechat test`/`train`/LoRA import: peft (bitsandbytes) and xtuner's deepspeed
    imports = subprocess.run([sys.executable, "-c", "import slidechat.engine.testing, peft, deepspeed"],
                             capture_output=True, text=True, timeout=600, env=_env(), cwd=str(REPO))
    assert imports.returncode == 0, imports.stderr[-2000:]
    for res in (infer, imports):
        assert _noise(res.stdout + res.stderr) == [], res.stdout[-1000:] + res.stderr[-1000:]


# ----------------------------------------------------------------------------------------------
# the demo: one line per step on the terminal, a summary block read from the files the steps wrote


def _demo_results(root: Path) -> None:
    """The files a finished demo leaves (numbers chosen here, so the block must read them)."""
    from slidechat.model.checkpoint import EXPORTED_CONFIG_FILE  # what `slidechat export` writes

    def write(rel: str, text: str = "x") -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    write("test/test_vqa_output.csv.report.json",
          json.dumps({"kind": "vqa", "mcq": {"overall": {"n": 8, "correct": 7, "accuracy": 0.875}}}))
    write("test/test_vqa_output.csv.report.md", "| acc |")
    write("cytology_scores/generated_predictions.cytology.json", json.dumps({"scorers": {"mcq": {
        "overall": {"n": 100, "correct": 80, "accuracy": 0.8},
        "groups": {"task": [{"value": "screening", "n": 50, "correct": 48, "accuracy": 0.96},
                            {"value": "mcq", "n": 50, "correct": 32, "accuracy": 0.64}]}}}}))
    write("screen/metrics.json", json.dumps({"n_slides": 8, "n_abnormal": 4, "auc": 0.9375, "auc_ci_low": 0.75,
                                             "auc_ci_high": 1.0}))
    for rel in ("features/qc/demo_000.png", "features/qc/demo_002.png", "screen/roc.png",
                "screen/heatmaps/c0.png", "screen/galleries/c0.png", "screen/galleries/c1.png",
                f"export/{EXPORTED_CONFIG_FILE}", "cytochat_screen_hf/config.json", "cytology/images/test/f_0007.png",
                "features/h5_files/demo_000.h5", "features/h5_files/demo_002.h5", "slides/slides/demo_000.svs",
                "cyto_slides/slides/cyto_000.svs"):
        write(rel)
    write("data/test_vqa.csv", "ID,Slide,Question,A,B,Answer\n0,demo_002,Q?,x,y,A\n")


def test_demo_summary_block_reads_the_figures_and_names_the_next_commands(tmp_path: Path) -> None:
    from slidechat.cli.demo import summary_block

    root = tmp_path / "demo"
    _demo_results(root)
    block = summary_block(root, log_path=root / "demo.log", minutes=3.25)
    lines = block.splitlines()
    assert len(lines) <= 30, block  # short
    text = "\n".join(lines)
    assert "87.5 % (7/8)" in text                        # held-out slide accuracy
    assert "96.0 % (48/50)" in text and "64.0 % (32/50)" in text and "80.0 % (80/100)" in text
    assert "AUC 0.938 (95% CI 0.750-1.000) over 8 slides (4 abnormal)" in text
    assert f"{root / 'features' / 'qc'}/ (2 PNG)" in text and f"{root / 'screen' / 'galleries'}/ (2 PNG)" in text
    assert str(root / "screen" / "roc.png") in text and str(root / "demo.log") in text
    nxt = lines[lines.index("Next, try") + 1:-1]
    assert len(nxt) == 5
    assert nxt[0].split() == ["slidechat", "chat", "--checkpoint", str(root / "export"), "--features",
                              str(root / "features" / "h5_files" / "demo_002.h5")]  # a held-out slide
    assert nxt[1].split() == ["slidechat", "chat", "--model_name_or_path", str(root / "cytochat_screen_hf"),
                              "--image", str(root / "cytology" / "images" / "test" / "f_0007.png")]
    # the browser app on the demo's own outputs: slides with their features and the exported slide model,
    # and the cytology slides with the screening outputs and the exported cytology model
    assert nxt[2].split() == ["slidechat", "serve", "--slides", str(root / "slides" / "slides"), "--features",
                              str(root / "features"), "--checkpoint", str(root / "export")]
    assert nxt[3].split() == ["slidechat", "serve", "--slides", str(root / "cyto_slides" / "slides"),
                              "--screening", str(root / "screen"), "--model_name_or_path",
                              str(root / "cytochat_screen_hf")]
    # the chat and serve commands' flags are their own
    flags = _help_flags("chat")
    assert {"--checkpoint", "--features", "--model_name_or_path", "--image"} <= flags
    assert {"--slides", "--features", "--screening", "--checkpoint", "--model_name_or_path"} <= _help_flags("serve")

    empty = summary_block(tmp_path / "nothing")
    assert empty.count("not run") == 3 and "slidechat chat" not in empty and "not made" in empty
    assert "slidechat serve" not in empty


def test_demo_steps_print_one_line_each_and_log_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    script = f"""
import logging, subprocess, sys
from pathlib import Path
from slidechat.cli.demo import Steps
logging.basicConfig(level=logging.INFO)
steps = Steps(Path({str(log)!r}))
with steps.step("[x 1/2] noisy step"):
    print("mmengine - INFO - Iter(train) [1/480]")
    logging.getLogger("mmengine").warning("a warning from the step")
    subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
with steps.step("[x 2/2] finished earlier", done=True):
    pass
try:
    with steps.step("[x 3/2] failing step"):
        print("the reason it failed")
        raise RuntimeError("boom")
except RuntimeError:
    pass
steps.close()
print("after the steps")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(REPO), env=_env())
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0].startswith("[x 1/2] noisy step ... done (")
    assert out[1] == "[x 2/2] finished earlier ... already done"
    assert out[2].startswith("[x 3/2] failing step ... FAILED after")
    assert any("the reason it failed" in line for line in out[3:])  # the log's tail, on failure
    assert out[-1] == "after the steps"
    assert out[-2] == f"(full output: {log})"
    assert all(line.startswith("  | ") for line in out[3:-2])  # nothing but the quoted tail
    assert not any("Iter(train)" in line or "child out" in line for line in out[:3])
    assert "child err" not in res.stderr and "a warning from the step" not in res.stderr
    logged = log.read_text()
    for s in ("Iter(train) [1/480]", "a warning from the step", "child out", "child err", "the reason it failed"):
        assert s in logged
