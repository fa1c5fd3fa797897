# SlideChat stage 2 with LoRA on the LLM (one GPU): slide encoder + projector + LoRA adapters trained
# on the VQA data, starting from the stage-1 weights. Everything else is configs/slidechat/stage_2.py,
# which this file extends (paths: edit PART 1 there, or override the nested keys as described there).
#   xtuner train configs/slidechat/stage_2_lora.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/stage2_lora
# Checkpoints hold the adapters (llm.*lora_*) + encoder + projector; export/test merge them.
from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .stage_2 import *  # noqa: F401,F403

lr = 2e-4  # LoRA adapters take a larger lr than full fine-tuning
model.update(  # noqa: F405
    freeze_llm=True,  # base weights frozen; LoRA adapters trained
    # target_modules None: every Linear except lm_head
    llm_lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.05, bias='none',
                  task_type='CAUSAL_LM'))
optim_wrapper['optimizer']['lr'] = lr  # noqa: F405
