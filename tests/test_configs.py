"""The real-size configs parse and carry the released SlideChat hyperparameters (FACTS.md)."""

import json
from pathlib import Path
from typing import Any, Dict

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


#: what stage 2 changes over stage 1 (SlideChat's recipe: the LLM unfrozen, lr 2e-5, 2 epochs,
#: max_length 19,600, stage 1's weights and the VQA data; the tiny CPU configs halve their epochs); every
#: other key of the extended config must be stage 1's, nested copies included
STAGE_2_CHANGES = {
    "slidechat": {"data_path": "dataset/slideinstruction/stage2_vqa.json", "lr": 2e-5, "max_epochs": 2,
                  "max_length": 19600, "pretrained_pth": "work_dirs/stage1", "freeze_llm": False},
    "tiny": {"data_path": "work_dirs/demo/data/stage2_vqa.json", "lr": 1e-3, "max_epochs": 6,
             "pretrained_pth": "work_dirs/demo/stage1", "freeze_llm": False},
}


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


#: every key of a config that holds a copy of each setting (mmengine copies variables into the dicts)
PLACES = {"data_path": ["data_path", "train_dataset.data_path", "train_dataloader.dataset.data_path"],
          "lr": ["lr", "optim_wrapper.optimizer.lr"],
          "max_epochs": ["max_epochs", "train_cfg.max_epochs"],
          "max_length": ["max_length", "train_dataset.max_length", "train_dataloader.dataset.max_length"],
          "pretrained_pth": ["pretrained_pth", "model.pretrained_pth"],
          "freeze_llm": ["model.freeze_llm"],
          "feature_dim": ["feature_dim", "model.slidechat_config.feature_dim", "train_dataset.feature_dim",
                          "train_dataloader.dataset.feature_dim"],
          "feature_root": ["feature_root", "train_dataset.feature_root", "train_dataloader.dataset.feature_root"]}


def _changed(base: Dict[str, Any], change: Dict[str, Any]) -> Dict[str, Any]:
    """``base``'s flattened keys with each change written at every place the config copies it to."""
    exp = _flat(base)
    for name, value in change.items():
        for key in PLACES[name]:
            assert key in exp, key
            exp[key] = value
    return exp


def _expected_stage_2(stage_1: Dict[str, Any], change: Dict[str, Any]) -> Dict[str, Any]:
    """Stage 1's keys with stage 2's changes written where the config copies each value."""
    exp = _changed(stage_1, change)
    exp["model.train_stage"] = "2"
    sched = [dict(s) for s in stage_1["param_scheduler"]]
    if stage_1.get("warmup_ratio") is not None:  # warmup is a share of the (new) epochs
        sched[0]["end"] = sched[1]["begin"] = stage_1["warmup_ratio"] * change["max_epochs"]
    sched[1]["end"] = change["max_epochs"]
    exp["param_scheduler"] = sched
    return exp


@pytest.mark.parametrize("folder", sorted(STAGE_2_CHANGES))
def test_stage_2_extends_stage_1_changing_only_stage_2s_settings(folder):
    """Stage 2 extends stage 1 through ``read_base``: its keys are stage 1's, in stage 1's order, except
    what stage 2 changes, and each change reaches every nested copy of the value (mmengine resolves
    variables when the file is read, so a forgotten copy would keep stage 1's value)."""
    one = Config.fromfile(str(REPO / "configs" / folder / "stage_1.py")).to_dict()
    two = Config.fromfile(str(REPO / "configs" / folder / "stage_2.py")).to_dict()
    assert list(two) == list(one)
    assert _flat(two) == _expected_stage_2(one, STAGE_2_CHANGES[folder])
    assert "read_base" in (REPO / "configs" / folder / "stage_2.py").read_text(encoding="utf-8")


#: the encoder configs: (file, the CONCH config it extends, the features' width, their folder). Widths
#: from the model cards: UNI2-h's class token, 1,536-d (https://huggingface.co/MahmoodLab/UNI2-h);
#: Virchow2's class token + mean patch token, 2 x 1,280 = 2,560-d (https://huggingface.co/paige-ai/Virchow2)
ENCODER_CONFIGS = [("stage_1_uni2_h.py", "stage_1.py", 1536, "dataset/features_uni2_h"),
                   ("stage_2_uni2_h.py", "stage_2.py", 1536, "dataset/features_uni2_h"),
                   ("stage_1_virchow2.py", "stage_1.py", 2560, "dataset/features_virchow2"),
                   ("stage_2_virchow2.py", "stage_2.py", 2560, "dataset/features_virchow2")]


@pytest.mark.parametrize("name,base,dim,root", ENCODER_CONFIGS)
def test_encoder_configs_change_only_the_features(name, base, dim, root):
    """A new patch encoder changes ``feature_dim`` and nothing else (its feature folder, and in stage 2 the
    stage-1 run it starts from, being paths): the LongNet keeps its released size, the model adds the
    input projection itself."""
    conch, new = _cfg(base).to_dict(), _cfg(name).to_dict()
    change = {"feature_dim": dim, "feature_root": root}
    if base == "stage_2.py":
        change["pretrained_pth"] = "work_dirs/stage1_" + name[len("stage_2_"):-len(".py")]
    assert list(new) == list(conch)
    assert _flat(new) == _changed(conch, change)
    assert "read_base" in (REPO / "configs" / "slidechat" / name).read_text(encoding="utf-8")


def test_encoder_config_widths_are_the_presets():
    """Each encoder config's width is its registered preset's dimension."""
    from slidechat.features.encoders import get_preset

    for name, _, dim, root in ENCODER_CONFIGS:
        preset, _ = get_preset(root.rsplit("features_", 1)[1])
        assert preset.dim == dim, (name, preset.dim)
