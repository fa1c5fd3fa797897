# Tiny CPU run of configs/cytochat/qwen2vl_lora.py: LoRA adapters (peft) on every Linear of the
# Qwen2-VL language model (LLaMA-Factory's lora_target: all, vision tower and merger frozen), base
# weights frozen. Same data and paths as configs/tiny/cytochat_sft.py, which this file extends.
from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .cytochat_sft import *  # noqa: F401,F403

lr = 1e-2
model.update(  # noqa: F405
    lora=dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, bias='none'))
optim_wrapper['optimizer']['lr'] = lr  # noqa: F405
