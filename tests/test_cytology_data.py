"""Cytology data layer: LLaMA-Factory sharegpt reader, image scaling, qwen2_vl template, tiny Qwen2-VL.

Expectations are written from LLaMA-Factory's rules (data/parser.py, converter.py, template.py,
mm_plugin.py at the commit CytoChat pins), not from our own output. The example rows imitate the SHAPE
of CytoChat's benchmark prompts (MCQ with bracketed options and "Just answer the option.", "Locate all
<class>.", region description); their wording is our own.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slidechat.data.images import load_image, scale_image
from slidechat.data.llamafactory import read_llamafactory
from slidechat.data.template import encode_qwen2vl, render_qwen2vl_prompt
from slidechat.model.constants import IGNORE_INDEX
from slidechat.utils.errors import SlideChatError

SYS = "You are a helpful assistant."
MCQ_Q = ("Please answer the multiple-choice question based on the image [Grading of Synthetic Cells], and "
         "select the best option from the following options [A.Normal, B.Enlarged Nuclei, C.Dark Nuclei]. "
         "Just answer the option.")
LOC_Q = "Locate all enlarged."
LOC_A = "enlarged 1 is located at <region>10.5 20.25 40.0 61.75</region>."
REG_Q = "Give a brief description of region.<region>12.0 8.5 30.25 44.0</region>"


def _img(path, size=(60, 44), color=(200, 120, 160), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = (rng.random((size[1], size[0], 3)) * 60 + np.array(color) * 0.7).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl") / "model")


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny))


@pytest.fixture()
def ddir(tmp_path):
    d = tmp_path / "data"
    _img(d / "images" / "f0.png")
    _img(d / "images" / "f1.jpg", size=(80, 56), color=(150, 90, 200))
    _img(d / "images" / "f2.png", size=(40, 40))
    return d


# --------------------------------------------------------------------------------------------- reader
def test_registry_role_content_jsonl_and_relative_images(ddir):
    _jsonl(ddir / "cyto.jsonl", [
        {"messages": [{"role": "user", "content": "<image>" + MCQ_Q},
                      {"role": "assistant", "content": "B.Enlarged Nuclei."}], "images": ["images/f0.png"]},
        {"messages": [{"role": "user", "content": "<image>" + LOC_Q}, {"role": "assistant", "content": LOC_A}],
         "images": ["images/f1.jpg"], "id": "field-7"},
    ])
    (ddir / "dataset_info.json").write_text(json.dumps({"cyto_test": {
        "file_name": "cyto.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant"}}}))
    ex = read_llamafactory("cyto_test", ddir)
    assert len(ex) == 2 and ex.num_skipped == 0
    a, b = ex
    assert (a.index, a.id, a.dataset, a.source) == (0, None, "cyto_test", ddir / "cyto.jsonl")
    assert a.messages == [{"role": "user", "content": "<image>" + MCQ_Q},
                          {"role": "assistant", "content": "B.Enlarged Nuclei."}]
    assert a.images == [ddir / "images" / "f0.png"] and a.system is None
    assert (b.index, b.id) == (1, "field-7") and b.label == LOC_A
    assert b.prompt_messages == [{"role": "user", "content": "<image>" + LOC_Q}]


def test_registry_default_sharegpt_spelling_json_list_custom_columns_and_system(ddir):
    # LLaMA-Factory's defaults: conversations/from/value/human/gpt, system as a leading message
    rows = [{"dialog": [{"from": "system", "value": "You are a cytopathologist."},
                        {"from": "human", "value": "<image>Describe the findings."},
                        {"from": "gpt", "value": "Normal squamous cells."},
                        {"from": "human", "value": "Any abnormal cells?"},
                        {"from": "gpt", "value": "No."}],
             "pics": "images/f2.png"},
            {"dialog": [{"from": "human", "value": "<image>\n<image>Compare."}, {"from": "gpt", "value": "Same."}],
             "pics": ["images/f0.png", str(ddir / "images" / "f1.jpg")], "sys": "Be brief."}]
    (ddir / "conv.json").write_text(json.dumps(rows, indent=1))
    (ddir / "dataset_info.json").write_text(json.dumps({
        "conv": {"file_name": "conv.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "images": "pics", "system": "sys"}}}))
    a, b = read_llamafactory("conv", ddir)
    assert a.system == "You are a cytopathologist."
    assert [m["role"] for m in a.messages] == ["user", "assistant", "user", "assistant"]
    assert a.images == [ddir / "images" / "f2.png"]
    assert b.system == "Be brief." and b.images == [ddir / "images/f0.png", ddir / "images/f1.jpg"]


def test_comma_list_direct_paths_and_max_samples(ddir):
    rows = [{"messages": [{"role": "user", "content": f"<image>q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "images": ["images/f0.png"]} for i in range(5)]
    _jsonl(ddir / "a.jsonl", rows)
    conv = [{"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}],
             "images": ["images/f2.png"]}]
    (ddir / "b.json").write_text(json.dumps(conv))
    ex = read_llamafactory(f"{ddir / 'a.jsonl'},{ddir / 'b.json'}", max_samples=3)
    assert [e.messages[1]["content"] for e in ex] == ["a0", "a1", "a2", "y"]
    assert ex[3].images == [ddir / "images" / "f2.png"]  # relative to the file's folder


def test_tags_must_match_the_rows(ddir):
    _jsonl(ddir / "x.jsonl", [{"conversations": [{"from": "human", "value": "<image>q"},
                                                  {"from": "gpt", "value": "a"}], "images": ["images/f0.png"]}])
    (ddir / "dataset_info.json").write_text(json.dumps({"x": {
        "file_name": "x.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    with pytest.raises(SlideChatError, match=r"x\.jsonl: row 0: no 'messages' column.*conversations"):
        read_llamafactory("x", ddir)
    with pytest.raises(SlideChatError, match=r"not registered \(known: x\)"):
        read_llamafactory("nope", ddir)


BAD_CASES = {
    "missing image": ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                       "images": ["images/absent.png"]}, r"image 0 \(images/absent.png\): image not found"),
    "unreadable image": ({"messages": [{"role": "user", "content": "<image>q"},
                                       {"role": "assistant", "content": "a"}],
                          "images": ["images/broken.jpg"]}, r"image 0 \(images/broken.jpg\): cannot read image"),
    "count mismatch": ({"messages": [{"role": "user", "content": "<image><image>q"},
                                     {"role": "assistant", "content": "a"}], "images": ["images/f0.png"]},
                       r"2 <image> placeholder\(s\) but 1 image\(s\)"),
    "empty answer": ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "  "}],
                      "images": ["images/f0.png"]}, r"turn 1: empty answer"),
    "bad roles": ({"messages": [{"role": "assistant", "content": "<image>q"}, {"role": "user", "content": "a"}],
                   "images": ["images/f0.png"]}, r"turn 0: role 'assistant' where 'user' was expected"),
    "no answer": ({"messages": [{"role": "user", "content": "<image>q"}], "images": ["images/f0.png"]},
                  r"the last turn must be the assistant's answer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_name_file_and_row_or_are_skipped(ddir, case):
    (ddir / "images" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    good = {"messages": [{"role": "user", "content": "<image>ok"}, {"role": "assistant", "content": "fine"}],
            "images": ["images/f0.png"]}
    bad, pattern = BAD_CASES[case]
    path = _jsonl(ddir / "rows.jsonl", [good, dict(bad, id="bad-1"), good])
    with pytest.raises(SlideChatError, match=r"rows\.jsonl: row 1 \(id bad-1\): " + pattern):
        read_llamafactory(str(path), ddir)
    ex = read_llamafactory(str(path), ddir, skip_bad=True)
    assert [e.index for e in ex] == [0, 2] and ex.num_skipped == 1
    assert "row 1 (id bad-1)" in ex.skipped[0]


def test_bad_json_line_is_named(ddir):
    good = {"messages": [{"role": "user", "content": "<image>ok"}, {"role": "assistant", "content": "fine"}],
            "images": ["images/f0.png"]}
    path = ddir / "lines.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"messages": [oops\n' + json.dumps(good) + "\n")
    with pytest.raises(SlideChatError, match=r"lines\.jsonl: row 1 \(line 3\): malformed JSON"):
        read_llamafactory(str(path))
    ex = read_llamafactory(str(path), skip_bad=True)
    assert [e.index for e in ex] == [0, 2] and ex.num_skipped == 1
    (ddir / "list.json").write_text('[{"messages": ]')
    with pytest.raises(SlideChatError, match=r"list\.json: malformed JSON"):
        read_llamafactory(str(ddir / "list.json"))


# --------------------------------------------------------------------------------------------- images
def test_scale_image_follows_llamafactory_rule():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (900, 1000, 3), dtype=np.uint8))
    # area 900000 > 768*768 = 589824: factor sqrt(0.65536) = 0.80954 -> int(809.5), int(728.6)
    out = scale_image(big)
    assert out.size == (809, 728) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(big.resize((809, 728), Image.BICUBIC)))
    # 20x20 = 400 < 32*32: factor sqrt(1024/400) = 1.6 -> 32x32
    assert scale_image(Image.new("L", (20, 20))).size == (32, 32)
    # 10x150 = 1500 px is above the minimum; the 10-px side is raised to 28
    small = scale_image(Image.new("RGBA", (10, 150)))
    assert small.size == (28, 150) and small.mode == "RGB"
    # 28x6000: aspect 214 > 200 -> height becomes 28 * 180
    assert scale_image(Image.new("RGB", (28, 6000))).size == (28, 5040)
    # a 512-px benchmark-sized field is left alone
    f = Image.new("RGB", (512, 512), (10, 20, 30))
    assert scale_image(f).size == (512, 512)
    assert scale_image(big, max_pixels=100 * 100).size == (int(1000 * math.sqrt(0.01 / 0.9)),
                                                          int(900 * math.sqrt(0.01 / 0.9)))


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(SlideChatError, match=r"nothere\.png: image not found"):
        load_image(tmp_path / "nothere.png")
    p = tmp_path / "trunc.png"
    _img(tmp_path / "ok.png", size=(64, 64))
    p.write_bytes((tmp_path / "ok.png").read_bytes()[:80])
    with pytest.raises(SlideChatError, match=r"trunc\.png: cannot read image"):
        load_image(p)


# --------------------------------------------------------------------------------------------- template
def test_rendered_prompt_matches_llamafactory_and_benchmark_shape(processor):
    msgs = [{"role": "user", "content": "<image>" + LOC_Q}, {"role": "assistant", "content": LOC_A}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Locate all enlarged.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_qwen2vl_prompt(msgs) == expected
    # the benchmark stores prompts decoded with special tokens skipped
    for q in (MCQ_Q, LOC_Q, REG_Q):
        prompt = render_qwen2vl_prompt([{"role": "user", "content": "<image>" + q}])
        ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert processor.tokenizer.decode(ids, skip_special_tokens=True) == \
            f"system\nYou are a helpful assistant.\nuser\n{q}\nassistant\n"
    # the official Qwen2-VL chat template gives the same text for a single-image turn
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LOC_Q}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == expected
    # multi-turn: history answers kept, system prompt replaced, final answer left out
    multi = [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "Normal."},
             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    assert render_qwen2vl_prompt(multi, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Describe.<|im_end|>\n<|im_start|>assistant\nNormal.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_qwen2vl_prompt(multi, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\nYes.<|im_end|>\n")


def test_labels_cover_only_assistant_slots(processor):
    tok = processor.tokenizer
    msgs = [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "Normal cells."},
            {"role": "user", "content": "Abnormal?"}, {"role": "assistant", "content": "No."}]
    ids, labels = encode_qwen2vl(tok, msgs, image_seqlens=[6])
    assert len(ids) == len(labels)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 6
    # the whole sequence is the rendered conversation with the image span expanded to 6 pads
    full = render_qwen2vl_prompt(msgs, add_generation_prompt=False).replace("<|image_pad|>", "<|image_pad|>" * 6)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    # loss runs over "answer<|im_end|>\n" of each assistant turn (LLaMA-Factory's assistant slot), nothing else
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert lab == i
            cur.append(i)
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == ["Normal cells.<|im_end|>\n", "No.<|im_end|>\n"]
    assert labels[-1] != IGNORE_INDEX  # the last "\n" is trained too


def test_cutoff_len_follows_llamafactory_infer_seqlen(processor):
    tok = processor.tokenizer
    msgs = [{"role": "user", "content": "q " * 40}, {"role": "assistant", "content": "a " * 40}]
    full_ids, _ = encode_qwen2vl(tok, msgs)
    src = len(tok(render_qwen2vl_prompt(msgs), add_special_tokens=False)["input_ids"])
    tgt = len(full_ids) - src
    cutoff = 60  # both halves longer than cutoff/2: target keeps int(cutoff * tgt / (src + tgt))
    assert src * 2 >= cutoff and tgt * 2 >= cutoff
    ids, labels = encode_qwen2vl(tok, msgs, cutoff_len=cutoff)
    keep_t = int(cutoff * (tgt / (src + tgt)))
    assert len(ids) == cutoff and sum(lab != IGNORE_INDEX for lab in labels) == keep_t


# --------------------------------------------------------------------------------------------- model
def test_tiny_qwen2vl_folder_has_qwen2vl_tokens_and_processor(tiny, processor):
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    tok = processor.tokenizer
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
              "<|image_pad|>", "<|video_pad|>", "<|box_start|>", "<|box_end|>", "<|object_ref_start|>",
              "<|object_ref_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_pad|>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] >= 256, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny))
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    text = cfg.text_config  # transformers 5: the decoder's fields live in the text sub-config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (32, 2, 2)
    assert text.rope_parameters["mrope_section"] == [2, 1, 1] and cfg.vision_config.depth == 2
    assert text.vocab_size == len(tok) < 400


def test_load_qwen2vl_refuses_other_folders(tmp_path, tiny):
    from slidechat.model.qwen2vl import load_qwen2vl

    other = tmp_path / "qwen2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(SlideChatError, match=r"qwen2: not a Qwen2-VL model \(model_type 'qwen2'"):
        load_qwen2vl(other)
    with pytest.raises(SlideChatError, match="model folder not found"):
        load_qwen2vl(tmp_path / "missing")
    model, proc = load_qwen2vl(tiny)
    assert not model.training and type(proc).__name__ == "Qwen2VLProcessor"


def test_prepare_generation_batch_left_pads_and_matches_single_rows(tiny, ddir):
    from slidechat.data.llamafactory import Example
    from slidechat.data.qwen2vl_batch import prepare_generation_batch
    from slidechat.model.qwen2vl import load_qwen2vl

    model, proc = load_qwen2vl(tiny)
    rows = [Example(0, None, [{"role": "user", "content": "<image>" + MCQ_Q},
                              {"role": "assistant", "content": "A.Normal."}], [ddir / "images/f1.jpg"], None,
                    ddir / "x.jsonl", "x"),
            Example(1, None, [{"role": "user", "content": "<image>Hi"}], [ddir / "images/f2.png"], None,
                    ddir / "x.jsonl", "x")]
    batch = prepare_generation_batch(proc, rows)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and mask[1, 0] == 0 and mask[0].all() and mask[1, -1] == 1
    grid = batch["image_grid_thw"]
    # f1 is 80x56 -> smart_resize to multiples of 28: 84x56 -> grid (1, 4, 6); f2 40x40 -> 56x56 (min 56*56)
    assert grid.tolist() == [[1, 4, 6], [1, 4, 4]]
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == pad).sum(1).tolist() == [6, 4]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        for i, row in enumerate(rows):
            one = prepare_generation_batch(proc, [row])
            single = model.generate(**one, max_new_tokens=4, do_sample=False)
            assert single[0, one["input_ids"].shape[1]:].tolist() == out[i, batch["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------------------------- slide model
def test_slide_dataset_reads_llamafactory_rows_with_feature_files(tmp_path, processor):
    from slidechat.data.dataset import SlideInstructionDataset
    from slidechat.features.io import write_feature_h5

    d = tmp_path / "slides"
    (d / "features").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("s1", 7), ("s2", 5)):
        write_feature_h5(d / "features" / f"{name}.h5", rng.normal(size=(n, 512)).astype(np.float32),
                         np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64))
    q, a = "What is the diagnosis?", "Invasive carcinoma."
    lf_rows = [{"id": "case-1", "messages": [{"role": "system", "content": "You are a pathologist."},
                                             {"role": "user", "content": "<image>\n" + q},
                                             {"role": "assistant", "content": a}], "images": ["features/s1.h5"]},
               {"messages": [{"role": "user", "content": "<image>Grade?"}, {"role": "assistant", "content": "2"}],
                "images": ["features/s2"]}]  # suffix optional, as for SlideChat rows
    _jsonl(d / "slides.jsonl", lf_rows)
    (d / "dataset_info.json").write_text(json.dumps({"slide_vqa": {
        "file_name": "slides.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    tok = processor.tokenizer
    by_name = SlideInstructionDataset("slide_vqa", tok, dataset_dir=d, max_length=256, feature_dim=512)
    by_path = SlideInstructionDataset(d / "slides.jsonl", tok, max_length=256, feature_dim=512)
    # the same content in SlideChat's own format gives the same training item
    sc = d / "slidechat.json"
    sc.write_text(json.dumps([{"id": "case-1", "image": ["s1.h5"],
                               "conversations": [{"from": "human", "value": q + "\n<image>"},
                                                 {"from": "gpt", "value": a}]}]))
    classic = SlideInstructionDataset(sc, tok, feature_root=d / "features", max_length=256, feature_dim=512,
                                      system="You are a pathologist.")
    assert len(by_name) == len(by_path) == 2
    for ds in (by_name, by_path):
        item = ds[0]
        assert item["id"] == "case-1" and item["features"].shape == (7, 512)
        ref = classic[0]
        assert torch.equal(item["input_ids"], ref["input_ids"]) and torch.equal(item["labels"], ref["labels"])
        assert torch.equal(item["features"], ref["features"])
        assert ds[1]["features"].shape == (5, 512) and ds[1]["id"] == "1"
    # bad rows: named with file and row, or skipped and counted with the same skip_bad switch
    lf_rows.append({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                    "images": ["features/absent.h5"]})
    _jsonl(d / "slides.jsonl", lf_rows)
    with pytest.raises(SlideChatError, match=r"slides\.jsonl: row 2: image 0 \(features/absent.h5\): "
                                             r"feature file not found"):
        SlideInstructionDataset("slide_vqa", tok, dataset_dir=d, max_length=256)
    ds = SlideInstructionDataset("slide_vqa", tok, dataset_dir=d, max_length=256, skip_bad=True)
    assert len(ds) == 2 and ds.num_skipped == 1


def test_checked_in_example_reads_and_is_reproducible(tmp_path, processor):
    from slidechat.data.cytology_dataset import CytologySFTDataset
    from slidechat.data.synthetic_cytology import write_fields_dataset

    root = Path(__file__).resolve().parents[1] / "dataset" / "cytology"
    info = json.loads((root / "dataset_info.json").read_text())
    for name in info:
        ex = read_llamafactory(name, root)
        assert ex and all(len(e.images) == 1 and e.images[0].is_file() for e in ex)
    ds = CytologySFTDataset("cyto_train", processor, root, image_max_pixels=128 * 128)
    item = ds[0]
    assert int((item["labels"] != IGNORE_INDEX).sum()) > 0 and item["image_grid_thw"].shape == (1, 3)
    write_fields_dataset(tmp_path, n_fields=4, seed=0, size=256)  # the README's command
    for f in sorted(root.glob("*.json*")):
        assert (tmp_path / f.name).read_text() == f.read_text(), f.name


def test_sft_dataset_bad_image_at_load_time(ddir, processor):
    from slidechat.data.cytology_dataset import CytologySFTDataset

    (ddir / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "<image>" + LOC_Q},
                                          {"role": "assistant", "content": LOC_A}],
             "images": ["images/broken.jpg" if i == 0 else "images/f0.png"]} for i in range(2)]
    path = _jsonl(ddir / "sft.jsonl", rows)
    ds = CytologySFTDataset(str(path), processor, ddir, check_images=False)
    with pytest.raises(SlideChatError, match=r"sft\.jsonl: row 0 \(id r0\): .*broken\.jpg: cannot read image"):
        ds[0]
    skipping = CytologySFTDataset(str(path), processor, ddir, check_images=False, skip_bad=True)
    assert skipping[0]["id"] == "r1" and skipping.num_skipped_at_load == 1
    with pytest.raises(SlideChatError, match=r"row 0 \(id r0\): image 0 \(images/broken.jpg\)"):
        CytologySFTDataset(str(path), processor, ddir)  # checked up front by default
