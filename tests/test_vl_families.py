"""The three Qwen VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) as registry entries of one engine.

Each family: a tiny random model built by ``tools/make_tiny_qwen2vl.py --arch``, trained a few steps with
the stock ``xtuner train`` (tiny cytology configs, the model path alone selecting the family), exported and
answered with ``slidechat infer``; LLaMA-Factory's template encoding; boxes through the family's own
processor resize. Expectations come from the references: transformers' processors (grids, factors),
LLaMA-Factory's ``data/template.py`` (written out below), the box conventions of
:mod:`slidechat.evaluation.boxes` checked against the processors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Optional
from unittest import mock

import numpy as np
import pytest
import torch

from train_data import field, mcq_field_dataset

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SFT = REPO / "configs/tiny/cytochat_sft.py"
LORA = REPO / "configs/tiny/cytochat_lora.py"

# LLaMA-Factory's slots (data/template.py): qwen2_vl and qwen3_vl share them; qwen2_vl has a default system
# prompt, qwen3_vl none and is a ReasoningTemplate with thought words ("<think>\n", "\n</think>\n\n")
LF_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
LF_ASSISTANT = "{content}<|im_end|>\n"
LF_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
LF_DEFAULT_SYSTEM = {"qwen2_vl": "You are a helpful assistant.", "qwen3_vl": ""}
LF_THOUGHT = ("<think>\n", "\n</think>\n\n")
LF_TEMPLATE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl"}


def _tiny(root: Path, arch: str, *extra: str) -> Path:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_tiny_qwen2vl as tool
    finally:
        sys.path.pop(0)
    out = root / f"tiny_{arch}"
    assert tool.main(["--arch", arch, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl_families")
    return {arch: _tiny(root, arch) for arch in ARCHS}


# --------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("arch", ARCHS)
def test_family_is_detected_from_the_folder_and_matches_its_processor(tinies, arch):
    import transformers

    from slidechat.evaluation.boxes import BOX_FORMATS, RESIZE_RULES
    from slidechat.model.qwen2vl import family_of, load_qwen2vl, read_family

    folder, fam = read_family(tinies[arch])
    assert fam.model_type == arch == json.loads((folder / "config.json").read_text())["model_type"]
    model, proc = load_qwen2vl(folder)
    assert type(model) is getattr(transformers, fam.model_class)
    assert type(proc) is getattr(transformers, fam.processor_class)
    assert family_of(model) is fam and family_of(proc) is fam
    ip = proc.image_processor
    assert fam.factor == ip.patch_size * ip.merge_size == {"qwen3_vl": 32}.get(arch, 28)
    assert fam.factor == model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    assert fam.box_format in BOX_FORMATS and RESIZE_RULES[fam.box_format].factor == fam.factor
    assert fam.lf_template == LF_TEMPLATE[arch]


def test_unknown_folders_and_bad_sizes_are_one_line_errors(tmp_path):
    from slidechat.model.qwen2vl import read_family
    from slidechat.utils.errors import SlideChatError

    other = tmp_path / "llava"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(SlideChatError, match=r"llava: not a Qwen2-VL model \(model_type 'llava', expected one of "
                                             r"qwen2_vl, qwen2_5_vl, qwen3_vl\)"):
        read_family(other)
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_tiny_qwen2vl as tool
    finally:
        sys.path.pop(0)
    assert tool.main(["--out", str(tmp_path / "x"), "--vocab-size", "10"]) == 2  # smaller than the tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_size_flags_set_the_config_fields_and_keep_the_tokenizer_tiny(tmp_path, arch):
    from transformers import AutoConfig, AutoTokenizer

    out = _tiny(tmp_path, arch, "--vocab-size", "1024", "--hidden-size", "48", "--num-layers", "3",
                "--num-heads", "4", "--num-kv-heads", "1", "--intermediate-size", "96", "--vision-depth", "3",
                "--vision-embed-dim", "40", "--vision-heads", "5")
    cfg = AutoConfig.from_pretrained(str(out))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (1024, 48, 3, 4, 1, 96)
    assert (v.depth, v.num_heads) == (3, 5)
    # the vision width is embed_dim in Qwen2-VL's vision config, hidden_size in the later two
    assert (v.embed_dim if arch == "qwen2_vl" else v.hidden_size) == 40
    assert len(AutoTokenizer.from_pretrained(str(out))) < 400


# --------------------------------------------------------------------------------------------- training + infer
def _data(root: Path) -> Path:
    return mcq_field_dataset(root, 4)


def _xtuner_train(config: Path, work_dir: Path, options: List[str], command: bool = False) -> None:
    """xtuner's own train script; ``command``: through the stock ``xtuner train`` command in a subprocess
    (it exits 0 even on failure, so success is judged by the checkpoint), else its ``main`` in-process
    (the same code without the launcher's interpreter start-up)."""
    argv = [str(config), "--work-dir", str(work_dir), "--cfg-options", *options,
            f"experiment_name=test_{uuid.uuid4().hex[:8]}"]
    if command:
        bin_dir = Path(sys.executable).parent
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        proc = subprocess.run([str(bin_dir / "xtuner"), "train", *argv], cwd=str(REPO), env=env,
                              capture_output=True, text=True, timeout=600)
        assert list(work_dir.glob("epoch_*.pth")), proc.stdout[-3000:] + proc.stderr[-3000:]
        return
    from xtuner.tools import train

    with mock.patch.object(sys, "argv", ["train.py", *argv]):
        train.main()


def _losses(work_dir: Path) -> List[float]:
    scal = list(work_dir.glob("*/vis_data/scalars.json"))
    assert len(scal) == 1, scal
    return [json.loads(x)["loss"] for x in scal[0].read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_trains_with_xtuner_and_answers_with_slidechat_infer(tmp_path, tinies, arch):
    from slidechat.cli.main import main
    from slidechat.model.constants import IGNORE_INDEX
    from slidechat.model.qwen2vl import FAMILIES

    fam = FAMILIES[arch]
    data = _data(tmp_path)
    tiny = tinies[arch]
    opts = [f"model.model_name_or_path={tiny}", f"train_dataloader.dataset.processor={tiny}",
            f"train_dataloader.dataset.dataset_dir={data}", "train_dataloader.dataset.dataset=tiny_train",
            "train_cfg.max_epochs=2", "param_scheduler.1.end=2"]
    # the model path alone selects the family: the dataset's template is the family's LF template
    from slidechat.data.cytology_dataset import CytologySFTDataset

    ds = CytologySFTDataset("tiny_train", str(tiny), data, image_max_pixels=224 * 224)
    assert ds.template.name == fam.lf_template
    item = ds[0]
    answer = ds.tokenizer.decode(item["input_ids"][item["labels"] != IGNORE_INDEX])
    thought = "".join(LF_THOUGHT) if arch == "qwen3_vl" else ""
    assert answer == thought + "A.None.<|im_end|>\n"
    # full fine-tune and LoRA, stock xtuner train
    _xtuner_train(SFT, tmp_path / "sft", opts, command=True)  # the stock command, per family
    _xtuner_train(LORA, tmp_path / "lora", opts)
    for wd in ("sft", "lora"):
        losses = _losses(tmp_path / wd)
        assert losses and all(np.isfinite(losses)), (wd, losses)
    sd = torch.load(tmp_path / "sft" / "epoch_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert sd and not any(k.startswith("model.visual.") for k in sd)  # tower and merger frozen by default
    lora_sd = torch.load(tmp_path / "lora" / "epoch_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert lora_sd and all("lora_" in k and k.startswith("model.language_model.") for k in lora_sd)
    # export, then slidechat infer on the exported folder (template from the folder's family)
    export = tmp_path / "export"
    assert main(["export", str(SFT), "--checkpoint", str(tmp_path / "sft"), "--out", str(export),
                 "--cfg-options", *opts[:4]]) == 0
    out = tmp_path / "pred.jsonl"
    assert main(["infer", "--model_name_or_path", str(export), "--dataset", "tiny_train", "--dataset_dir",
                 str(data), "--save_name", str(out), "--max_new_tokens", "4", "--temperature", "0",
                 "--no_progress"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all("predict" in r and "error" not in r for r in rows)
    # prompt and label as vllm_infer decodes LLaMA-Factory's encode_oneturn of the family's template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export))
    row0 = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    prompt, response = _lf_oneturn(tok, row0["messages"], fam.lf_template)
    assert rows[0]["prompt"] == tok.decode(prompt, skip_special_tokens=True)
    assert rows[0]["label"] == tok.decode(response, skip_special_tokens=True)
    assert ("You are a helpful assistant." in rows[0]["prompt"]) == (arch != "qwen3_vl")


# --------------------------------------------------------------------------------------------- LF template
def _msgs(*texts: str) -> List[Dict[str, str]]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


def _lf_remove_thought(content: str) -> str:
    """``Template.remove_thought`` of LLaMA-Factory, written out."""
    pattern = re.compile(f"{re.escape(LF_THOUGHT[0])}(.*?){re.escape(LF_THOUGHT[1])}", re.DOTALL)
    return re.sub(pattern, "", content).lstrip("\n")


def _lf_slots(tok, messages, template: str, seqlens: Optional[List[int]] = None) -> List[List[int]]:
    """``Template._encode``: each slot string encoded on its own; ``<image>`` expanded (``seqlens``) or one pad."""
    system = LF_DEFAULT_SYSTEM[template]
    out, k = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        while "<image>" in content:
            n = 1 if seqlens is None else seqlens[k]
            content = content.replace("<image>", "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>", 1)
            k += 1
        elements = [LF_SYSTEM.format(content=system)] if i == 0 and system else []
        elements.append((LF_USER if m["role"] == "user" else LF_ASSISTANT).format(content=content))
        ids: List[int] = []
        for el in elements:
            ids += tok.encode(el, add_special_tokens=False)
        out.append(ids)
    return out


def _has_thought(content: str) -> bool:
    return LF_THOUGHT[0].strip() in content or LF_THOUGHT[1].strip() in content


def _lf_train(tok, messages, template: str, seqlens: List[int], enable_thinking: bool = True):
    """Supervised processor on ``encode_multiturn`` (mask_history False). ReasoningTemplate: with
    enable_thinking False every thought is removed first; then an answer without thought words gets the
    empty thought ids before it (with loss), or, without thinking, after its prompt (no loss)."""
    messages = [dict(m) for m in messages]
    if template == "qwen3_vl" and not enable_thinking:
        for i in range(1, len(messages), 2):
            messages[i]["content"] = _lf_remove_thought(messages[i]["content"])
    enc = _lf_slots(tok, messages, template, seqlens)
    if template == "qwen3_vl":
        thought = tok.encode("".join(LF_THOUGHT), add_special_tokens=False)
        for i in range(0, len(enc), 2):
            if not _has_thought(messages[i + 1]["content"]):
                if enable_thinking:
                    enc[i + 1] = thought + enc[i + 1]
                else:
                    enc[i] = enc[i] + thought
    ids, labels = [], []
    for src, tgt in zip(enc[0::2], enc[1::2]):
        ids += src + tgt
        labels += [-100] * len(src) + tgt
    return ids, labels


def _lf_oneturn(tok, messages, template: str, enable_thinking: bool = True):
    """``encode_oneturn`` (vllm_infer's prompt, one pad per image): ReasoningTemplate drops thoughts from
    history answers (``remove_thought``, preserve_thinking False), from the answer too without thinking,
    and puts the empty thought in the response (or, without thinking, at the end of the prompt)."""
    messages = [dict(m) for m in messages]
    if template == "qwen3_vl":
        for i in range(1, len(messages) - 2, 2):
            messages[i]["content"] = _lf_remove_thought(messages[i]["content"])
        if not enable_thinking:
            messages[-1]["content"] = _lf_remove_thought(messages[-1]["content"])
    enc = _lf_slots(tok, messages, template)
    prompt, response = [t for ids in enc[:-1] for t in ids], enc[-1]
    if template == "qwen3_vl" and not _has_thought(messages[-1]["content"]):
        thought = tok.encode("".join(LF_THOUGHT), add_special_tokens=False)
        if enable_thinking:
            response = thought + response
        else:
            prompt = prompt + thought
    return prompt, response


@pytest.mark.parametrize("arch,thinking", [(a, True) for a in ARCHS] + [("qwen3_vl", False)])
def test_lf_template_encoding_per_family(tinies, arch, thinking):
    import dataclasses

    from transformers import AutoProcessor

    from slidechat.data.template import (encode_qwen2vl, encode_qwen2vl_prompt, get_vision_template,
                                         render_qwen2vl_prompt)
    from slidechat.model.qwen2vl import family_of

    proc = AutoProcessor.from_pretrained(str(tinies[arch]))
    tok = proc.tokenizer
    name = family_of(proc).lf_template
    assert name == LF_TEMPLATE[arch]
    template = dataclasses.replace(get_vision_template(name), enable_thinking=thinking)
    # history answers starting with newlines (and answers carrying a thought) are the cases that differ
    msgs = _msgs("<image>Is this field abnormal?", "\nYes", "Which cells?", "\n\nDark ones.",
                 "Anything else?", "<think>\nlook again\n</think>\n\nNo.", "Sure?", "Yes.")
    ids, labels = encode_qwen2vl(tok, msgs, image_seqlens=[6], template=template)
    assert (ids, labels) == _lf_train(tok, msgs, name, [6], thinking)
    for last in ("Yes.", "\n<think>\nhm\n</think>\n\nYes."):
        rows = msgs[:-1] + [{"role": "assistant", "content": last}]
        enc = encode_qwen2vl_prompt(tok, rows[:-1], last, template=template)
        assert (enc.prompt_ids, enc.label_ids) == _lf_oneturn(tok, rows, name, thinking), last
    # the rendered single-turn prompt string tokenizes to the slot-by-slot ids
    one = _msgs("<image>Locate all dark nuclei.", "None.")
    if thinking:
        text = render_qwen2vl_prompt(one, template=template)
        assert tok(text, add_special_tokens=False)["input_ids"] == _lf_oneturn(tok, one, name)[0]


# --------------------------------------------------------------------------------------------- boxes
SIZES = [(80, 56), (224, 224), (1000, 300), (300, 1200), (2000, 1500), (40, 900), (33, 29), (5000, 60)]


@pytest.mark.parametrize("arch", ARCHS)
def test_boxes_round_trip_through_the_family_processor_resize(tinies, arch):
    from PIL import Image
    from transformers import AutoProcessor

    from slidechat.data.images import scale_image
    from slidechat.evaluation.boxes import from_pixels, model_input_size, processor_resize_kwargs, to_pixels
    from slidechat.evaluation.regions import Region
    from slidechat.model.qwen2vl import family_of

    proc = AutoProcessor.from_pretrained(str(tinies[arch]))
    fam = family_of(proc)
    ip = proc.image_processor
    patch = ip.patch_size
    resize = processor_resize_kwargs(proc)
    for w, h in SIZES:
        scaled = scale_image(Image.new("RGB", (w, h), (200, 180, 190)))
        grid = ip(images=[scaled], return_tensors="pt")["image_grid_thw"][0].tolist()
        seen = (grid[2] * patch, grid[1] * patch)  # (width, height) the model sees, from the processor itself
        assert model_input_size((w, h), fam.box_format, **resize) == seen, (w, h)
        regions = [Region("hsil", 0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h), Region("lsil", 0, 0, w, h)]
        back = to_pixels(from_pixels(regions, fam.box_format, (w, h), **resize), fam.box_format, (w, h), **resize)
        assert not back.malformed and len(back.boxes) == 2
        # integer coordinates: half a unit of the written scale (0-1000 relative, or model-input pixels)
        if fam.box_format == "qwen2_5_vl":
            tol_x, tol_y = 0.5 * w / seen[0] + 1e-9, 0.5 * h / seen[1] + 1e-9
        else:
            tol_x, tol_y = 0.5 / 1000 * w + 1e-9, 0.5 / 1000 * h + 1e-9
        for a, b in zip(regions, back.boxes):
            assert a.label == b.label
            assert abs(a.x1 - b.x1) <= tol_x and abs(a.x2 - b.x2) <= tol_x
            assert abs(a.y1 - b.y1) <= tol_y and abs(a.y2 - b.y2) <= tol_y


# --------------------------------------------------------------------------------------------- chat, screen
@pytest.mark.parametrize("arch", ARCHS)
def test_chat_image_and_the_screening_scorer_run_on_each_family(tinies, arch, tmp_path):
    from PIL import Image

    from slidechat.apps.chat import ImageChatSession, load_image_chat_model
    from slidechat.apps.screening import ScreenOptions
    from slidechat.inference.field_scorer import FieldModel

    model, proc = load_image_chat_model(tinies[arch], device="cpu")
    img = field(tmp_path / "f.png", 0, 1)
    chat = ImageChatSession(model, proc, img, max_new_tokens=3)
    assert isinstance(chat.ask("Locate all dark nuclei."), str) and len(chat.history) == 1
    nxt = chat.prompt_text("Any more?")
    assert nxt.count("<|vision_start|>") == 1 and nxt.endswith("<|im_start|>assistant\n")
    assert ("You are a helpful assistant." in nxt) == (arch != "qwen3_vl")
    scorer = FieldModel(tinies[arch], opts=ScreenOptions(batch_size=2, progress=False), model=model,
                        processor=proc)
    # LLaMA-Factory's qwen3_vl trains every answer after the empty thought: the option is scored after it
    assert scorer.prompt_text.endswith("".join(LF_THOUGHT) if arch == "qwen3_vl" else "assistant\n")
    images = [Image.open(img).convert("RGB"), Image.new("RGB", (120, 90), (210, 190, 200))]
    probs, mass = scorer.option_probs(images)
    assert probs.shape == (2, len(scorer.opts.options))
    # probabilities over the options: rows sum to 1 up to float32 rounding of a 2-term softmax
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6) and np.all((mass > 0) & (mass <= 1 + 1e-6))


@pytest.mark.parametrize("arch", ARCHS)
def test_pixels_are_llamafactorys(tinies, arch, tmp_path):
    """LLaMA-Factory loads the processor with ``AutoProcessor.from_pretrained(path, use_fast=True)``
    (``use_fast_tokenizer``, default True) and feeds its image processor the images after its own PIL
    scaling (``mm_plugin._preprocess_image``, :func:`slidechat.data.images.scale_image`): the dataset's
    pixel values must be exactly those."""
    from PIL import Image
    from transformers import AutoProcessor

    from slidechat.data.cytology_dataset import CytologySFTDataset
    from slidechat.data.images import scale_image

    data = _data(tmp_path)
    ds = CytologySFTDataset("tiny_train", str(tinies[arch]), data, image_max_pixels=64 * 64)
    lf = AutoProcessor.from_pretrained(str(tinies[arch]), use_fast=True)
    assert type(ds.processor.image_processor) is type(lf.image_processor)
    img = scale_image(Image.open(data / "images" / "f0.png"), 64 * 64, 32 * 32)
    ref = lf.image_processor(images=[img], return_tensors="pt")
    item = ds[0]
    assert torch.equal(item["pixel_values"], ref["pixel_values"])
    assert torch.equal(item["image_grid_thw"], ref["image_grid_thw"])
