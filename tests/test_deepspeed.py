"""Stock ``xtuner train CONFIG --deepspeed configs/deepspeed/*.json`` on the tiny slide configs.

Each run is the real command in a subprocess (``xtuner train`` -> ``python xtuner/tools/train.py``), so
the start-up shim, xtuner's strategy build, DeepSpeed's engine and mmengine's FlexibleRunner are the
ones a user gets. DeepSpeed runs on its CPU accelerator here (gloo) and on the GPU when one is present.
A single process needs the ``torch.distributed`` variables (see docs/training.md "DeepSpeed"); without
them DeepSpeed looks for MPI (``mpi4py``).

Why a few steps are enough: the tiny configs train their real modules (LongNet encoder, projector,
Qwen2 LLM, LoRA) through the same DeepSpeed code paths as the 7B ones; what DeepSpeed adds (ZeRO
partitioning of gradients/optimizer state, ZeRO-3 parameter partitioning of the LLM, its checkpoint
folders, resume) is exercised from the first step and the first checkpoint. Losses must be finite and
fall, checkpoints must load through ``slidechat test`` and resume must repeat the uninterrupted run.

``xtuner train`` exits 0 even when training fails (xtuner's launcher), so every test checks the
run's outputs, never only the exit status.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from slidechat.engine.overrides import parse_cfg_options, path_overrides
from slidechat.model.checkpoint import resolve_checkpoint
from train_data import slide_train_demo

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DS = REPO / "configs" / "deepspeed"
TINY1 = REPO / "configs/tiny/stage_1.py"
TINY2 = REPO / "configs/tiny/stage_2.py"
TINY2_LORA = REPO / "configs/tiny/stage_2_lora.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epochs(n: int) -> List[str]:
    """Stop after ``n`` epochs (the schedule keeps the config's length: the LR stays high, as wanted for a
    few steps)."""
    return [f"train_cfg.max_epochs={n}"]


def ds_train(config: Path, ds_json: str, work_dir: Path, options: List[str], *extra: str,
             via_slidechat: bool = False) -> Dict:
    """Stock ``xtuner train CONFIG --deepspeed JSON`` as one process: losses (from mmengine's scalars)
    and the log text. The distributed variables are what a user sets (docs/training.md);
    ``via_slidechat``: ``slidechat train`` with none of them set (it sets a one-process world itself)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")
    dist = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for k in dist:
        env.pop(k, None)
    if not via_slidechat:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    head = [str(BIN / "slidechat"), "train"] if via_slidechat else [str(BIN / "xtuner"), "train"]
    cmd = [*head, str(config), "--deepspeed", str(DS / ds_json),
           "--work-dir", str(work_dir), *extra, "--cfg-options", *options]
    res = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    scal = glob.glob(str(work_dir / "*" / "vis_data" / "scalars.json"))
    assert res.returncode == 0 and "Traceback" not in out and len(scal) == 1, out[-4000:]
    rows = [json.loads(line) for line in Path(scal[0]).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    assert rows and np.isfinite([r["loss"] for r in rows]).all(), out[-4000:]
    return {"rows": rows, "log": out, "last": (work_dir / "last_checkpoint").read_text().strip()}


def _falls(rows: List[Dict], k: int, by: float) -> None:
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-k:]) < np.mean(losses[:k]) - by, losses


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return slide_train_demo(tmp_path_factory.mktemp("ds_demo"))


@pytest.fixture(scope="module")
def stage1_zero2(demo):
    """Stage 1 (LLM frozen) under ZeRO-2: 2 epochs of 4 steps, a checkpoint folder per epoch."""
    wd = demo["root"] / "stage1_zero2"
    opts = path_overrides(demo["llm"], demo["stage1"], demo["features"]) + _epochs(2)
    run = ds_train(TINY1, "deepspeed_zero2.json", wd, opts)
    return {"work_dir": wd, "opts": opts, **run}


def test_zero2_stage1_trains_and_saves_a_loadable_folder(demo, stage1_zero2):
    from slidechat.engine.builder import build_model_from_config
    from slidechat.model.checkpoint import load_weights

    rows = stage1_zero2["rows"]
    assert len(rows) == 8  # 8 slides / batch 2 x 2 epochs
    _falls(rows, 4, 0.02)
    ckpt = Path(stage1_zero2["last"])
    assert ckpt.name == "epoch_2.pth" and (ckpt / "mp_rank_00_model_states.pt").is_file()
    sd = load_weights(ckpt)  # frozen LLM excluded, as in the non-DeepSpeed checkpoints
    assert sd and all(k.startswith(("LongNet_encoder.", "projector.model.")) for k in sd)
    core, _ = build_model_from_config(TINY1, resolve_checkpoint(stage1_zero2["work_dir"]),
                                      cfg_options=parse_cfg_options(stage1_zero2["opts"]))
    own = core.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def test_zero2_resume_repeats_the_uninterrupted_run(demo, stage1_zero2, tmp_path):
    """``--resume WORK_DIR/epoch_1.pth`` (a DeepSpeed folder): weights, optimizer, schedule and data
    order come back, so steps 5-8 give the losses of the run that was not interrupted."""
    first = Path(stage1_zero2["work_dir"]) / "epoch_1.pth"
    run = ds_train(TINY1, "deepspeed_zero2.json", tmp_path / "resumed", stage1_zero2["opts"],
                   "--resume", str(first))
    assert "resumed epoch: 1, iter: 4" in run["log"]
    assert [r["step"] for r in run["rows"]] == [5, 6, 7, 8]
    old = {r["step"]: r["loss"] for r in stage1_zero2["rows"]}
    # fp32 on a CPU: float noise at most (observed: bit for bit); bf16 on a GPU: rounding of bf16
    rel = 1e-5 if not torch.cuda.is_available() else 2e-2
    for r in run["rows"]:
        assert r["loss"] == pytest.approx(old[r["step"]], rel=rel)


@pytest.fixture(scope="module")
def stage2_zero3(demo, stage1_zero2, tmp_path_factory):
    """Stage 2 (everything trained) under ZeRO-3 from the ZeRO-2 stage-1 work dir: 2 epochs of 16 steps."""
    wd = tmp_path_factory.mktemp("stage2_zero3") / "wd"
    opts = path_overrides(demo["llm"], demo["stage2"], demo["features"], stage1_zero2["work_dir"]) + _epochs(2)
    return {"work_dir": wd, "opts": opts, **ds_train(TINY2, "deepspeed_zero3.json", wd, opts)}


def test_zero3_stage2_partitions_the_llm_and_its_checkpoint_tests(demo, stage2_zero3, tmp_path):
    """ZeRO-3 saves the weights only as fp32 optimizer partitions (the model-states file holds 0-element
    placeholders): ``slidechat test`` gathers them and tests the trained model."""
    from slidechat.cli.main import main as slidechat_main
    from slidechat.engine.train_model import consolidate_zero3, is_zero3_folder
    from safetensors.torch import load_file

    run, wd, opts = stage2_zero3, stage2_zero3["work_dir"], stage2_zero3["opts"]
    assert "Loaded pretrained_pth" in run["log"] and "missing none" in run["log"]
    _falls(run["rows"], 4, 0.1)
    ckpt = Path(run["last"])
    assert is_zero3_folder(ckpt)
    sd = consolidate_zero3(ckpt)
    ref = load_file(str(Path(demo["llm"]) / "model.safetensors"))
    changed = [k for k, v in ref.items() if not torch.equal(sd["llm." + k], v)]
    assert len(changed) > 0.9 * len(ref)  # the partitioned LLM was trained and gathered back
    out = tmp_path / "out.csv"
    rc = slidechat_main(["test", str(TINY2), "--checkpoint", str(wd), "--test_slide_csv", str(demo["test_vqa"]),
                         "--test_output_csv", str(out), "--feature_root", str(demo["features"]),
                         "--feature_template", "{feature_root}/{Slide}", "--max_new_tokens", "4",
                         "--work-dir", str(tmp_path / "test_wd"), "--cfg-options", *opts])
    assert rc == 0
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["n_rows"] == 16 and report["n_errors"] == 0


def test_zero3_resume_repeats_the_uninterrupted_run(stage2_zero3, tmp_path):
    """ZeRO-3 resume of stage 2 (the LLM partitioned): DeepSpeed restores the fp32 partitions and the
    optimizer state, so the second epoch repeats the uninterrupted run's losses."""
    first = Path(stage2_zero3["work_dir"]) / "epoch_1.pth"
    run = ds_train(TINY2, "deepspeed_zero3.json", tmp_path / "resumed", stage2_zero3["opts"],
                   "--resume", str(first))
    assert "resumed epoch: 1, iter: 16" in run["log"]
    assert [r["step"] for r in run["rows"]] == list(range(17, 33))
    old = {r["step"]: r["loss"] for r in stage2_zero3["rows"]}
    rel = 1e-5 if not torch.cuda.is_available() else 2e-2  # as in the ZeRO-2 resume test
    for r in run["rows"]:
        assert r["loss"] == pytest.approx(old[r["step"]], rel=rel)


def test_zero3_pretrained_pth_with_llm_weights_fills_the_partitioned_llm(demo, stage2_zero3, tmp_path):
    """``pretrained_pth`` holding ``llm.*`` (a stage-2 checkpoint) under ZeRO-3, where the LLM is built
    partitioned before it is read: the weights go in gathered, so training starts where stage 2 ended
    (first loss far below a fresh start's), not from the tiny LLM folder."""
    opts = path_overrides(demo["llm"], demo["stage2"], demo["features"], stage2_zero3["work_dir"]) + _epochs(1)
    run = ds_train(TINY2, "deepspeed_zero3.json", tmp_path / "again", opts)
    assert "shape mismatch none" in run["log"]
    assert run["rows"][0]["loss"] < stage2_zero3["rows"][0]["loss"] - 0.5, (run["rows"][0], stage2_zero3["rows"][0])


def test_zero3_lora_trains_adapters_only(demo, stage1_zero2, tmp_path):
    """stage_2_lora under ZeRO-3: PEFT wraps the partitioned LLM; only adapters and slide modules train
    and the consolidated checkpoint merges on load."""
    from slidechat.engine.builder import build_model_from_config
    from slidechat.engine.train_model import consolidate_zero3

    wd = tmp_path / "lora_zero3"
    opts = path_overrides(demo["llm"], demo["stage2"], demo["features"], stage1_zero2["work_dir"]) + _epochs(1)
    run = ds_train(TINY2_LORA, "deepspeed_zero3.json", wd, opts)
    _falls(run["rows"], 4, 0.05)
    sd = consolidate_zero3(run["last"])
    llm_keys = [k for k in sd if k.startswith("llm.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)
    assert any(float(sd[k].abs().sum()) > 0 for k in llm_keys if "lora_B" in k)  # lora_B starts at 0
    core, _ = build_model_from_config(TINY2_LORA, resolve_checkpoint(wd), cfg_options=parse_cfg_options(opts))
    assert not any("lora_" in k for k in core.llm.state_dict())


def test_zero2_offload_trains_with_the_configs_adamw(demo, tmp_path):
    """deepspeed_zero2_offload.json: optimizer state on the CPU, stepped by the config's torch AdamW
    (``zero_force_ds_cpu_optimizer: false``), so DeepSpeedCPUAdam is never JIT-built. Run through
    ``slidechat train`` with no distributed variables set: it gives DeepSpeed a one-process world
    (stock xtuner would stop on ``No module named 'mpi4py'``)."""
    wd = tmp_path / "stage1_offload"
    opts = path_overrides(demo["llm"], demo["stage1"], demo["features"]) + _epochs(1)
    run = ds_train(TINY1, "deepspeed_zero2_offload.json", wd, opts, via_slidechat=True)
    assert "setting RANK=0 WORLD_SIZE=1" in run["log"]
    assert len(run["rows"]) == 4 and "cpu_adam" not in run["log"].lower()
    assert (Path(run["last"]) / "mp_rank_00_model_states.pt").is_file()


class _Payload:
    """Pickles as a call of ``os.makedirs(marker)``: proof of code execution if it ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_crafted_zero3_folder_is_refused_without_running_code(tmp_path):
    """ZeRO-3 consolidation reads DeepSpeed's files weights-only: a pickled call is a one-line refusal."""
    from slidechat.engine.train_model import consolidate_zero3, is_zero3_folder
    from slidechat.utils.errors import SlideChatError

    folder = tmp_path / "work" / "epoch_1.pth"
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "shared_params": {},
                "meta": _Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": 1, "fp32_flat_groups": [],
                                         "x": _Payload(marker)}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert is_zero3_folder(folder)
    with pytest.raises(SlideChatError, match="refusing") as err:
        consolidate_zero3(folder)
    assert "\n" not in str(err.value) and not marker.exists()
