"""Numbers a researcher can trust: one strict checkpoint path, no code run from checkpoint files, exit codes
and feature widths that tell the truth (issue 9). Each test failed on the main branch before the fix:
``slidechat test`` scored a random model and exited 0, a shape mismatch was a raw traceback, ``xtuner
test`` unpickled code, 1,024-d features were cut to 512 columns, and a failed training exited 0.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_testing import BATCH, CONFIG, MAX_NEW, N_ROWS, build_tiny_setup, cfg_option_args, read_rows  # noqa: E402
from tolerances import assert_rounded_to_decimals  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY1 = REPO / "configs" / "tiny" / "stage_1.py"


class Payload:
    """Unpickling this for real creates the marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


@pytest.fixture(scope="module")
def trained_sd(setup):
    return torch.load(setup["ckpt"], weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def ckpts(setup, trained_sd, tmp_path_factory):
    """Checkpoint files that must be refused: no encoder/projector, nothing of SlideChat, wrong shape."""
    root = tmp_path_factory.mktemp("bad_ckpts")
    out = {}
    out["no_slide"] = root / "no_slide.pth"  # e.g. an LLM-only file: the encoder/projector would be random
    torch.save({"meta": {}, "state_dict": {k: v for k, v in trained_sd.items() if k.startswith("llm.")}},
               out["no_slide"])
    out["foreign"] = root / "foreign.pth"  # holds no SlideChat weights at all
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(4, 3, 3, 3),
                               "head.fc.bias": torch.zeros(4)}}, out["foreign"])
    bad = dict(trained_sd)
    bad["projector.model.0.weight"] = torch.zeros(3, 3)
    out["shape"] = root / "shape.pth"
    torch.save({"state_dict": bad}, out["shape"])
    return out


def cli(argv, caplog):
    """(exit status, ERROR lines) of ``slidechat ARGV`` run in this process."""
    from slidechat.cli.main import main

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc = main([str(a) for a in argv])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return rc, errors


def args_test(setup, out, checkpoint, *extra):
    return ["test", CONFIG, "--checkpoint", checkpoint, "--test_slide_csv", setup["csv"],
            "--test_output_csv", out, "--feature_root", setup["feats"], "--batch_size", BATCH,
            "--max_new_tokens", MAX_NEW, "--work-dir", Path(out).parent / "wd", *extra,
            "--cfg-options", *cfg_option_args(setup["overrides"])]


def chat_args(setup, checkpoint, features=None, *extra):
    return ["chat", "--config", CONFIG, "--checkpoint", checkpoint, "--features",
            features or setup["feats"] / "BRCA" / "TCGA-00.h5", "--max-new-tokens", 2, *extra,
            "--cfg-options", *cfg_option_args(setup["overrides"])]


def export_args(setup, checkpoint, out, *extra):
    return ["export", CONFIG, "--checkpoint", checkpoint, "--out", out, *extra,
            "--cfg-options", *cfg_option_args(setup["overrides"])]


# ----------------------------------------------------------------------------- silent random weights

def test_slidechat_test_refuses_a_checkpoint_without_encoder_and_projector(setup, ckpts, tmp_path, caplog,
                                                                           monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # chat reads no question: it must fail before
    out = tmp_path / "out.csv"
    rc, errors = cli(args_test(setup, out, ckpts["no_slide"]), caplog)
    assert rc == 1 and len(errors) == 1 and "\n" not in errors[0]
    msg = errors[0]
    assert str(ckpts["no_slide"]) in msg and "lacks required weights" in msg
    assert "LongNet_encoder.layers.*" in msg and "projector.model.*" in msg and "--allow-partial" in msg
    assert not out.exists()  # nothing was scored
    # chat and export refuse it the same way, with the same one line
    rc_chat, errors_chat = cli(chat_args(setup, ckpts["no_slide"]), caplog)
    rc_exp, errors_exp = cli(export_args(setup, ckpts["no_slide"], tmp_path / "exp"), caplog)
    assert rc_chat == rc_exp == 1 and errors_chat == errors_exp == [msg]
    assert not (tmp_path / "exp").exists()


def test_a_checkpoint_with_no_slidechat_weights_at_all_is_refused(setup, ckpts, tmp_path, caplog):
    rc, errors = cli(args_test(setup, tmp_path / "out.csv", ckpts["foreign"]), caplog)
    assert rc == 1 and len(errors) == 1
    assert "holds none of the" in errors[0] and "unexpected 2 keys: backbone.conv1, head.fc" in errors[0]


def test_shape_mismatch_is_one_line_not_a_traceback(setup, ckpts, tmp_path, caplog):
    for argv in (args_test(setup, tmp_path / "out.csv", ckpts["shape"]),
                 export_args(setup, ckpts["shape"], tmp_path / "exp")):
        rc, errors = cli(argv, caplog)
        assert rc == 1 and len(errors) == 1 and "\n" not in errors[0]
        assert "projector.model.0.weight: checkpoint (3, 3) vs model (" in errors[0]
    assert not (tmp_path / "out.csv").exists()


def test_allow_partial_loads_deliberately_with_a_warning(setup, ckpts, trained_sd, tmp_path, caplog):
    out = tmp_path / "out.csv"
    rc, errors = cli(args_test(setup, out, ckpts["no_slide"], "--allow-partial"), caplog)
    assert rc == 0 and errors == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("loaded" in w and "missing" in w and "LongNet_encoder.layers.*" in w for w in warned), warned
    assert len(read_rows(out)) == N_ROWS
    # the LLM came from the checkpoint; the encoder stayed as initialised (differs from the trained one)
    from slidechat.engine.builder import build_model_from_config
    from slidechat.engine.overrides import parse_cfg_options
    from slidechat.model.checkpoint import resolve_checkpoint

    core, _ = build_model_from_config(CONFIG, resolve_checkpoint(ckpts["no_slide"]), parse_cfg_options(
        cfg_option_args(setup["overrides"])), allow_partial=True)
    sd = core.state_dict()
    assert torch.equal(sd["llm.lm_head.weight"], trained_sd["llm.lm_head.weight"])
    # a shape mismatch stays an error even then
    rc, errors = cli(args_test(setup, out, ckpts["shape"], "--allow-partial", "--overwrite"), caplog)
    assert rc == 1 and "do not fit the model" in errors[0]


def test_pretrained_pth_is_strict_unless_allow_partial(setup, ckpts):
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from slidechat.utils.errors import SlideChatError

    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict({**setup["overrides"], "model.pretrained_pth": str(ckpts["no_slide"])})
    with pytest.raises(SlideChatError, match=r"lacks required weights: .*LongNet_encoder"):
        BUILDER.build(cfg.model)
    cfg.merge_from_dict({"model.allow_partial": True})
    model = BUILDER.build(cfg.model)
    assert not model.pretrained_report.ok and model.pretrained_report.missing


# ----------------------------------------------------------------------------- no code from checkpoints

def test_stock_xtuner_test_never_unpickles_code(setup, tmp_path):
    """The real ``xtuner test`` entry point (subprocess) on a crafted ``.pth``: xtuner's own loader would
    call ``open(marker, 'w')`` while unpickling; through our configs it reads safely and refuses."""
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pth"
    torch.save({"meta": {"hook": Payload(str(marker))}, "state_dict": {"x": Payload(str(marker))}}, crafted)
    assert not marker.exists()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")
    xtuner = shutil.which("xtuner", path=env["PATH"])
    out = tmp_path / "out.csv"
    cmd = [xtuner, "test", str(CONFIG), "--checkpoint", str(crafted), "--work-dir", str(tmp_path / "wd"),
           "--cfg-options", *cfg_option_args(setup["overrides"]), f"test_slide_csv={setup['csv']}",
           f"test_output_csv={out}", f"feature_root={setup['feats']}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert not marker.exists()
    # (xtuner's launcher exits 0 whatever its child did -- the reason for `slidechat test/train` in scripts --
    # so the refusal is checked by its message and by the absence of any output)
    assert not out.exists()
    err_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("slidechat: error:")]
    assert len(err_lines) == 1 and str(crafted) in err_lines[0] and "no tensors found" in err_lines[0]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]


def test_slidechat_commands_never_unpickle_code(setup, tmp_path, caplog):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pth"
    torch.save({"meta": {"hook": Payload(str(marker))}, "state_dict": {"x": Payload(str(marker))}}, crafted)
    for argv in (args_test(setup, tmp_path / "out.csv", crafted), chat_args(setup, crafted),
                 export_args(setup, crafted, tmp_path / "exp")):
        rc, errors = cli(argv, caplog)
        assert rc == 1 and len(errors) == 1 and "no tensors found" in errors[0]
        assert not marker.exists()


def test_safe_loader_reads_weights_beside_a_payload(setup, trained_sd, tmp_path):
    """A real checkpoint whose metadata carries a payload: the weights load, the payload never runs
    (this is the loader stock ``xtuner test`` now calls)."""
    import xtuner.model.utils as xtuner_utils
    from xtuner.tools import test as xtuner_test

    from slidechat.engine.train_model import install_safe_xtuner_loader, safe_guess_load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "iter_3.pth"
    torch.save({"meta": {"hook": Payload(str(marker))}, "message_hub": Payload(str(marker)),
                "state_dict": collections.OrderedDict(trained_sd)}, path)
    install_safe_xtuner_loader()
    assert xtuner_test.guess_load_checkpoint is safe_guess_load_checkpoint
    assert xtuner_utils.guess_load_checkpoint is safe_guess_load_checkpoint
    sd = xtuner_test.guess_load_checkpoint(str(path))
    assert set(sd) == set(trained_sd) and all(torch.equal(sd[k], trained_sd[k]) for k in sd)
    assert not marker.exists()


# ----------------------------------------------------------------------------- feature width

def _write_wide(path: Path, width: int = 1024, n: int = 30) -> Path:
    from slidechat.features.io import write_feature_h5

    rng = np.random.default_rng(0)
    write_feature_h5(path, rng.normal(size=(n, width)).astype(np.float32),
                     np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64))
    return path


def test_wide_features_are_refused_in_training_testing_and_chat(setup, tmp_path, caplog):
    from slidechat.data.dataset import SlideInstructionDataset
    from slidechat.features.io import load_features
    from slidechat.utils.errors import SlideChatError

    wide = _write_wide(tmp_path / "wide.h5")
    # the one reader used by training, testing and chat
    with pytest.raises(SlideChatError, match=r"wide.h5: features are 1024 wide, the model expects 512"):
        load_features(wide, num_columns=512)
    narrow = _write_wide(tmp_path / "narrow.h5", width=384)
    with pytest.raises(SlideChatError, match=r"features are 384 wide, the model expects 512"):
        load_features(narrow, num_columns=512)
    # training: the row names the file and both widths
    import json

    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "r0", "image": ["wide.h5"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "tumor"}]}]))
    from transformers import AutoTokenizer

    ds = SlideInstructionDataset(str(data), AutoTokenizer.from_pretrained(setup["llm"]),
                                 feature_root=str(tmp_path), feature_dim=512)
    with pytest.raises(SlideChatError, match=r"wide.h5: .*1024 wide, the model expects 512"):
        ds.load_item(0)
    # chat: one line, exit 1
    rc, errors = cli(["chat", "--checkpoint", setup["exported"], "--features", wide], caplog)
    assert rc == 1 and len(errors) == 1 and "1024 wide, the model expects 512" in errors[0]
    assert str(wide) in errors[0]
    # testing: that row gets an Error naming the widths, the other rows are answered
    feats = tmp_path / "feats"
    shutil.copytree(setup["feats"], feats)
    _write_wide(feats / "LUAD" / "TCGA-01.h5")
    out = tmp_path / "out.csv"
    args = args_test(setup, out, setup["ckpt"])
    args[args.index("--feature_root") + 1] = feats
    rc, _ = cli(args, caplog)
    assert rc == 0
    rows = {r["ID"]: r for r in read_rows(out)}
    assert "1024 wide, the model expects 512" in rows["q1"]["Error"] and rows["q1"]["Output"] == ""
    assert rows["q0"]["Error"] == "" and rows["q0"]["Output"] != ""


def test_slidechat_csv_widths(tmp_path):
    """SlideChat's CSV (header 0..D-1) is D wide; a pandas index column is dropped explicitly."""
    import pandas as pd

    from slidechat.features.io import load_features, write_slidechat_csv
    from slidechat.utils.errors import SlideChatError

    x = np.random.default_rng(1).normal(size=(5, 512)).astype(np.float32)
    write_slidechat_csv(tmp_path / "a.csv", x)
    got, _ = load_features(tmp_path / "a.csv", num_columns=512)
    assert_rounded_to_decimals(got, x, 4)  # SlideChat's CSV is %.4f: exact rounding, the same on every machine
    pd.DataFrame(x).to_csv(tmp_path / "indexed.csv")  # header ",0,1,...", first column 0..N-1
    got, _ = load_features(tmp_path / "indexed.csv", num_columns=512)
    assert_rounded_to_decimals(got, x, 4)  # the index column dropped; pandas writes more decimals than 4
    df = pd.DataFrame(x)
    df.index = [7, 3, 1, 0, 2]  # an unnamed first column that is not a row index: not silently dropped
    df.to_csv(tmp_path / "odd.csv")
    with pytest.raises(SlideChatError, match="odd.csv: first column has no name but is not a 0..N-1"):
        load_features(tmp_path / "odd.csv", num_columns=512)


# ----------------------------------------------------------------------------- exit codes of training

@pytest.fixture(scope="module")
def train_demo(tmp_path_factory):

    from slidechat.data.synthetic import write_synthetic_dataset
    from slidechat.features.io import write_feature_h5
    from slidechat.model.tiny_llm import make_tiny_llm

    import csv

    root = tmp_path_factory.mktemp("train_exit")
    llm = make_tiny_llm(root / "tiny_llm")
    feats = root / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "path", "label"])
        for i in range(4):
            n = 40
            write_feature_h5(feats / f"demo_{i}.h5", rng.normal(size=(n, 512)).astype(np.float32),
                             np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64))
            w.writerow([f"demo_{i}", f"slides/demo_{i}.tiff", ("tumor", "normal")[i % 2]])
    paths = write_synthetic_dataset(root / "manifest.csv", root / "data", seed=0)
    return {"root": root, "llm": llm, "features": feats, **paths}


def slidechat_train(config, work_dir, options):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [str(BIN / "slidechat"), "train", str(config), "--work-dir", str(work_dir),
           "--cfg-options", *options]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_slidechat_train_exit_status_tells_the_truth(train_demo, tmp_path):
    from slidechat.engine.overrides import path_overrides

    ok = path_overrides(train_demo["llm"], train_demo["stage1"], train_demo["features"]) + [
        "train_cfg.max_epochs=1"]
    res = slidechat_train(TINY1, tmp_path / "good", ok)
    assert res.returncode == 0, res.stderr[-3000:]
    marker = tmp_path / "good" / "last_checkpoint"
    assert marker.is_file() and Path(marker.read_text().strip()).is_file()
    # the same training with a missing data file fails; xtuner train would still exit 0 here
    bad = path_overrides(train_demo["llm"], tmp_path / "missing.json", train_demo["features"]) + [
        "train_cfg.max_epochs=1"]
    res = slidechat_train(TINY1, tmp_path / "bad", bad)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "missing.json" in res.stderr and "training failed (exit status 1)" in res.stderr


def test_mmengine_resume_path_runs_the_same_check(setup, trained_sd):
    """mmengine's resume loads through its own ``load_state_dict`` walker (strict=False: a shape mismatch
    was only a warning, the tensor kept its random value); it now meets the same key check."""
    from mmengine.config import Config
    from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict
    from xtuner.registry import BUILDER

    from slidechat.utils.errors import SlideChatError

    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(setup["overrides"])
    model = BUILDER.build(cfg.model)
    bad = dict(trained_sd)
    bad["LongNet_encoder.layer_norm.weight"] = torch.ones(7)
    with pytest.raises(SlideChatError, match=r"LongNet_encoder.layer_norm.weight: checkpoint \(7,\) vs model"):
        mmengine_load_state_dict(model, bad, strict=False)
    no_proj = {k: v for k, v in trained_sd.items() if not k.startswith("projector.")}
    with pytest.raises(SlideChatError, match=r"lacks required weights: 4 keys: projector.model"):
        mmengine_load_state_dict(model, no_proj, strict=False)
    mmengine_load_state_dict(model, dict(trained_sd), strict=False)
    assert torch.equal(model.state_dict()["projector.model.2.weight"], trained_sd["projector.model.2.weight"])
    # a wrapper (as DistributedDataParallel under `xtuner test --launcher pytorch`) given the model's own
    # keys used to load nothing, silently; now that is refused, and prefixed keys load
    wrapper = torch.nn.Module()
    wrapper.module = model
    with pytest.raises(SlideChatError, match="holds none of the"):
        wrapper.load_state_dict(dict(trained_sd), strict=False)
    wrapper.load_state_dict({f"module.{k}": v for k, v in trained_sd.items()}, strict=False)


def test_deepspeed_resume_reads_its_files_without_running_code(tmp_path):
    """``--deepspeed ... --resume`` reads DeepSpeed's model/optimizer files through its checkpoint engine,
    which unpickles with ``weights_only=False``; once a config has imported ``slidechat.engine.train_model`` the
    engine reads weights-only with DeepSpeed's own classes allowed (ZeRO-2/3 bf16 resume was checked on CPU
    against real DeepSpeed checkpoints with these classes)."""
    import mmengine.runner  # noqa: F401  (imports DeepSpeed, as in xtuner train)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from slidechat.engine.train_model import install_safe_xtuner_loader, safe_deepspeed_load
    from slidechat.utils.errors import SlideChatError

    install_safe_xtuner_loader()
    assert TorchCheckpointEngine.load is safe_deepspeed_load
    engine = TorchCheckpointEngine()
    good = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "dyn": DynamicLossScaler(init_scale=8, scale_window=100, min_scale=1, delayed_shift=1,
                                                                     consecutive_hysteresis=False),
                                         "zero_stage": ZeroStageEnum.gradients,
                                         "param_slice_mappings": [collections.OrderedDict(
                                             w=fragment_address(numel=4, start=0))],
                                         "single_partition_of_fp32_groups": [torch.ones(4)]},
                "ds_version": "0.19.8"}, good)
    back = engine.load(str(good), map_location="cpu")
    osd = back["optimizer_state_dict"]
    assert osd["loss_scaler"].cur_scale == 1.0 and osd["zero_stage"] == ZeroStageEnum.gradients
    assert osd["param_slice_mappings"][0]["w"].numel == 4
    marker = tmp_path / "pwned"
    bad = tmp_path / "crafted_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload(str(marker))}}, bad)
    with pytest.raises(SlideChatError, match=r"crafted_optim_states.pt: refusing to load a DeepSpeed checkpoint"):
        engine.load(str(bad), map_location="cpu")
    assert not marker.exists()


def test_xtuner_test_weights_carry_their_checkpoint_to_the_report(setup, trained_sd, tmp_path):
    """``xtuner test`` hands the model only the weights its (safe) loader read; they carry the checkpoint
    they came from, so a refusal names the file — loaded directly or through a wrapper (as
    ``DistributedDataParallel`` under ``--launcher pytorch``), with no state kept between the two calls."""
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from slidechat.engine.train_model import safe_guess_load_checkpoint
    from slidechat.utils.errors import SlideChatError

    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(setup["overrides"])
    model = BUILDER.build(cfg.model)
    path = tmp_path / "iter_7.pth"
    torch.save({"state_dict": {k: v for k, v in trained_sd.items() if not k.startswith("projector.")}}, path)
    with pytest.raises(SlideChatError, match=r"iter_7.pth.*lacks required weights: 4 keys: projector.model"):
        model.load_state_dict(safe_guess_load_checkpoint(str(path)), strict=False)
    wrapper = torch.nn.Module()
    wrapper.module = model
    with pytest.raises(SlideChatError, match=r"iter_7.pth.*holds none of the"):
        wrapper.load_state_dict(safe_guess_load_checkpoint(str(path)), strict=False)
    with pytest.raises(SlideChatError, match=r"holds none of the") as plain:  # no source: nothing named
        wrapper.load_state_dict(dict(trained_sd), strict=False)
    assert "iter_7.pth" not in str(plain.value)
