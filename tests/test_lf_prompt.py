"""Inference prompts, cutoff_len, vllm_infer flags and stop tokens exactly as LLaMA-Factory (issue 18, items
1, 4, 7, 8).

Every expectation here is computed in the test from LLaMA-Factory's rules (read at the commit CytoChat
pins, 5afa851), not from slidechat's code:

* ``data/template.py`` ``Template._encode`` / ``_convert_elements_to_ids``: each slot string (the system
  slot, each user slot, each assistant slot) is ``tokenizer.encode(slot, add_special_tokens=False)`` on its
  own and the ids are concatenated; ``encode_oneturn``: the prompt is every message but the last, the
  response the last. ``qwen2_vl`` slots: user ``<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``,
  assistant ``{content}<|im_end|>\\n``, system ``<|im_start|>system\\n{content}<|im_end|>\\n``, default system
  "You are a helpful assistant.", ``stop_words=["<|im_end|>"]``, ``replace_eos=True``.
* ``scripts/vllm_infer.py`` sets ``mm_plugin.expand_mm_tokens = False``, so each ``<image>`` is
  ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad) in the prompt ids; prompt and label are
  ``tokenizer.decode(..., skip_special_tokens=True)``.
* ``data/processor/unsupervised.py`` + ``processor_utils.infer_seqlen``: ``input_ids[:source_len]``,
  ``labels[:target_len]`` with the source/target split written out below.
* ``Template.get_stop_token_ids``: ``{tokenizer.eos_token_id} | {stop words}`` (eos = ``<|im_end|>`` after
  ``fix_special_tokens`` with ``replace_eos``); vLLM adds the model's eos and the ``eos_token_id`` list of
  its ``generation_config.json`` (``SamplingParams.update_from_generation_config``).
"""

from __future__ import annotations

import json
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

# qwen2_vl slots, copied from LLaMA-Factory's template registration (data/template.py, name="qwen2_vl")
LF_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
LF_ASSISTANT = "{content}<|im_end|>\n"
LF_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
LF_DEFAULT_SYSTEM = "You are a helpful assistant."
LF_STOP_WORDS = ["<|im_end|>"]
LF_IMAGE_UNEXPANDED = "<|vision_start|><|image_pad|><|vision_end|>"  # expand_mm_tokens = False

# a multi-turn row whose history answers start with newlines (the case a joined string gets wrong)
Q1, A1, Q2, A2, Q3, A3 = ("<image>Is this field abnormal?", "\nYes", "Which cells?", "\n\nDark ones.",
                          "Anything else?", "No.")


def lf_slots(tok, messages: List[Dict[str, str]], system: Optional[str] = None) -> List[List[int]]:
    """LLaMA-Factory's ``Template._encode`` for qwen2_vl (one id list per message), images unexpanded."""
    system = system or LF_DEFAULT_SYSTEM
    out = []
    for i, m in enumerate(messages):
        content = m["content"].replace("<image>", LF_IMAGE_UNEXPANDED)
        elements = [LF_SYSTEM.format(content=system)] if i == 0 and system else []
        elements.append((LF_USER if m["role"] == "user" else LF_ASSISTANT).format(content=content))
        ids: List[int] = []
        for el in elements:
            if el:
                ids += tok.encode(el, add_special_tokens=False)
        out.append(ids)
    return out


def lf_infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> Tuple[int, int]:
    """``infer_seqlen`` of LLaMA-Factory's data/processor/processor_utils.py, written out."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def lf_vllm_infer_row(tok, messages, system=None, cutoff_len=2048) -> Tuple[List[int], List[int]]:
    """(prompt ids, label ids) of a row as vllm_infer gets them (unsupervised processor, encode_oneturn)."""
    enc = lf_slots(tok, messages, system)
    prompt = [t for ids in enc[:-1] for t in ids]
    label = enc[-1]
    s, t = lf_infer_seqlen(len(prompt), len(label), cutoff_len)
    return prompt[:s], label[:t]


def _msgs(*pairs) -> List[Dict[str, str]]:
    out = []
    for k, text in enumerate(pairs):
        out.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Qwen2-VL with one BPE merge swapped for ``Ċ Ċ`` -> ``ĊĊ`` (Qwen's ``"\\n\\n"`` token 271), so
    a newline after ``assistant\\n`` merges in a joined string as it does with the released tokenizer."""
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    root = tmp_path_factory.mktemp("lf_prompt")
    d = make_tiny_qwen2vl(root / "model")
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    last = merges[-1]
    old_tok = "".join(last) if isinstance(last, list) else last.replace(" ", "")
    new_id = vocab.pop(old_tok)
    vocab["ĊĊ"] = new_id
    merges[-1] = ["Ċ", "Ċ"] if isinstance(last, list) else "Ċ Ċ"
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    if (d / "merges.txt").is_file():  # transformers 5 writes tokenizer.json only
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        lines[-1] = "Ċ Ċ"
        (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(model_dir))
    nl = proc.tokenizer.encode("\n", add_special_tokens=False)
    assert len(nl) == 1 and len(proc.tokenizer.encode("\n\n", add_special_tokens=False)) == 1
    return proc


@pytest.fixture(scope="module")
def dataset(model_dir):
    """A LLaMA-Factory dataset dir: row 0 the newline-history row, row 1 a long answer, row 2 single-turn."""
    from PIL import Image

    data = model_dir.parent / "data"
    (data / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(56, 84), (84, 56), (70, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / "imgs" / f"f{i}.png")
    long_answer = " ".join(f"dark {k} is located at <region>{k} 2 30 40</region>." for k in range(30))
    rows = [{"messages": _msgs(Q1, A1, Q2, A2, Q3, A3), "images": ["imgs/f0.png"]},
            {"messages": _msgs("<image>Locate all dark.", long_answer), "images": ["imgs/f1.png"]},
            {"messages": _msgs("<image>Locate all dark.", "None."), "images": ["imgs/f2.png"]}]
    with open(data / "rows.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    info = {"rows": {"file_name": "rows.jsonl", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "images": "images"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return {"dir": data, "rows": rows}


def _item(row, source="rows.jsonl row 0"):
    from slidechat.inference.loop import CytologyItem

    msgs = row["messages"]
    return CytologyItem(position=0, key={}, images=list(row["images"]), messages=msgs[:-1], system=None,
                        label_content=msgs[-1]["content"], source=source)


# ----------------------------------------------------------------------------------------------- item 1
def test_newline_history_prompt_ids_equal_llamafactory_and_training(processor):
    from slidechat.data.template import encode_qwen2vl, render_qwen2vl_prompt
    from slidechat.inference.loop import _Qwen2VLText
    from slidechat.model.constants import IGNORE_INDEX

    tok = processor.tokenizer
    msgs = _msgs(Q1, A1, Q2, A2, Q3, A3)
    lf_prompt, lf_label = lf_vllm_infer_row(tok, msgs)
    # the case matters: a joined string merges "assistant\n" + "\nYes" into one "\n\n" token
    joined = tok(render_qwen2vl_prompt(msgs), add_special_tokens=False)["input_ids"]
    assert joined != lf_prompt and len(joined) < len(lf_prompt)
    nl = tok.encode("\n", add_special_tokens=False)[0]
    i_yes = len(lf_slots(tok, msgs)[0])  # first id of the first history answer's slot
    assert lf_prompt[i_yes - 1:i_yes + 1] == [nl, nl]  # LF: "assistant\n" then "\nYes" ([198, 198] in Qwen)
    # inference (slidechat infer / chat --image) gives LF's ids
    item = _item({"messages": msgs, "images": ["x.png"]})
    _Qwen2VLText(tok).render(item)
    assert item.prompt_ids == lf_prompt and not item.truncated
    assert item.prompt == tok.decode(lf_prompt, skip_special_tokens=True)
    assert item.label == tok.decode(lf_label, skip_special_tokens=True) == A3 + "\n"
    # ... and so does the training encoding of the same row, minus the final answer (one pad per image)
    train_ids, train_labels = encode_qwen2vl(tok, msgs, image_seqlens=[1])
    assert train_ids[:len(lf_prompt)] == lf_prompt and train_ids[len(lf_prompt):] == lf_label
    assert train_labels[len(lf_prompt):] == lf_label
    assert [train_labels[i] for i in range(i_yes)] == [IGNORE_INDEX] * i_yes
    # with the image expanded to N pads as the processor does, training and generation inputs agree
    train_ids6, _ = encode_qwen2vl(tok, msgs, image_seqlens=[6])
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    k = lf_prompt.index(pad)
    assert train_ids6[:len(lf_prompt) + 5] == lf_prompt[:k] + [pad] * 6 + lf_prompt[k + 1:]


def test_generation_batch_expands_images_like_the_processor(processor, dataset):
    """Prompt ids -> the batch ``processor(text=..., images=...)`` gives for the same prompt: the image pad
    repeated t*h*w/merge² times (from the processor's own image_grid_thw), left padding, same pixels."""
    import torch
    from PIL import Image

    from slidechat.data.images import load_image
    from slidechat.data.template import render_qwen2vl_prompt
    from slidechat.data.qwen2vl_batch import prepare_generation_batch

    tok = processor.tokenizer
    rows = dataset["rows"]
    texts, ids_rows, images = [], [], []
    for r in rows[1:]:  # single-turn rows: the joined text tokenizes like the slots
        msgs = r["messages"]
        texts.append(render_qwen2vl_prompt(msgs))
        ids_rows.append(lf_vllm_infer_row(tok, msgs)[0])
        images.append([load_image(dataset["dir"] / r["images"][0])])
    assert all(tok(t, add_special_tokens=False)["input_ids"] == i for t, i in zip(texts, ids_rows))
    new = prepare_generation_batch(processor, ids_rows, images)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        ref = processor(text=texts, images=[im for ims in images for im in ims], padding=True,
                        return_tensors="pt")
    finally:
        tok.padding_side = side
    assert set(new.keys()) == set(ref.keys())
    for key in ref:
        assert torch.equal(new[key], ref[key]), key
    # the multi-turn row: the pads expanded in place, nothing else changed
    msgs = rows[0]["messages"]
    lf_prompt = lf_vllm_infer_row(tok, msgs)[0]
    im = [Image.open(dataset["dir"] / rows[0]["images"][0])]
    b = prepare_generation_batch(processor, [lf_prompt], [im])
    n = int(b["image_grid_thw"].prod(-1).item()) // processor.image_processor.merge_size ** 2
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    k = lf_prompt.index(pad)
    assert b["input_ids"][0].tolist() == lf_prompt[:k] + [pad] * n + lf_prompt[k + 1:]


def test_a_prepared_image_is_not_scaled_again(processor):
    """An image read through ``prepare_image`` reaches the processor as it is; a raw PIL image of the
    same pixels still gets LLaMA-Factory's scaling in the batch builder (today's path, unchanged)."""
    import torch
    from PIL import Image

    from slidechat.data.images import PreparedImage, prepare_image, scale_image
    from slidechat.data.qwen2vl_batch import prepare_generation_batch

    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids("<|image_pad|>")]
    big = Image.new("RGB", (120, 90), (200, 180, 190))
    limits = dict(image_max_pixels=56 * 56, image_min_pixels=32 * 32)
    raw = prepare_generation_batch(processor, [ids], [[big]], **limits)
    kept = prepare_generation_batch(processor, [ids], [[PreparedImage(big)]], **limits)
    ref = processor.image_processor(images=[big], return_tensors="pt")
    assert torch.equal(kept["image_grid_thw"], ref["image_grid_thw"])  # not shrunk to 56x56 pixels
    assert not torch.equal(raw["image_grid_thw"], kept["image_grid_thw"])
    once = prepare_image(big, 56 * 56, 32 * 32)
    assert once.size == scale_image(big, 56 * 56, 32 * 32).size and prepare_image(once) is once
    assert torch.equal(prepare_generation_batch(processor, [ids], [[once]], **limits)["pixel_values"],
                       raw["pixel_values"])


def _run(model_dir, dataset, out, *extra) -> int:
    from slidechat.cli.main import main

    return main(["infer", "--model_name_or_path", str(model_dir), "--dataset", "rows", "--dataset_dir",
                 str(dataset["dir"]), "--template", "qwen2_vl", "--save_name", str(out), "--temperature", "0",
                 "--max_new_tokens", "4", "--no_progress", *extra])


def test_infer_writes_llamafactory_prompt_and_label(model_dir, dataset, processor, tmp_path):
    out = tmp_path / "p.jsonl"
    assert _run(model_dir, dataset, out, "--batch_size", "3") == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    tok = processor.tokenizer
    for line, row in zip(lines, dataset["rows"]):
        p, lab = lf_vllm_infer_row(tok, row["messages"])
        assert "error" not in line
        assert line["prompt"] == tok.decode(p, skip_special_tokens=True)
        assert line["label"] == tok.decode(lab, skip_special_tokens=True)
    assert lines[0]["prompt"].startswith(f"system\n{LF_DEFAULT_SYSTEM}\nuser\nIs this field abnormal?\n"
                                         f"assistant\n\nYes\nuser\n")


def test_chat_session_history_encoded_by_slots(model_dir, dataset, processor):
    """``chat --image``: a history answer with a leading newline is its own slot in the next prompt."""
    from slidechat.apps.chat import ImageChatSession
    from slidechat.model.qwen2vl import load_qwen2vl

    model, proc = load_qwen2vl(model_dir)
    img = dataset["dir"] / "imgs" / "f0.png"
    session = ImageChatSession(model, proc, img, max_new_tokens=2)
    session.history = [("Is this field abnormal?", A1)]
    item = session._item("Which cells?")
    msgs = _msgs("<image>Is this field abnormal?", A1, "Which cells?", "")
    lf_prompt = lf_vllm_infer_row(proc.tokenizer, msgs)[0]
    assert item.prompt_ids == lf_prompt
    # and these ids (image pad expanded) are what model.generate receives
    seen = []
    real = model.generate

    def spy(**kw):
        seen.append(kw["input_ids"][0].tolist())
        return real(**kw)

    model.generate = spy
    session.ask("Which cells?")
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    k = lf_prompt.index(pad)
    n = seen[0].count(pad)
    assert n > 1 and seen[0] == lf_prompt[:k] + [pad] * n + lf_prompt[k + 1:]


# ----------------------------------------------------------------------------------------------- item 4
def test_cutoff_len_truncates_prompt_and_label_as_vllm_infer(model_dir, dataset, processor, tmp_path):
    tok = processor.tokenizer
    row = dataset["rows"][1]
    full_p, full_l = lf_vllm_infer_row(tok, row["messages"], cutoff_len=10 ** 9)
    cutoff = 2 * len(full_p) + 10  # prompt*2 < cutoff <= label*2: the label is cut, not the prompt
    assert len(full_p) * 2 < cutoff <= len(full_l) * 2
    out = tmp_path / "c.jsonl"
    assert _run(model_dir, dataset, out, "--cutoff_len", str(cutoff), "--max_samples", "2") == 0
    line = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()][1]
    p, lab = lf_vllm_infer_row(tok, row["messages"], cutoff_len=cutoff)
    assert len(lab) == cutoff - len(full_p) < len(full_l) and p == full_p
    assert "error" not in line and line["predict"]
    assert line["label"] == tok.decode(lab, skip_special_tokens=True) != row["messages"][1]["content"] + "\n"
    assert line["prompt"] == tok.decode(p, skip_special_tokens=True)
    # both halves over cutoff/2: both cut by LF's proportional rule; prompt keeps its first source_len ids
    from slidechat.inference.loop import _Qwen2VLText

    long_q = "<image>" + "Please look at the dark cells " * 12
    r = {"messages": _msgs(long_q, row["messages"][1]["content"]), "images": ["x.png"]}
    full_p2, full_l2 = lf_vllm_infer_row(tok, r["messages"], cutoff_len=10 ** 9)
    cutoff2 = min(len(full_p2), len(full_l2)) + 10
    assert 2 * len(full_p2) >= cutoff2 and 2 * len(full_l2) >= cutoff2
    item = _item(r)
    _Qwen2VLText(tok, cutoff_len=cutoff2).render(item)
    p2, l2 = lf_vllm_infer_row(tok, r["messages"], cutoff_len=cutoff2)
    assert item.truncated and item.prompt_ids == p2 == full_p2[:len(p2)] and len(p2) < len(full_p2)
    assert item.label == tok.decode(l2, skip_special_tokens=True)
    assert len(p2) + len(l2) == cutoff2


# ----------------------------------------------------------------------------------------------- item 7
def test_vllm_infer_flags_accepted_with_llamafactory_defaults(model_dir, dataset, tmp_path, caplog):
    import argparse

    from slidechat.cli import infer as infer_cli

    parser = argparse.ArgumentParser()
    infer_cli.register(parser.add_subparsers())
    args = parser.parse_args(["infer", "--model_name_or_path", "m"])
    # scripts/vllm_infer.py defaults (5afa851): pipeline_parallel_size=1, enable_thinking=True,
    # video_fps=2.0, video_maxlen=128
    assert (args.pipeline_parallel_size, args.enable_thinking, args.video_fps, args.video_maxlen) == \
        (1, True, 2.0, 128)
    out = tmp_path / "f.jsonl"
    assert _run(model_dir, dataset, out, "--max_samples", "1", "--pipeline_parallel_size", "1",
                "--enable_thinking", "false", "--video_fps", "1.5", "--video_maxlen", "64") == 0
    ref = tmp_path / "r.jsonl"
    assert _run(model_dir, dataset, ref, "--max_samples", "1") == 0
    assert out.read_bytes() == ref.read_bytes()  # qwen2_vl is no reasoning template: no effect
    caplog.set_level(logging.ERROR)
    assert _run(model_dir, dataset, tmp_path / "pp.jsonl", "--pipeline_parallel_size", "2") == 1
    assert "transformers engine runs on one device" in caplog.text and "--engine vllm" in caplog.text
    assert not (tmp_path / "pp.jsonl").exists()
    help_text = parser._subparsers._group_actions[0].choices["infer"].format_help()
    assert "no effect with qwen2_vl" in " ".join(help_text.split())


# ----------------------------------------------------------------------------------------------- item 8
def test_stop_ids_follow_llamafactory_and_vllm(processor, model_dir):
    from transformers import GenerationConfig

    from slidechat.data.template import template_stop_token_ids
    from slidechat.inference.loop import Qwen2VLFamily, SamplingSettings, stop_token_ids

    tok = processor.tokenizer
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    # Template.get_stop_token_ids after fix_special_tokens (replace_eos: eos := stop_words[0])
    lf_template = {tok.convert_tokens_to_ids(LF_STOP_WORDS[0])} | {tok.convert_tokens_to_ids(w)
                                                                   for w in LF_STOP_WORDS}
    assert set(template_stop_token_ids(tok)) == lf_template == {im_end}

    def vllm_rule(gen_eos) -> set:  # + the model's eos + generation_config.eos_token_id (vLLM)
        extra = [] if gen_eos is None else ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        return lf_template | {tok.eos_token_id} | set(extra)

    for gen_eos in (None, im_end, [im_end, eot]):
        cfg = None if gen_eos is None else GenerationConfig(eos_token_id=gen_eos)
        assert set(stop_token_ids(tok, cfg)) == vllm_rule(gen_eos)
    assert eot not in stop_token_ids(tok, GenerationConfig(eos_token_id=im_end))  # never added by itself
    # the transformers engine reads the model's generation config (the tiny model's lists both)
    from slidechat.model.qwen2vl import load_qwen2vl

    model, proc = load_qwen2vl(model_dir)
    fam = Qwen2VLFamily(model, proc, SamplingSettings(temperature=0))
    assert set(fam.stop_ids) == vllm_rule(model.generation_config.eos_token_id) == {im_end, eot}
    model.generation_config.eos_token_id = im_end
    assert set(Qwen2VLFamily(model, proc, SamplingSettings(temperature=0)).stop_ids) == {im_end}
