# SlideChat stage 2 (visual instruction learning): everything trained on the VQA data, starting from
# the stage-1 weights (pretrained_pth). Released hyperparameters: batch 1 x accumulative 8 per GPU,
# AdamW (0.9, 0.999), weight decay 0, lr 2e-5, max_norm 1, cosine with 3% warmup, max_length 19,600.
# Everything else (LLM, encoder, sizes, runtime, the SlideBench test section) is
# configs/slidechat/stage_1.py, which this file extends, changing only what stage 2 changes.
#   NPROC_PER_NODE=8 xtuner train configs/slidechat/stage_2.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/stage2
# Paths: edit PART 1 of stage_1.py (the LLM, feature_root) and the stage-2 paths below, or override the
# nested keys (see slidechat.engine.overrides.path_overrides), e.g.
#   --cfg-options model.llm.pretrained_model_name_or_path=/models/Qwen2.5-7B-Instruct \
#     tokenizer.pretrained_model_name_or_path=/models/Qwen2.5-7B-Instruct \
#     train_dataloader.dataset.tokenizer.pretrained_model_name_or_path=/models/Qwen2.5-7B-Instruct \
#     train_dataloader.dataset.data_path=... train_dataloader.dataset.feature_root=...
# Resume: add  --resume work_dirs/stage2/iter_N.pth  (or --cfg-options resume=True for the latest).
from mmengine.config import read_base

with read_base():
    from .stage_1 import *  # noqa: F401,F403

# stage-1 result: iter_N.pth, a DeepSpeed checkpoint folder, or the stage-1 work dir (latest)
pretrained_pth = 'work_dirs/stage1'
data_path = 'dataset/slideinstruction/stage2_vqa.json'  # SlideInstruction stage-2 JSON
max_length = 19600
max_epochs = 2  # the released run used 2 (the README says 1)
lr = 2e-5

# mmengine resolved stage 1's variables when it read that file: each change is also set where it is used
model.update(freeze_llm=False, train_stage='2', pretrained_pth=pretrained_pth)  # noqa: F405
train_dataset.update(data_path=data_path, max_length=max_length)  # noqa: F405
train_dataloader['dataset'].update(data_path=data_path, max_length=max_length)  # noqa: F405
optim_wrapper['optimizer']['lr'] = lr  # noqa: F405
param_scheduler[0]['end'] = param_scheduler[1]['begin'] = warmup_ratio * max_epochs  # noqa: F405
param_scheduler[1]['end'] = max_epochs  # noqa: F405
train_cfg['max_epochs'] = max_epochs  # noqa: F405
