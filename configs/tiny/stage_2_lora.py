# Tiny CPU run of configs/slidechat/stage_2_lora.py: stage 2 with the LLM frozen and LoRA adapters
# (peft) trained together with the slide encoder and projector. Same data and paths as
# configs/tiny/stage_2.py, which this file extends.
from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .stage_2 import *  # noqa: F401,F403

lr = 2e-3
model.update(  # noqa: F405
    freeze_llm=True,
    llm_lora=dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, bias='none',
                  task_type='CAUSAL_LM'))
optim_wrapper['optimizer']['lr'] = lr  # noqa: F405
