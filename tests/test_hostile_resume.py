"""Genuine training resume through the safe loader, for every training config, and hostile resume checkpoints
refused in one line (issue 16).

The runs are the real commands in fresh processes (``slidechat train`` and stock ``xtuner train``): the bug
only shows there. mmengine parses configs in lazy-import mode, so slidechat's loaders were not installed yet
when xtuner read the ``--resume`` checkpoint's seed with torch's weights-only default, which refuses the
message hub's ``HistoryBuffer`` of every genuine checkpoint.

Each config trains 2 epochs uninterrupted; its ``epoch_1.pth`` (what a run stopped after epoch 1 leaves
behind) is copied aside and a second run resumes from it. The resumed run's per-iteration losses must be
those of the uninterrupted run.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from slidechat.utils.errors import SlideChatError
from train_data import cyto_train_data, slide_train_demo

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny"
EPOCHS = 2


# ------------------------------------------------------------------------------------------------ helpers

def train(route, config, work_dir, options, resume=None):
    """``slidechat train`` or stock ``xtuner train`` in a subprocess (xtuner's launcher exits 0 even when the
    training failed, so its runs are judged by their outputs)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(BIN / route), "train", str(config), "--work-dir", str(work_dir)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    cmd += ["--cfg-options", *options, f"experiment_name=h_{uuid.uuid4().hex[:8]}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def losses(work_dir):
    """{step: loss} of the single run in ``work_dir`` (mmengine's ``vis_data/scalars.json``) and its log text."""
    scal = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    assert len(scal) == 1, scal
    rows = [json.loads(line) for line in Path(scal[0]).read_text().splitlines() if line.strip()]
    log = Path(glob.glob(os.path.join(work_dir, "*", "*.log"))[0]).read_text()
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, log


def check_resume_matches(route, config, root, options):
    """Uninterrupted 2-epoch run vs. a run resumed from the first run's epoch-1 checkpoint (copied aside)."""
    full = root / f"{config.stem}_full"
    res = train(route, config, full, options)
    assert (full / f"epoch_{EPOCHS}.pth").is_file(), res.stdout[-2000:] + res.stderr[-3000:]
    if route == "slidechat":
        assert res.returncode == 0, res.stderr[-3000:]
    stopped = root / f"{config.stem}_stopped"
    stopped.mkdir()
    ckpt = shutil.copy(full / "epoch_1.pth", stopped / "epoch_1.pth")
    resumed = root / f"{config.stem}_resumed"
    res = train(route, config, resumed, options, resume=ckpt)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert (resumed / f"epoch_{EPOCHS}.pth").is_file(), res.stderr[-3000:]
    if route == "slidechat":
        assert res.returncode == 0, res.stderr[-3000:]
    old, _ = losses(full)
    new, log = losses(resumed)
    assert "resumed epoch: 1" in log
    per_epoch = len(old) // EPOCHS
    assert per_epoch >= 2 and sorted(new) == sorted(old)[per_epoch:], (sorted(old), sorted(new))
    # Same machine, thread count, data order, weights, optimizer and LR state, so the same arithmetic: the
    # only difference is the checkpoint round-trip, which is exact. The relative 1e-6 (float32 rounding of
    # a loss near 1-10) is no room for a wrong state: a skipped or repeated step moves losses by >1e-3 here.
    for step, loss in new.items():
        assert loss == pytest.approx(old[step], rel=1e-6, abs=0), (step, loss, old[step])
    return full


class Payload:
    """A pickle that runs a command when unpickled without restrictions."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_resume_checkpoint(path, marker):
    torch.save({"meta": {"seed": 0, "epoch": 1, "iter": 4, "hook": Payload(marker)},
                "state_dict": {"projector.model.0.weight": torch.zeros(2, 2)}, "message_hub": {}}, path)
    return path


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def slide_demo(tmp_path_factory):
    return slide_train_demo(tmp_path_factory.mktemp("hostile_resume_slide"))


@pytest.fixture(scope="module")
def stage1_full(slide_demo):
    """Stage 1 through ``slidechat train``: uninterrupted vs. resumed (its work dir feeds stage 2)."""
    from slidechat.engine.overrides import path_overrides

    opts = path_overrides(slide_demo["llm"], slide_demo["stage1"], slide_demo["features"]) + [
        f"train_cfg.max_epochs={EPOCHS}"]
    return check_resume_matches("slidechat", TINY / "stage_1.py", slide_demo["root"], opts)


@pytest.fixture(scope="module")
def cyto_demo(tmp_path_factory):
    return cyto_train_data(tmp_path_factory.mktemp("hostile_resume_cyto"), EPOCHS)


def test_stage1_resume_through_slidechat_train_matches_uninterrupted(stage1_full):
    assert (stage1_full / "last_checkpoint").is_file()


def test_stage2_resume_through_slidechat_train_matches_uninterrupted(slide_demo, stage1_full, tmp_path):
    from slidechat.engine.overrides import path_overrides

    opts = path_overrides(slide_demo["llm"], slide_demo["stage2"], slide_demo["features"], stage1_full) + [
        f"train_cfg.max_epochs={EPOCHS}"]
    check_resume_matches("slidechat", TINY / "stage_2.py", tmp_path, opts)


def test_stage2_lora_resume_through_stock_xtuner_train_matches_uninterrupted(slide_demo, stage1_full, tmp_path):
    from slidechat.engine.overrides import path_overrides

    opts = path_overrides(slide_demo["llm"], slide_demo["stage2"], slide_demo["features"], stage1_full) + [
        f"train_cfg.max_epochs={EPOCHS}"]
    check_resume_matches("xtuner", TINY / "stage_2_lora.py", tmp_path, opts)


def test_cytology_sft_resume_through_slidechat_train_matches_uninterrupted(cyto_demo, tmp_path):
    check_resume_matches("slidechat", TINY / "cytochat_sft.py", tmp_path, cyto_demo["opts"])


def test_cytology_lora_resume_through_stock_xtuner_train_matches_uninterrupted(cyto_demo, tmp_path):
    check_resume_matches("xtuner", TINY / "cytochat_lora.py", tmp_path, cyto_demo["opts"])


def test_crafted_resume_checkpoint_is_one_line_and_runs_nothing(slide_demo, tmp_path):
    """``slidechat train`` runs xtuner's own train script, so this is stock ``xtuner train``'s path too (whose
    launcher exits 0 whatever happens)."""
    from slidechat.engine.overrides import path_overrides

    marker = tmp_path / "pwned"
    evil = crafted_resume_checkpoint(tmp_path / "evil.pth", marker)
    opts = path_overrides(slide_demo["llm"], slide_demo["stage1"], slide_demo["features"]) + [
        "train_cfg.max_epochs=1"]
    res = train("slidechat", TINY / "stage_1.py", tmp_path / "run", opts, resume=evil)
    assert res.returncode == 1, res.stderr[-3000:]
    assert not marker.exists()
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("slidechat: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    # names the file and the refused global; no torch advice to unpickle it anyway, no flag no command has
    assert str(evil) in errors[0] and "system" in errors[0], errors[0]
    assert "weights_only" not in errors[0] and "allow_unsafe_pickle" not in errors[0], errors[0]
    assert not (tmp_path / "run" / "epoch_1.pth").exists()


def test_seed_lookup_of_a_crafted_deepspeed_folder_is_one_line(tmp_path):
    """``xtuner train --deepspeed ... --resume DIR`` reads the seed from DIR's model-states file first."""
    from slidechat.engine.train_model import safe_seed_from_checkpoint

    marker = tmp_path / "pwned"
    folder = tmp_path / "iter_4.pth"
    folder.mkdir()
    crafted_resume_checkpoint(folder / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(SlideChatError, match=r"mp_rank_00_model_states\.pt: .*global (posix|os|nt)\.system"):
        safe_seed_from_checkpoint(folder)
    assert not marker.exists()


class Appending(Payload):
    """A payload whose reduce also appends items to what the call returned: a restricted unpickler that makes
    the call inert cannot rebuild it either, so the safe loader refuses the file."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",), None, iter([1]))


def test_unsafe_checkpoint_message_is_one_line_with_our_advice(tmp_path):
    from slidechat.model.checkpoint import load_weights

    marker = tmp_path / "pwned"
    bad = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Appending(marker)}, bad)
    with pytest.raises(SlideChatError) as info:
        load_weights(bad)
    msg = str(info.value)
    assert not marker.exists()
    assert "\n" not in msg and msg.startswith(f"{bad}: "), msg
    assert "non-tensor Python objects" in msg and "system" in msg, msg
    assert "safetensors" in msg, msg
    # torch's advice (reload with weights_only=False) and a parameter no command offers are gone
    assert "weights_only" not in msg and "allow_unsafe_pickle" not in msg, msg


def test_a_safe_load_leaves_the_process_wide_allow_list_in_place(tmp_path):
    """torch's ``safe_globals`` context removes on exit what it was given, even entries allowed
    process-wide before it; a safe load must not take the mmengine allow-list away from later loads
    (stock xtuner code bound before our loaders were installed relies on it)."""
    from mmengine.logging import MessageHub
    from mmengine.logging.history_buffer import HistoryBuffer

    from slidechat.engine.train_model import load_training_checkpoint

    hub = MessageHub.get_instance("allow_list_kept")
    hub.update_scalar("train/loss", 1.0)
    path = tmp_path / "epoch_1.pth"
    torch.save({"message_hub": hub.state_dict(), "w": torch.ones(1)}, path)
    assert HistoryBuffer in torch.serialization.get_safe_globals()
    load_training_checkpoint(path, "cpu")
    assert HistoryBuffer in torch.serialization.get_safe_globals()
    assert torch.load(path)["w"].item() == 1.0  # torch's default (weights-only) still reads it


def test_a_deepspeed_file_load_leaves_the_process_wide_allow_list_in_place(tmp_path):
    """The same rule for DeepSpeed's model/optimizer-state loader (``--deepspeed ... --resume``)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    from slidechat.engine.train_model import safe_deepspeed_load

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1)}}, path)
    assert HistoryBuffer in torch.serialization.get_safe_globals()
    safe_deepspeed_load(None, str(path), "cpu")
    assert HistoryBuffer in torch.serialization.get_safe_globals()
