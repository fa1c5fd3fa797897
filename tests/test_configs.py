"""The real-size configs parse and carry the released SlideChat hyperparameters (FACTS.md)."""

import json
from pathlib import Path

import pytest
from mmengine.config import Config

REPO = Path(__file__).resolve().parents[1]
RELEASED_ENCODER = dict(embed_dim=512, ffn_dim=1024, num_heads=8, num_layers=2,
                        segment_lengths=[1024, 2048, 4096, 8192, 16384],
                        dilated_ratios=[1, 2, 4, 8, 16], dropout=0.1, drop_path=0.1)


def _cfg(name):
    return Config.fromfile(str(REPO / "configs" / "slidechat" / name))


def _common(c):
    enc = c.model.slidechat_config.encoder
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in enc.items()} == RELEASED_ENCODER
    assert c.model.slidechat_config.feature_dim == 512
    assert c.model.slidechat_config.max_patches_train == 10240
    assert c.model.slidechat_config.max_patches_test == 38400
    assert c.train_dataloader.batch_size == 1 and c.optim_wrapper.accumulative_counts == 8
    opt = c.optim_wrapper.optimizer
    assert tuple(opt.betas) == (0.9, 0.999) and opt.weight_decay == 0
    assert c.optim_wrapper.clip_grad.max_norm == 1
    assert c.model.llm.pretrained_model_name_or_path == c.tokenizer.pretrained_model_name_or_path
    assert c.test_cfg is not None and c.test_evaluator is not None  # xtuner test works on it


def test_stage_1_alignment():
    c = _cfg("stage_1.py")
    _common(c)
    assert c.model.freeze_llm is True and c.model.llm_lora is None and c.model.pretrained_pth is None
    assert c.optim_wrapper.optimizer.lr == 1e-3
    assert c.train_dataloader.dataset.max_length == 51200 and c.train_cfg.max_epochs == 5


def test_stage_2_instruction_tuning():
    c = _cfg("stage_2.py")
    _common(c)
    assert c.model.freeze_llm is False and c.model.llm_lora is None and c.model.pretrained_pth
    assert c.optim_wrapper.optimizer.lr == 2e-5
    assert c.train_dataloader.dataset.max_length == 19600 and c.train_cfg.max_epochs == 2


def test_stage_2_lora_extends_stage_2():
    c, base = _cfg("stage_2_lora.py"), _cfg("stage_2.py")
    _common(c)
    assert c.model.freeze_llm is True and c.model.llm_lora.r == 64
    assert c.optim_wrapper.optimizer.lr == 2e-4
    assert c.model.pretrained_pth == base.model.pretrained_pth
    assert c.train_dataloader.dataset.max_length == base.train_dataloader.dataset.max_length


@pytest.mark.parametrize("name,stage,offload", [("deepspeed_zero2.json", 2, False),
                                                ("deepspeed_zero3.json", 3, False),
                                                ("deepspeed_zero2_offload.json", 2, True)])
def test_deepspeed_json(name, stage, offload):
    ds = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload
    assert ds["bf16"]["enabled"] == "auto" and ds["gradient_accumulation_steps"] == "auto"


#: the commit before the stage-2 configs extended their stage-1 config (read_base); their settings then
#: were written out whole, and the extended configs must give every key the same value
FLAT_STAGE_2 = "6226f87"


def _old_configs(tmp_path: Path, folder: str) -> Path:
    """``configs/<folder>`` as it was at :data:`FLAT_STAGE_2` (its files import each other by relative
    path, so the whole folder is written out)."""
    import subprocess

    try:
        names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", FLAT_STAGE_2,
                                f"configs/{folder}/"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with commit {FLAT_STAGE_2} is not available")
    out = tmp_path / folder
    out.mkdir(parents=True)
    for name in names:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{FLAT_STAGE_2}:{name}"], capture_output=True,
                              text=True, check=True).stdout
        (out / Path(name).name).write_text(text, encoding="utf-8")
    return out


@pytest.mark.parametrize("folder,name", [("slidechat", "stage_2.py"), ("slidechat", "stage_2_qwen3_8b.py"),
                                         ("tiny", "stage_2.py"), ("slidechat", "stage_2_lora.py"),
                                         ("tiny", "stage_2_lora.py")])
def test_stage_2_configs_extending_stage_1_equal_the_flat_ones(tmp_path, folder, name):
    """Every key of a stage-2 config that extends its stage-1 config through ``read_base`` has the value
    the self-contained file gave it."""
    old = Config.fromfile(str(_old_configs(tmp_path, folder) / name)).to_dict()
    new = Config.fromfile(str(REPO / "configs" / folder / name)).to_dict()
    assert list(new) == list(old)
    for key in old:
        assert new[key] == old[key], key
