"""The box-coordinate layer (slidechat.evaluation.boxes) against the published rules.

Expectations are computed here from the rules as published, not from the module:
* smart_resize: transformers' own function (``image_processing_qwen2_vl.smart_resize`` of the installed
  transformers, which takes the factor, so it serves Qwen3-VL's 32 too) and hand-worked sizes below;
* LLaMA-Factory's pre-scaling: the project's image path (``scale_image``) on real PIL images;
* conversions: Qwen2-VL / Qwen3-VL write round(x / W * 1000); Qwen2.5-VL writes round(x * W' / W) with W'
  the model-input width. Rounding to integers bounds the round-trip error by 0.5 / 1000 * W (relative
  formats) and 0.5 * W / W' (Qwen2.5-VL) pixels of the original image.
"""

import json
import random

import pytest
from PIL import Image

from slidechat.cli.main import main
from slidechat.data.image_sizes import lf_scaled_size
from slidechat.data.images import scale_image
from slidechat.evaluation.boxes import (BOX_FORMATS, box_format, convert_dataset_rows, convert_text,
                                        from_pixels, model_input_size, smart_resize, to_pixels)
from slidechat.evaluation.regions import Region
from slidechat.utils.errors import SlideChatError

SIZES = [(512, 512), (1000, 300), (37, 900), (2048, 1536)]
LF = {"image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32}
NO_LF = {"image_max_pixels": None, "image_min_pixels": None}


def _tf_smart_resize():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    return mod.smart_resize


@pytest.mark.parametrize("size", SIZES + [(28, 28), (5000, 60), (300, 7000), (4000, 4000)])
@pytest.mark.parametrize("factor,lo,hi", [(28, 3136, 12845056), (28, 56 * 56, 28 * 28 * 1280),
                                          (32, 65536, 16777216)])
def test_smart_resize_equals_transformers(size, factor, lo, hi):
    w, h = size
    assert smart_resize(h, w, factor, lo, hi) == tuple(_tf_smart_resize()(h, w, factor=factor, min_pixels=lo,
                                                                          max_pixels=hi))


@pytest.mark.parametrize("size", SIZES + [(3000, 10), (10, 10), (800, 800), (20, 5000)])
def test_lf_scaling_equals_scale_image(size):
    assert lf_scaled_size(size, **LF) == scale_image(Image.new("RGB", size), 768 * 768, 32 * 32).size


# hand-worked from the rule: LF scale (sqrt, int()), then round to 28/32 within min/max pixels
EXPECTED = {
    ((512, 512), "qwen2_5_vl", True): (504, 504),     # 512/28 = 18.3 -> 18*28
    ((1000, 300), "qwen2_5_vl", True): (1008, 308),   # 35.7 -> 36, 10.7 -> 11
    ((37, 900), "qwen2_5_vl", True): (28, 896),       # 1.3 -> 1, 32.1 -> 32
    ((2048, 1536), "qwen2_5_vl", True): (896, 672),   # LF: x0.4330 -> 886x665 -> 32x28, 24x28
    ((2048, 1536), "qwen2_5_vl", False): (2044, 1540),  # no LF: 73.1 -> 73, 54.9 -> 55
    ((512, 512), "qwen3_vl", True): (512, 512),
    ((37, 900), "qwen3_vl", True): (64, 1280),        # 32x896 < 65536 -> ceil(side*1.403/32)*32
    ((2048, 1536), "qwen3_vl", True): (896, 672),     # 886/32 = 27.7 -> 28, 665/32 = 20.8 -> 21
}


@pytest.mark.parametrize("key", sorted(EXPECTED, key=str))
def test_model_input_size_hand_worked(key):
    size, family, lf = key
    assert model_input_size(size, family, **(LF if lf else NO_LF)) == EXPECTED[key]


def _boxes(w, h, n=6, seed=0):
    rnd = random.Random(seed + w * 7 + h)
    out = []
    for i in range(n):
        x1, x2 = sorted(rnd.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rnd.uniform(0, h) for _ in range(2))
        out.append(Region(["hsil", "lsil", None][i % 3], x1, y1, x2, y2))
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lf", [True, False])
@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_round_trip(size, lf, fmt):
    w, h = size
    resize = LF if lf else NO_LF
    regions = _boxes(w, h)
    text = from_pixels(regions, fmt, size, **resize)
    back = to_pixels(text, fmt, size, **resize)
    assert not back.malformed and len(back.boxes) == len(regions)
    if fmt == "region":
        tol_x = tol_y = 0.005 + 1e-9  # written with 2 decimals
    elif fmt in ("qwen2_vl", "qwen3_vl"):
        tol_x, tol_y = 0.5 / 1000 * w + 1e-9, 0.5 / 1000 * h + 1e-9
    else:
        mw, mh = EXPECTED.get((size, fmt, lf)) or model_input_size(size, fmt, **resize)
        tol_x, tol_y = 0.5 * w / mw + 1e-9, 0.5 * h / mh + 1e-9
    for a, b in zip(regions, back.boxes):
        assert a.label == b.label
        assert abs(a.x1 - b.x1) <= tol_x and abs(a.x2 - b.x2) <= tol_x
        assert abs(a.y1 - b.y1) <= tol_y and abs(a.y2 - b.y2) <= tol_y


@pytest.mark.parametrize("size", SIZES)
def test_written_numbers_follow_the_published_rule(size):
    w, h = size
    r = _boxes(w, h, n=1)[0]
    # Qwen2-VL: <|box_start|>(x1,y1),(x2,y2)<|box_end|>, round(x / W * 1000)
    q2 = from_pixels([r], "qwen2_vl", size)
    assert f"({round(r.x1 / w * 1000)},{round(r.y1 / h * 1000)}),({round(r.x2 / w * 1000)}," \
           f"{round(r.y2 / h * 1000)})" in q2
    # Qwen3-VL: bbox_2d on 0-1000
    q3 = json.loads(from_pixels([r], "qwen3_vl", size))
    assert q3[0]["bbox_2d"] == [round(r.x1 / w * 1000), round(r.y1 / h * 1000), round(r.x2 / w * 1000),
                                round(r.y2 / h * 1000)]
    # Qwen2.5-VL: bbox_2d in pixels of the resized input, x * W' / W
    for lf in (True, False):
        resize = LF if lf else NO_LF
        mw, mh = EXPECTED.get((size, "qwen2_5_vl", lf)) or model_input_size(size, "qwen2_5_vl", **resize)
        q25 = json.loads(from_pixels([r], "qwen2_5_vl", size, **resize))
        assert q25[0]["bbox_2d"] == [round(r.x1 * mw / w), round(r.y1 * mh / h), round(r.x2 * mw / w),
                                     round(r.y2 * mh / h)]


def test_reading_native_outputs():
    # a Qwen2.5-VL answer as its cookbook shows it: fenced JSON in pixels of the 1008x308 input
    text = '```json\n[\n\t{"bbox_2d": [504, 154, 1008, 308], "label": "HSIL"}\n]\n```'
    b = to_pixels(text, "qwen2_5_vl", (1000, 300)).boxes
    assert b == [Region("hsil", 500.0, 150.0, 1000.0, 300.0)]
    b = to_pixels('[{"bbox_2d": [500, 500, 1000, 1000]}]', "qwen3_vl", (1000, 300)).boxes
    assert b == [Region(None, 500.0, 150.0, 1000.0, 300.0)]
    # cut off and broken objects are listed, never guessed
    p = to_pixels('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7]}, {"bbox_2d": [1, 2', "qwen3_vl", (100, 100))
    assert len(p.boxes) == 1 and len(p.malformed) == 2
    # <region> pixels are read by every format
    assert to_pixels("hsil 1 is located at <region>1 2 3 4</region>.", "qwen2_5_vl", None).boxes == \
        [Region("hsil", 1.0, 2.0, 3.0, 4.0)]


def test_errors_are_one_line():
    with pytest.raises(SlideChatError, match="unknown box format"):
        box_format("qwen4_vl")
    with pytest.raises(SlideChatError, match="image size"):
        to_pixels('[{"bbox_2d": [1, 2, 3, 4]}]', "qwen3_vl", None)
    with pytest.raises(SlideChatError, match="image size"):
        from_pixels([Region(None, 1, 2, 3, 4)], "qwen2_5_vl", (0, 10))
    with pytest.raises(SlideChatError, match="malformed"):
        convert_text("hsil is located at <region>1 2 3</region>.", "region", "qwen2_vl", (100, 100))


def test_convert_text_keeps_prose_between_region_and_qwen2_vl():
    src = "hsil 1 is located at <region>100 30 200 60</region>. hsil 2 is located at <region>0 0 10 3</region>."
    q2 = convert_text(src, "region", "qwen2_vl", (1000, 300))
    assert q2 == ("hsil 1 is located at <|box_start|>(100,100),(200,200)<|box_end|>. "
                  "hsil 2 is located at <|box_start|>(0,0),(10,10)<|box_end|>.")
    assert convert_text(q2, "qwen2_vl", "region", (1000, 300)) == src
    j = convert_text(src, "region", "qwen2_5_vl", (1000, 300))
    assert json.loads(j) == [{"bbox_2d": [101, 31, 202, 62], "label": "hsil"},
                             {"bbox_2d": [0, 0, 10, 3], "label": "hsil"}]
    assert convert_text(j, "qwen2_5_vl", "region", (1000, 300)).startswith("hsil 1 is located at <region>")
    assert convert_text("No abnormal cells.", "region", "qwen3_vl", None) == "No abnormal cells."


def test_convert_dataset_rows():
    rows = [{"messages": [{"role": "user", "content": "<image>Locate all hsil."},
                          {"role": "assistant", "content": "hsil 1 is located at <region>100 30 200 60</region>."}],
             "images": ["a.png"]},
            {"conversations": [{"from": "human", "value": "<image>Locate all hsil."},
                               {"from": "gpt", "value": "None."}], "images": ["b.png"]}]
    asked = []
    out, n = convert_dataset_rows(rows, "region", "qwen3_vl", lambda r: asked.append(r["images"][0]) or (1000, 300))
    assert n == 1 and asked == ["a.png"]
    assert json.loads(out[0]["messages"][1]["content"]) == [{"bbox_2d": [100, 100, 200, 200], "label": "hsil"}]
    assert out[1] == rows[1] and rows[0]["messages"][1]["content"].startswith("hsil 1")  # input untouched
    back, _ = convert_dataset_rows(out, "qwen3_vl", "region", lambda r: (1000, 300))
    assert back[0]["messages"][1]["content"] == "hsil 1 is located at <region>100 30 200 60</region>."


def _grounding_rows(tmp_path, fmt):
    """Two images; predictions written in ``fmt`` from the same pixel boxes, labels as <region>."""
    sizes = {"a.png": (1000, 300), "b.png": (2048, 1536)}
    for name, s in sizes.items():
        Image.new("RGB", s).save(tmp_path / name)
    truth = {"a.png": [Region("hsil", 100, 30, 200, 60), Region("hsil", 500, 150, 600, 240)],
             "b.png": [Region("lsil", 204.8, 153.6, 409.6, 307.2)]}
    # one exact hit, one miss (IoU 0), one near hit per image
    pred = {"a.png": [Region("hsil", 100, 30, 200, 60), Region("hsil", 800, 0, 900, 30)],
            "b.png": [Region("lsil", 215, 160, 420, 315)]}
    rows = []
    for name, s in sizes.items():
        cls = truth[name][0].label
        rows.append({"id": name, "images": [name],
                     "prompt": f"system\nYou are a helpful assistant.\nuser\n<image>Locate all {cls}.\nassistant\n",
                     "predict": from_pixels(pred[name], fmt, s, **LF),
                     "label": from_pixels(truth[name], "region", s)})
    p = tmp_path / f"preds.{fmt}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("fmt", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_cli_grounding_box_format_same_scores_as_region(tmp_path, fmt, capsys):
    ref = _grounding_rows(tmp_path, "region")
    native = _grounding_rows(tmp_path, fmt)
    assert main(["eval", "grounding", str(ref), "--out-json", str(tmp_path / "ref.json")]) == 0
    assert main(["eval", "grounding", str(native), "--box-format", fmt, "--out-json", str(tmp_path / "n.json")]) == 0
    a = json.loads((tmp_path / "ref.json").read_text())
    b = json.loads((tmp_path / "n.json").read_text())
    for t in ("0.3", "0.5", "0.75"):
        for k in ("tp", "n_pred", "n_true", "precision", "recall", "f1"):
            assert a["overall"][t][k] == b["overall"][t][k], (t, k)
    assert a["overall"]["0.5"]["tp"] == 2 and a["overall"]["0.5"]["n_pred"] == 3
    assert a["malformed"]["n"] == b["malformed"]["n"] == 0
    if fmt != "qwen2_vl":  # read as region, JSON boxes are not boxes at all
        assert main(["eval", "grounding", str(native), "--out-json", str(tmp_path / "x.json")]) == 0
        assert json.loads((tmp_path / "x.json").read_text())["overall"]["0.5"]["n_pred"] == 0


def test_cli_grounding_native_needs_image_size(tmp_path, caplog):
    p = _grounding_rows(tmp_path, "qwen3_vl")
    for name in ("a.png", "b.png"):
        (tmp_path / name).unlink()
    assert main(["eval", "grounding", str(p), "--box-format", "qwen3_vl"]) == 1
    assert "image size" in caplog.text
    assert main(["eval", "grounding", str(p), "--box-format", "qwen3_vl", "--image-size", "1000", "300"]) == 0


def test_convert_boxes_tool(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "convert_boxes", Path(__file__).resolve().parents[1] / "tools" / "convert_boxes.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    Image.new("RGB", (1000, 300)).save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Locate all hsil."},
                        {"role": "assistant", "content": "hsil 1 is located at <region>100 30 200 60</region>."}],
           "images": ["a.png"]}
    (tmp_path / "d.json").write_text(json.dumps([row]))
    assert tool.main([str(tmp_path / "d.json"), "--from", "region", "--to", "qwen2_vl",
                      "--out", str(tmp_path / "q.json")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())  # a JSON list stays a JSON list
    assert out[0]["messages"][1]["content"] == "hsil 1 is located at <|box_start|>(100,100),(200,200)<|box_end|>."
    (tmp_path / "a.png").unlink()
    assert tool.main([str(tmp_path / "d.json"), "--from", "region", "--to", "qwen2_vl",
                      "--out", str(tmp_path / "r.json")]) == 2 and not (tmp_path / "r.json").exists()
