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
