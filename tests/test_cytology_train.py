"""Tiny Qwen2-VL trained through xtuner's own ``train`` entry point (full fine-tune and LoRA, CPU),
resume, strict checkpoint loading, and export to a plain Hugging Face folder.

The LoRA run is the real ``xtuner train`` command in a subprocess. ``xtuner train CONFIG ...`` runs
``xtuner.tools.train.main``; the full fine-tune and resume runs call that in-process (same code, without
paying the import cost per run, and with errors raised as exceptions), as tests/test_train.py does.
"""

import glob
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from slidechat.model.checkpoint import resolve_checkpoint
from slidechat.utils.errors import SlideChatError
from tolerances import FP32_RTOL, assert_close_rel, assert_differs_rel
from train_data import cyto_train_data

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "configs/tiny/cytochat_sft.py"
LORA = REPO / "configs/tiny/cytochat_lora.py"
EPOCHS = 8


def xtuner_train(config, work_dir, options, extra=()):
    from xtuner.tools import train

    argv = ["train.py", str(config), "--work-dir", str(work_dir), *extra,
            "--cfg-options", *options, f"experiment_name=test_{uuid.uuid4().hex[:8]}"]
    with mock.patch.object(sys, "argv", argv):
        train.main()


def losses(work_dir):
    scal = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    assert len(scal) == 1, scal
    rows = [json.loads(line) for line in Path(scal[0]).read_text().splitlines() if line.strip()]
    log = Path(glob.glob(os.path.join(work_dir, "*", "*.log"))[0]).read_text()
    return [r for r in rows if "loss" in r], log


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return cyto_train_data(tmp_path_factory.mktemp("cyto_train"), EPOCHS)


@pytest.fixture(scope="module")
def sft(setup):
    wd = setup["root"] / "sft"
    xtuner_train(SFT, wd, setup["opts"])
    return wd


@pytest.fixture(scope="module")
def lora(setup):
    """The LoRA run goes through the real ``xtuner train`` command in a subprocess (its launcher runs
    ``python xtuner/tools/train.py``; it exits 0 even on failure, so success is judged by the outputs)."""
    wd = setup["root"] / "lora"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    xtuner = Path(sys.executable).parent / "xtuner"
    proc = subprocess.run([str(xtuner), "train", str(LORA), "--work-dir", str(wd), "--cfg-options",
                           *setup["opts"], f"experiment_name=test_{uuid.uuid4().hex[:8]}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert (wd / f"epoch_{EPOCHS}.pth").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return wd


def _ckpt(wd, epoch=EPOCHS):
    return torch.load(Path(wd) / f"epoch_{epoch}.pth", map_location="cpu", weights_only=False)


def _hf_weights(folder):
    """A folder's weights under the names the loaded model gives them (transformers 5 writes Qwen2-VL
    files in the 4.48 layout, ``model.layers.*`` / ``visual.*``, and renames them on loading)."""
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(str(folder)).state_dict()


def _epoch_means(rows, per_epoch):
    vals = [r["loss"] for r in rows]
    return [float(np.mean(vals[i:i + per_epoch])) for i in range(0, len(vals), per_epoch)]


def test_full_finetune_learns_and_saves_only_trained_weights(setup, sft):
    rows, log = losses(sft)
    assert len(rows) == EPOCHS * 3  # 6 rows, batch 2
    means = _epoch_means(rows, 3)
    assert means[-1] < 0.5 * means[0], means
    sd = _ckpt(sft)["state_dict"]
    base = _hf_weights(setup["tiny"])
    # vision tower and merger frozen (LLaMA-Factory's defaults): not saved; the LLM and head are
    assert not any(k.startswith("model.visual.") for k in sd)
    assert set(sd) == {k for k in base if not k.startswith("model.visual.")}
    changed = [k for k in sd if not torch.equal(sd[k], base[k])]
    assert len(changed) > 0.9 * len(sd)


def test_lora_learns_and_saves_only_adapters(setup, lora):
    rows, _ = losses(lora)
    means = _epoch_means(rows, 3)
    assert means[-1] < 0.5 * means[0], means
    sd = _ckpt(lora)["state_dict"]
    assert sd and all(("lora_A" in k or "lora_B" in k) for k in sd)
    assert all(k.startswith("model.language_model.layers.") for k in sd)  # language model only
    names = {k.split(".")[-4] for k in sd}  # model.language_model.layers.N.self_attn.q_proj.lora_A.default.weight
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_export_full_reloads_with_identical_logits_and_frozen_vision(setup, sft, tmp_path):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from slidechat.data.cytology_dataset import CytologySFTDataset, qwen2vl_collate_fn
    from slidechat.engine.qwen2vl_train import build_qwen2vl_from_config, export_qwen2vl

    opts = dict(o.split("=", 1) for o in setup["opts"][:4])
    out = export_qwen2vl(SFT, resolve_checkpoint(sft), tmp_path / "hf", cfg_options=opts)
    exported = _hf_weights(out)
    base = _hf_weights(setup["tiny"])
    for k in base:  # frozen vision tower identical, everything trained equals the checkpoint
        if k.startswith("model.visual."):
            assert torch.equal(exported[k], base[k]), k
    sd = _ckpt(sft)["state_dict"]
    for k, v in sd.items():
        assert torch.equal(exported[k], v), k
    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(out)).eval()
    proc = AutoProcessor.from_pretrained(str(out))
    assert type(proc).__name__ == "Qwen2VLProcessor"
    trained = build_qwen2vl_from_config(SFT, resolve_checkpoint(sft), cfg_options=opts)
    ds = CytologySFTDataset("tiny_train", proc, setup["data"], image_max_pixels=224 * 224)
    batch = qwen2vl_collate_fn([ds[0], ds[1]])["data"]
    with torch.no_grad():
        a = trained(batch, mode="tensor")
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        # transformers 5: the token types the processor returns beside input_ids (text 0, image 1)
        inputs["mm_token_type_ids"] = (batch["input_ids"] == proc.image_token_id).int()
        b = hf(**inputs).logits
        # every training forward gets the 3-D M-RoPE positions (transformers 4.48 alone only computed
        # them on a model's first call without position_ids, then fell back to 1-D positions)
        again = trained(batch, mode="tensor")
        mask = batch["attention_mask"]
        one_d = ((mask.cumsum(-1) - 1).clamp(min=0)).unsqueeze(0).expand(3, -1, -1)
        plain_1d = hf(**inputs, position_ids=one_d).logits
    # exact: the same weights through the same kernels on the same shapes in one process add in one order
    assert torch.equal(a, b) and torch.equal(a, again)
    # 1-D positions are a different function, not float noise (observed on 4.48: 0.56 of max|logit|)
    assert_differs_rel(plain_1d, b, 10 * FP32_RTOL, what="1-D positions vs M-RoPE")


def test_export_lora_merges_adapters(setup, lora, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from slidechat.data.qwen2vl_batch import prepare_generation_batch
    from slidechat.model.qwen2vl import load_qwen2vl
    from slidechat.engine.qwen2vl_train import build_qwen2vl_from_config, export_qwen2vl

    from slidechat.cli.main import main

    opts = dict(o.split("=", 1) for o in setup["opts"][:4])
    out = tmp_path / "hf"  # through the CLI: `slidechat export CONFIG --checkpoint WORKDIR --out DIR`
    assert main(["export", str(LORA), "--checkpoint", str(lora), "--out", str(out),
                 "--cfg-options", *setup["opts"][:4]]) == 0
    foreign = tmp_path / "mine"  # a folder holding a user's file (not an export of ours) is refused
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SlideChatError, match="output folder exists and is not empty"):
        export_qwen2vl(LORA, resolve_checkpoint(lora), foreign, cfg_options=opts)
    exported = _hf_weights(out)
    base = _hf_weights(setup["tiny"])
    assert set(exported) == set(base)
    from safetensors.torch import load_file

    raw = load_file(str(out / "model.safetensors"))  # plain names in the file: no peft wrappers left
    assert len(raw) == len(base) and not any("lora_" in k or "base_layer" in k for k in raw)
    changed = {k for k in base if not torch.equal(exported[k], base[k])}
    assert changed and all(k.startswith("model.language_model.layers.") and k.endswith("proj.weight")
                           for k in changed)
    trained = build_qwen2vl_from_config(LORA, resolve_checkpoint(lora), cfg_options=opts)  # adapters unmerged
    model, proc = load_qwen2vl(out)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    from slidechat.data.llamafactory import read_llamafactory

    batch = prepare_generation_batch(proc, read_llamafactory("tiny_train", setup["data"])[:2],
                                     image_max_pixels=224 * 224)
    with torch.no_grad():
        a = trained(dict(batch), mode="tensor")
        b = model(**batch).logits
        base = load_qwen2vl(setup["tiny"])[0](**batch).logits
    # merged x(W + BA) vs unmerged xW + (xA)B: the merged weights are rounded to float32 once and every matmul
    # (K <= 64 here) sums in a kernel-chosen order: float noise of ~K * eps of max|logit| per layer. A fixed
    # atol=1e-5 failed on AVX-512 (1.31e-5 on logits of 6.5 = 2.0e-6 relative; 2.0e-6 measured here with 1 and
    # 2 threads); FP32_RTOL (1e-4) of max|logit| leaves 50x. Dropped or mis-scaled adapters move the logits by
    # O(1) of max|logit| (the trained adapters vs the base model: 1.2), which the second line proves.
    assert_close_rel(b, a, FP32_RTOL, what="merged export vs base + adapters")
    assert_differs_rel(base, a, 10 * FP32_RTOL, what="base model vs trained adapters")


def test_resume_continues_and_goes_through_the_strict_check(setup, sft, tmp_path):
    rows, _ = losses(sft)
    ckpt = Path(sft) / f"epoch_{EPOCHS - 1}.pth"
    wd = tmp_path / "resumed"
    xtuner_train(SFT, wd, setup["opts"], extra=("--resume", str(ckpt)))
    new_rows, log = losses(wd)
    assert "resumed" in log.lower() and ckpt.name in log
    assert [r["step"] for r in new_rows] == [3 * EPOCHS - 2, 3 * EPOCHS - 1, 3 * EPOCHS]
    old = {r["step"]: r["loss"] for r in rows}
    for r in new_rows:  # same process, threads and data order: float noise at most (observed: bit for bit)
        assert r["loss"] == pytest.approx(old[r["step"]], rel=1e-5)
    # a checkpoint lacking a trained tensor is refused on resume, naming what is missing
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    del ck["state_dict"]["model.language_model.layers.1.mlp.up_proj.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(ck, broken)
    with pytest.raises(SlideChatError, match=r"lacks required weights: 1 keys: model\.language_model"):
        xtuner_train(SFT, tmp_path / "broken_run", setup["opts"], extra=("--resume", str(broken)))


def test_strict_loading_of_checkpoints(setup, sft, lora, tmp_path):
    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel, build_qwen2vl_from_config

    opts = dict(o.split("=", 1) for o in setup["opts"][:4])
    # a LoRA checkpoint does not fit the full fine-tune model (lacks every trained LLM weight)
    with pytest.raises(SlideChatError, match=r"checkpoint holds none of the"):
        build_qwen2vl_from_config(SFT, resolve_checkpoint(Path(lora) / f"epoch_{EPOCHS}.pth"), cfg_options=opts)
    # load_state_dict (DeepSpeed resume / xtuner) is strict by default, and checks shapes always
    model = build_qwen2vl_from_config(SFT, resolve_checkpoint(sft), cfg_options=opts)
    sd = dict(_ckpt(sft)["state_dict"])
    sd["lm_head.weight"] = sd["lm_head.weight"][:-1]
    with pytest.raises(SlideChatError, match=r"do not fit the model: lm_head.weight"):
        model.load_state_dict(sd)
    sd = dict(_ckpt(sft)["state_dict"])
    model.load_state_dict({"module." + k: v for k, v in sd.items()})  # DeepSpeed's prefix is accepted
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)
    # pretrained_pth (a work dir here) goes through the same check; foreign weights are refused
    pre = Qwen2VLTrainModel(setup["tiny"], pretrained_pth=sft)
    for k, v in sd.items():
        assert torch.equal(pre.state_dict()[k], v)
    torch.save({"state_dict": {"projector.0.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pth")
    with pytest.raises(SlideChatError, match=r"foreign\.pth: .*unexpected 1 keys: projector\.0\)"):
        Qwen2VLTrainModel(setup["tiny"], pretrained_pth=tmp_path / "foreign.pth")


def test_dataset_items_and_collate(setup):
    from slidechat.data.cytology_dataset import CytologySFTDataset, qwen2vl_collate_fn
    from slidechat.model.constants import IGNORE_INDEX

    ds = CytologySFTDataset("tiny_train", str(setup["tiny"]), setup["data"], image_max_pixels=224 * 224)
    item = ds[0]
    tok = ds.tokenizer
    # 84x56 field under 224^2: kept, then smart_resize -> 84x56 -> grid (1, 4, 6) -> 6 image tokens
    assert item["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert item["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    assert int((item["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 6
    ans = item["input_ids"][item["labels"] != IGNORE_INDEX]
    assert tok.decode(ans) == "A.None.<|im_end|>\n"
    batch = qwen2vl_collate_fn([ds[0], ds[1]])["data"]
    assert batch["pixel_values"].shape[0] == 48 and batch["image_grid_thw"].shape == (2, 3)
    short = int(batch["attention_mask"].sum(1).min())
    row = int(batch["attention_mask"].sum(1).argmin())
    assert (batch["labels"][row, short:] == IGNORE_INDEX).all()  # right padding carries no loss
    # a row whose image tokens do not fit cutoff_len is named
    small = CytologySFTDataset("tiny_train", ds.processor, setup["data"], cutoff_len=12)
    with pytest.raises(SlideChatError, match=r"train\.jsonl: row 0 \(id f0\): cutoff_len=12 cuts into"):
        small[0]


def test_freezing_switches_and_lora_targets(setup):
    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel

    full = Qwen2VLTrainModel(setup["tiny"])  # defaults: vision tower and merger frozen
    assert all(k.startswith(("model.", "lm_head.")) for k in full.trained_keys)
    assert set(full.state_dict()) == set(full.trained_keys)
    both = Qwen2VLTrainModel(setup["tiny"], freeze_vision_tower=False)
    assert any(k.startswith("model.visual.blocks.") for k in both.trained_keys)
    assert not any(k.startswith("model.visual.merger.") for k in both.trained_keys)
    assert any(k.startswith("model.visual.merger.") for k in Qwen2VLTrainModel(
        setup["tiny"], freeze_multi_modal_projector=False).trained_keys)
    lora = Qwen2VLTrainModel(setup["tiny"], freeze_vision_tower=False, lora=dict(r=4))
    targets = {k.rsplit(".lora_", 1)[0] for k in lora.trained_keys}
    assert any(t.startswith("model.visual.blocks.0.attn.qkv") for t in targets)
    assert not any("patch_embed" in t or "merger" in t or "lm_head" in t for t in targets)


def test_real_configs_follow_llamafactory_recipe():
    from mmengine.config import Config

    sft = Config.fromfile(str(REPO / "configs/cytochat/qwen2vl_sft.py"))
    lora = Config.fromfile(str(REPO / "configs/cytochat/qwen2vl_lora.py"))
    assert (sft.template, sft.cutoff_len, sft.image_max_pixels, sft.image_min_pixels) == (
        "qwen2_vl", 2048, 768 * 768, 32 * 32)
    assert sft.model.freeze_vision_tower and sft.model.freeze_multi_modal_projector and sft.model.lora is None
    assert (sft.optim_wrapper.optimizer.lr, sft.optim_wrapper.accumulative_counts, sft.max_epochs,
            sft.warmup_ratio, sft.model.torch_dtype) == (1e-5, 2, 3, 0.1, "bfloat16")
    assert (lora.model.lora.r, lora.model.lora.lora_alpha, lora.model.lora.lora_dropout) == (8, 16, 0.0)
    assert (lora.optim_wrapper.optimizer.lr, lora.optim_wrapper.accumulative_counts) == (1e-4, 8)
    text = (REPO / "configs/cytochat/qwen2vl_sft.py").read_text() + \
        (REPO / "configs/cytochat/qwen2vl_lora.py").read_text()
    for name in ("deepspeed_zero2.json", "deepspeed_zero3.json"):  # the DeepSpeed JSONs the commands name
        assert f"configs/deepspeed/{name}" in text and (REPO / "configs/deepspeed" / name).is_file()


def test_load_qwen2vl_merges_a_peft_adapter_folder(setup, tmp_path):
    from slidechat.data.llamafactory import read_llamafactory
    from slidechat.data.qwen2vl_batch import prepare_generation_batch
    from slidechat.model.qwen2vl import load_qwen2vl
    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel

    trained = Qwen2VLTrainModel(setup["tiny"], lora=dict(r=4)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    trained._peft.save_pretrained(str(tmp_path / "adapter"))  # what LLaMA-Factory's LoRA runs write
    model, proc = load_qwen2vl(setup["tiny"], tmp_path / "adapter")
    assert not any("lora" in n for n, _ in model.named_parameters())
    batch = prepare_generation_batch(proc, read_llamafactory("tiny_train", setup["data"])[:2],
                                     image_max_pixels=224 * 224)
    with torch.no_grad():
        a = trained(dict(batch), mode="tensor")
        b = model(**batch).logits
        base, _ = load_qwen2vl(setup["tiny"])
        c = base(**batch).logits
    # merged weights differ from base + adapter by float rounding only: the norm-wise bound of
    # test_export_lora_merges_adapters (observed 2.4e-6); the N(0, 0.5) adapters move the logits by O(1)
    assert_close_rel(b, a, FP32_RTOL, what="merged adapter folder vs base + adapter")
    assert_differs_rel(c, a, 10 * FP32_RTOL, what="base model vs adapter")
    with pytest.raises(SlideChatError, match="not a LoRA adapter folder"):
        load_qwen2vl(setup["tiny"], tmp_path)


def test_wrapper_walkers_go_through_the_check(setup, sft):
    from torch import nn

    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel

    sd = _ckpt(sft)["state_dict"]
    wrapper = nn.Module()
    wrapper.module = Qwen2VLTrainModel(setup["tiny"])  # what DDP looks like to a module walker
    with pytest.raises(SlideChatError, match="checkpoint holds none of the"):
        nn.Module.load_state_dict(wrapper, sd, strict=False)  # un-prefixed keys: nothing would load
    nn.Module.load_state_dict(wrapper, {"module." + k: v for k, v in sd.items()}, strict=False)
    for k, v in sd.items():
        assert torch.equal(wrapper.module.state_dict()[k], v)


def _to_448_layout(key):
    """A transformers-5 key in the 4.48 layout (``model.layers.*``, ``visual.*``, ``lm_head.*``)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def test_freeze_rules_name_the_language_model_and_the_vision_tower_by_their_paths(setup):
    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel

    # LLM frozen, vision tower trainable: only vision-tower weights train (the merger stays as configured)
    vis = Qwen2VLTrainModel(setup["tiny"], freeze_language_model=True, freeze_vision_tower=False)
    assert vis.trained_keys and all(k.startswith("model.visual.") for k in vis.trained_keys)
    assert any(k.startswith("model.visual.blocks.") for k in vis.trained_keys)
    assert not any(k.startswith("model.visual.merger.") for k in vis.trained_keys)
    # LLM frozen, projector trainable, tower frozen: only the merger trains
    proj = Qwen2VLTrainModel(setup["tiny"], freeze_language_model=True, freeze_multi_modal_projector=False)
    assert proj.trained_keys and all(k.startswith("model.visual.merger.") for k in proj.trained_keys)
    # LLM trainable, vision tower frozen (the default): the LLM and head train, no vision weight does
    llm = Qwen2VLTrainModel(setup["tiny"])
    assert any(k.startswith("model.language_model.") for k in llm.trained_keys)
    assert "lm_head.weight" in llm.trained_keys
    assert not any(k.startswith("model.visual.") for k in llm.trained_keys)


def test_checkpoints_and_folders_in_the_448_layout_still_load(setup, sft, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slidechat.model.qwen2vl import load_qwen2vl
    from slidechat.engine.qwen2vl_train import build_qwen2vl_from_config

    opts = dict(o.split("=", 1) for o in setup["opts"][:4])
    sd = _ckpt(sft)["state_dict"]
    old = {_to_448_layout(k): v for k, v in sd.items()}
    assert any(k.startswith("model.layers.") for k in old) and not any(k.startswith("model.language") for k in old)
    torch.save({"state_dict": old}, tmp_path / "old.pth")
    model = build_qwen2vl_from_config(SFT, resolve_checkpoint(tmp_path / "old.pth"), cfg_options=opts)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    # Hugging Face / exported folders in either layout load to the same weights
    new = _hf_weights(setup["tiny"])
    assert any(k.startswith("model.language_model.") for k in new)
    for layout, rename in (("old", _to_448_layout), ("new", lambda k: k)):
        folder = tmp_path / f"{layout}_folder"
        shutil.copytree(setup["tiny"], folder)
        save_file({rename(k): v.contiguous() for k, v in new.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        keys = set(load_file(str(folder / "model.safetensors")))
        assert any(k.startswith("visual." if layout == "old" else "model.visual.") for k in keys)
        got = load_qwen2vl(folder)[0].state_dict()
        for k, v in new.items():
            assert torch.equal(got[k], v), (layout, k)


def test_text_only_batches_get_llamafactorys_masked_dummy_image(setup, tmp_path):
    """LLaMA-Factory's collator (data/collator.py): a batch with no image and no video gets a white 64x64
    RGB image; its <image> span (vision_start, t*h*w/merge^2 pads, vision_end) is appended to the first
    row with attention mask 0 and IGNORE_INDEX labels, and its pixels are the batch's pixel_values."""
    from PIL import Image

    from slidechat.data.cytology_dataset import CytologySFTDataset, qwen2vl_collate_fn
    from slidechat.model.constants import IGNORE_INDEX
    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel
    from train_data import write_sharegpt_dataset

    data = tmp_path / "text"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("Is HSIL a lesion?", "Yes."), ("Name a benign finding.", "Normal squamous cells."))]
    write_sharegpt_dataset(data, "text_only", rows, "text.jsonl")
    ds = CytologySFTDataset("text_only", str(setup["tiny"]), data)
    items = [ds[0], ds[1]]
    batch = qwen2vl_collate_fn(items)["data"]
    proc = ds.processor
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    ref = proc.image_processor(images=[white], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], ref["image_grid_thw"])
    n_pad = int(ref["image_grid_thw"].prod()) // proc.image_processor.merge_size ** 2
    tok = proc.tokenizer
    span = tok.encode("<|vision_start|>" + "<|image_pad|>" * n_pad + "<|vision_end|>", add_special_tokens=False)
    n0 = len(items[0]["input_ids"])
    assert batch["input_ids"][0, n0:n0 + len(span)].tolist() == span
    assert batch["attention_mask"][0, :n0].all() and not batch["attention_mask"][0, n0:].any()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["pixel_values"] is not None and qwen2vl_collate_fn([ds[0]])["data"]["image_grid_thw"].shape == (1, 3)
    # a batch with a real image gets none
    img_ds = CytologySFTDataset("tiny_train", proc, setup["data"], image_max_pixels=224 * 224)
    mixed = qwen2vl_collate_fn([items[0], img_ds[0]])["data"]
    assert mixed["image_grid_thw"].shape == (1, 3) and len(mixed["input_ids"][0]) == max(
        n0, len(img_ds[0]["input_ids"]))
    # the fake image changes no loss (masked, after the row's own tokens) but the vision tower runs
    model = Qwen2VLTrainModel(setup["tiny"], freeze_vision_tower=False)
    plain = qwen2vl_collate_fn([{k: v for k, v in it.items() if k != "dummy_image"} for it in items])["data"]
    assert plain["pixel_values"] is None
    a = model(batch)["loss"]
    b = model(plain)["loss"]
    # the same tokens through the same weights; only the padded width differs (masked keys): float noise
    assert torch.allclose(a, b, rtol=1e-5, atol=0), (a, b)
    a.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.visual.blocks.")]
    assert grads and all(g is not None for g in grads)
