# CytoChat-style supervised fine-tuning of Qwen2-VL-7B-Instruct on LLaMA-Factory cytology datasets, with
# stock xtuner (xtuner 0.2.0 has no Qwen2-VL support; the model is slidechat's Qwen2VLTrainModel).
# Recipe = LLaMA-Factory's (the framework CytoChat trained with; its examples/train_full/qwen2_5vl_full_sft.yaml
# at the commit CytoChat pins): template qwen2_vl, cutoff_len 2048, full fine-tune of the language model
# with the vision tower AND the merger frozen (freeze_vision_tower / freeze_multi_modal_projector: true),
# AdamW (0.9, 0.999), weight decay 0, lr 1e-5, cosine with 10% warmup, 3 epochs, batch 1 x accumulation 2
# per GPU, max grad norm 1.0, bf16. Images: LLaMA-Factory's scaling with CytoChat's inference defaults
# (image_max_pixels 768*768, image_min_pixels 32*32; LLaMA-Factory's example trains at 512*512 = 262144).
# CytoChat's own training hyperparameters are not published; these are the framework defaults.
#   NPROC_PER_NODE=8 xtuner train configs/cytochat/qwen2vl_sft.py \
#       --deepspeed configs/deepspeed/deepspeed_zero3.json --work-dir work_dirs/cytochat_sft
#   slidechat export configs/cytochat/qwen2vl_sft.py --checkpoint work_dirs/cytochat_sft --out CytoChat-sft
# (ZeRO-3 shards the 7B model; ZeRO-2 also works with enough memory. Without --deepspeed: bf16 autocast.)
# Paths are read at parse time; override the nested keys, e.g.
#   --cfg-options model.model_name_or_path=/models/Qwen2-VL-7B-Instruct \
#     train_dataloader.dataset.processor=/models/Qwen2-VL-7B-Instruct \
#     train_dataloader.dataset.dataset_dir=/data/cyto train_dataloader.dataset.dataset=cyto_train
# Qwen2.5-VL / Qwen3-VL: the same config; the folder's config.json model_type selects the family (model
# class, processor, freeze paths). For Qwen3-VL also set its LLaMA-Factory template:
#     train_dataloader.dataset.template=qwen3_vl   (or None: the family's template)
# Train the vision tower too: model.freeze_vision_tower=False (and/or model.freeze_multi_modal_projector=False).
# Resume: add  --resume work_dirs/cytochat_sft/iter_N.pth  (or --cfg-options resume=True for the latest).
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from mmengine.visualization import LocalVisBackend, Visualizer
from torch.optim import AdamW
from xtuner.engine.runner import TrainLoop

from slidechat.data.cytology_dataset import CytologySFTDataset, qwen2vl_collate_fn
from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel
# mmengine reads this file in lazy-import mode: the imports above run only when the model is built, but
# `xtuner train --resume` reads the checkpoint before that; this import installs the safe loaders now
# (resume: weights-only with mmengine's own classes allowed; see install_safe_xtuner_loader)
__import__('slidechat.engine.train_model')

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# a local folder: Qwen2-VL-*-Instruct, CytoChat's released weights, or a slidechat export
model_name_or_path = 'Qwen/Qwen2-VL-7B-Instruct'
dataset_dir = 'data'  # holds dataset_info.json (LLaMA-Factory's registry)
dataset = 'cyto_train'  # comma-separated registered names, or a JSON/JSONL path
template = 'qwen2_vl'
cutoff_len = 2048
image_max_pixels = 768 * 768
image_min_pixels = 32 * 32
max_samples = None
skip_bad = False  # True: bad rows are skipped and counted instead of stopping the run
check_images = True  # open every image header before training (False: only when a row is loaded)
freeze_vision_tower = True
freeze_multi_modal_projector = True
pretrained_pth = None  # optional start weights: a checkpoint of this config or a HF folder

batch_size = 1  # per device
accumulative_counts = 2
dataloader_num_workers = 4
max_epochs = 3
lr = 1e-5
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.1
save_steps = 500
save_total_limit = 2

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
model = dict(
    type=Qwen2VLTrainModel,
    model_name_or_path=model_name_or_path,
    torch_dtype='bfloat16',
    freeze_vision_tower=freeze_vision_tower,
    freeze_multi_modal_projector=freeze_multi_modal_projector,
    freeze_language_model=False,
    lora=None,
    pretrained_pth=pretrained_pth,
    use_activation_checkpointing=True)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(type=CytologySFTDataset, dataset=dataset, dataset_dir=dataset_dir,
                     processor=model_name_or_path, template=template, cutoff_len=cutoff_len,
                     image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels,
                     max_samples=max_samples, skip_bad=skip_bad, check_images=check_images)

train_dataloader = dict(batch_size=batch_size, num_workers=dataloader_num_workers,
                        dataset=train_dataset, sampler=dict(type=DefaultSampler, shuffle=True),
                        collate_fn=dict(type=qwen2vl_collate_fn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# Without --deepspeed: bf16 autocast via AmpOptimWrapper. With --deepspeed, xtuner replaces this by a
# DeepSpeedOptimWrapper with the same optimizer, accumulation and clipping; bf16 comes from the JSON.
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='bfloat16')

param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0,
         end=warmup_ratio * max_epochs, convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs,
         end=max_epochs, convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps,
                    max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
