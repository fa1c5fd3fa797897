"""Tiny stage 1 -> resume -> stage 2 -> export through xtuner's own ``train`` entry point (CPU).

``xtuner train CONFIG ...`` runs ``python xtuner/tools/train.py ...``, i.e. ``xtuner.tools.train.main``;
it is called in-process here (same code, without paying the import cost once per run).
"""

import glob
import json
import os
import sys
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from slidechat.engine.overrides import parse_cfg_options, path_overrides
from slidechat.model.checkpoint import resolve_checkpoint
from train_data import slide_train_demo

REPO = Path(__file__).resolve().parents[1]
TINY1 = REPO / "configs/tiny/stage_1.py"
TINY2 = REPO / "configs/tiny/stage_2.py"


def xtuner_train(config, work_dir, options, extra=()):
    from xtuner.tools import train

    argv = ["train.py", str(config), "--work-dir", str(work_dir), *extra,
            "--cfg-options", *options, f"experiment_name=test_{uuid.uuid4().hex[:8]}"]
    with mock.patch.object(sys, "argv", argv):
        train.main()


def logged(work_dir):
    """(scalars rows, full log text) of the single run in ``work_dir``."""
    scal = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    assert len(scal) == 1, scal
    rows = [json.loads(line) for line in Path(scal[0]).read_text().splitlines() if line.strip()]
    logs = glob.glob(os.path.join(work_dir, "*", "*.log"))
    return [r for r in rows if "loss" in r], Path(logs[0]).read_text()


def llm_folder_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return slide_train_demo(tmp_path_factory.mktemp("train_demo"))


@pytest.fixture(scope="module")
def stage1(demo):
    wd = demo["root"] / "stage1"
    # 8 epochs instead of the config's 12 keeps the suite quick; the loss still drops clearly
    opts = path_overrides(demo["llm"], demo["stage1"], demo["features"]) + ["train_cfg.max_epochs=8"]
    xtuner_train(TINY1, wd, opts)
    return {"work_dir": wd, "opts": opts}


@pytest.fixture(scope="module")
def stage2(demo, stage1):
    wd = demo["root"] / "stage2"
    opts = path_overrides(demo["llm"], demo["stage2"], demo["features"], stage1["work_dir"]) + [
        "train_cfg.max_epochs=4"]
    xtuner_train(TINY2, wd, opts)
    return {"work_dir": wd, "opts": opts}


def _last_ckpt(work_dir):
    return (Path(work_dir) / "last_checkpoint").read_text().strip()


def test_stage1_learns_and_keeps_llm_frozen(demo, stage1):
    rows, log = logged(stage1["work_dir"])
    losses = [r["loss"] for r in rows]
    assert len(losses) == 32  # 8 slides / batch 2 x 8 epochs
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, losses
    ckpt = torch.load(_last_ckpt(stage1["work_dir"]), map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith(("LongNet_encoder.", "projector.model.")) for k in keys)
    assert any(k.startswith("projector.model.0.") for k in keys)
    assert any(k.startswith("projector.model.2.") for k in keys)
    # the LLM as trained in stage 1 (config LLM + stage-1 checkpoint) equals the tiny LLM folder
    from slidechat.engine.builder import build_model_from_config

    core, _ = build_model_from_config(TINY1, resolve_checkpoint(_last_ckpt(stage1["work_dir"])),
                                      cfg_options=parse_cfg_options(stage1["opts"]))
    ref = llm_folder_tensors(demo["llm"])
    llm_sd = core.llm.state_dict()
    assert set(ref) <= set(llm_sd)
    for k, v in ref.items():
        assert torch.equal(llm_sd[k], v), k
    # ... and the encoder is the trained one from the checkpoint
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(core.state_dict()[k], v), k


def test_resume_continues_from_checkpoint(demo, stage1, tmp_path):
    rows, _ = logged(stage1["work_dir"])
    ckpt = Path(stage1["work_dir"]) / "epoch_7.pth"
    assert ckpt.is_file()
    wd = tmp_path / "resumed"
    xtuner_train(TINY1, wd, stage1["opts"], extra=("--resume", str(ckpt)))
    new_rows, log = logged(wd)
    assert "resumed" in log.lower() and "epoch_7.pth" in log
    assert [r["step"] for r in new_rows] == [29, 30, 31, 32]
    old = {r["step"]: r["loss"] for r in rows}
    for r in new_rows:  # same data order, weights, optimizer and LR state as the uninterrupted run
        # same process, threads and kernels: float noise at most (observed: bit for bit), relative to the loss
        assert r["loss"] == pytest.approx(old[r["step"]], rel=1e-5)
    assert (wd / "epoch_8.pth").is_file()


def test_stage2_loads_stage1_and_trains_llm(demo, stage1, stage2):
    rows, log = logged(stage2["work_dir"])
    assert "Loaded pretrained_pth" in log and "epoch_8.pth" in log
    assert "missing" in log and "unexpected none" in log
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.5, losses
    ckpt = torch.load(_last_ckpt(stage2["work_dir"]), map_location="cpu", weights_only=False)
    sd = ckpt["state_dict"]
    assert any(k.startswith("llm.model.layers.") for k in sd) and "llm.lm_head.weight" in sd
    assert all(k.startswith(("LongNet_encoder.", "projector.model.", "llm.")) for k in sd)
    ref = llm_folder_tensors(demo["llm"])
    changed = [k for k, v in ref.items() if not torch.equal(sd["llm." + k], v)]
    assert len(changed) > 0.9 * len(ref)


def test_export_reloads_with_identical_logits(demo, stage2, tmp_path):
    from slidechat.cli.main import main as slidechat_main
    from slidechat.data.collate import slidechat_collate_fn
    from slidechat.data.dataset import SlideInstructionDataset
    from slidechat.engine.builder import build_model_from_config
    from slidechat.model.slidechat_model import SlideChatModel

    ckpt = _last_ckpt(stage2["work_dir"])
    out = tmp_path / "export"
    rc = slidechat_main(["export", str(TINY2), "--checkpoint", ckpt, "--out", str(out),
                         "--cfg-options", *stage2["opts"]])
    assert rc == 0
    trained, tok = build_model_from_config(TINY2, resolve_checkpoint(ckpt),
                                           cfg_options=parse_cfg_options(stage2["opts"]))
    reloaded = SlideChatModel.from_pretrained(out).eval()
    ds = SlideInstructionDataset(demo["stage2"], tok, feature_root=demo["features"], max_patches=256)
    batch = slidechat_collate_fn([ds[0], ds[3]])["data"]
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "features", "coords")}
    with torch.no_grad():
        a = trained(**kw).logits
        b = reloaded(**kw).logits
    assert torch.equal(a, b)
    # the export is the stage-2 training result, not the untouched LLM
    ref = llm_folder_tensors(demo["llm"])
    k = next(k for k in ref if k.endswith("mlp.down_proj.weight"))
    assert not torch.equal(reloaded.llm.state_dict()[k], ref[k])


def test_stage2_lora_through_xtuner_train(demo, stage1, tmp_path):
    """configs/tiny/stage_2_lora.py (extends stage_2.py): LLM frozen, LoRA adapters + slide modules
    trained through the stock entry point; the checkpoint holds adapters only and merges on load."""
    from slidechat.engine.builder import build_model_from_config

    wd = tmp_path / "stage2_lora"
    opts = path_overrides(demo["llm"], demo["stage2"], demo["features"], stage1["work_dir"]) + [
        "train_cfg.max_epochs=2"]
    xtuner_train(REPO / "configs/tiny/stage_2_lora.py", wd, opts)
    rows, log = logged(wd)
    assert "Loaded pretrained_pth" in log
    n_rows = len(json.loads(Path(demo["stage2"]).read_text()))
    assert np.isfinite([r["loss"] for r in rows]).all() and len(rows) == 2 * -(-n_rows // 2)
    sd = torch.load(_last_ckpt(wd), map_location="cpu", weights_only=False)["state_dict"]
    llm_keys = [k for k in sd if k.startswith("llm.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)
    # adapters start with lora_B = 0; training must have moved them
    assert any(float(sd[k].abs().sum()) > 0 for k in llm_keys if "lora_B" in k)
    core, _ = build_model_from_config(REPO / "configs/tiny/stage_2_lora.py", resolve_checkpoint(_last_ckpt(wd)),
                                      cfg_options=parse_cfg_options(opts))
    merged = core.llm.state_dict()
    assert not any("lora_" in k for k in merged)
    ref = llm_folder_tensors(demo["llm"])
    k = next(k for k in ref if k.endswith("self_attn.q_proj.weight"))
    assert not torch.equal(merged[k], ref[k])  # the merged LLM carries the trained adapters
