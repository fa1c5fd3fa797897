# LoRA fine-tuning of Qwen2-VL-7B-Instruct (or of CytoChat's weights) on LLaMA-Factory cytology datasets.
# Recipe = LLaMA-Factory's examples/train_lora/qwen2_5vl_lora_sft.yaml (commit CytoChat pins):
# lora_rank 8, lora_alpha 16 (LLaMA-Factory's default 2 * rank), dropout 0, lora_target all = every
# Linear of the language model (vision tower, merger and lm_head excluded), lr 1e-4, batch 1 x
# accumulation 8, 3 epochs, cosine with 10% warmup, bf16. Everything else as configs/cytochat/qwen2vl_sft.py,
# which this file extends. Checkpoints hold only the adapter tensors; `slidechat export` merges them.
#   NPROC_PER_NODE=8 xtuner train configs/cytochat/qwen2vl_lora.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/cytochat_lora
#   slidechat export configs/cytochat/qwen2vl_lora.py --checkpoint work_dirs/cytochat_lora --out CytoChat-lora
from mmengine.config import read_base
from peft import LoraConfig

with read_base():
    from .qwen2vl_sft import *  # noqa: F401,F403

lr = 1e-4
accumulative_counts = 8
lora_rank = 8
model.update(  # noqa: F405
    use_activation_checkpointing=True,
    lora=dict(type=LoraConfig, r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, bias='none'))
optim_wrapper['optimizer']['lr'] = lr  # noqa: F405
optim_wrapper['accumulative_counts'] = accumulative_counts  # noqa: F405
