# Tiny CPU run of configs/cytochat/qwen2vl_sft.py (CytoChat-style full fine-tune of Qwen2-VL, vision tower
# and merger frozen) on the synthetic cytology fields: same pipeline, tiny random Qwen2-VL, fp32, no
# DeepSpeed, smaller images (image_max_pixels 224x224 instead of 768x768) so it runs in seconds.
#   python tools/make_tiny_qwen2vl.py --out work_dirs/demo/tiny_qwen2vl
#   python tools/make_synthetic_cytology.py fields --out work_dirs/demo/cytology   # (see its --help)
#   xtuner train configs/tiny/cytochat_sft.py --work-dir work_dirs/demo/cytochat_sft
#   slidechat export configs/tiny/cytochat_sft.py --checkpoint work_dirs/demo/cytochat_sft \
#       --out work_dirs/demo/cytochat_sft_hf
# Paths are read at parse time; to override them pass the nested keys, e.g.
#   --cfg-options model.model_name_or_path=DIR train_dataloader.dataset.processor=DIR \
#     train_dataloader.dataset.dataset_dir=DATA train_dataloader.dataset.dataset=cyto_train
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from mmengine.runner import EpochBasedTrainLoop
from mmengine.visualization import LocalVisBackend, Visualizer
from torch.optim import AdamW

from slidechat.data.cytology_dataset import CytologySFTDataset, qwen2vl_collate_fn
from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel
# mmengine reads this file in lazy-import mode: the imports above run only when the model is built, but
# `xtuner train --resume` reads the checkpoint before that; this import installs the safe loaders now
# (resume: weights-only with mmengine's own classes allowed; see install_safe_xtuner_loader)
__import__('slidechat.engine.train_model')

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model_name_or_path = 'work_dirs/demo/tiny_qwen2vl'
dataset_dir = 'work_dirs/demo/cytology'
dataset = 'cyto_train'  # comma-separated names in dataset_dir/dataset_info.json, or a JSON/JSONL path
template = None  # the model folder's family's LLaMA-Factory template (qwen2_vl / qwen3_vl)
cutoff_len = 1024
image_max_pixels = 224 * 224
image_min_pixels = 32 * 32
max_samples = None
skip_bad = False
freeze_vision_tower = True
freeze_multi_modal_projector = True
pretrained_pth = None

batch_size = 2
accumulative_counts = 1
dataloader_num_workers = 0
max_epochs = 4
lr = 5e-3
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_epochs = 1
save_epochs = 1
save_total_limit = 2

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
model = dict(
    type=Qwen2VLTrainModel,
    model_name_or_path=model_name_or_path,
    torch_dtype='float32',
    freeze_vision_tower=freeze_vision_tower,
    freeze_multi_modal_projector=freeze_multi_modal_projector,
    freeze_language_model=False,
    lora=None,
    pretrained_pth=pretrained_pth,
    use_activation_checkpointing=False)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(type=CytologySFTDataset, dataset=dataset, dataset_dir=dataset_dir,
                     processor=model_name_or_path, template=template, cutoff_len=cutoff_len,
                     image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels,
                     max_samples=max_samples, skip_bad=skip_bad)

train_dataloader = dict(batch_size=batch_size, num_workers=dataloader_num_workers,
                        dataset=train_dataset, sampler=dict(type=DefaultSampler, shuffle=True),
                        collate_fn=dict(type=qwen2vl_collate_fn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts)

param_scheduler = [
    dict(type=LinearLR, start_factor=0.1, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_epochs,
         end=max_epochs, convert_to_iter_based=True),
]

train_cfg = dict(type=EpochBasedTrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=True, interval=save_epochs,
                    max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)
