# Tiny CPU run of SlideChat stage 1 (slide encoder + projector trained, LLM frozen) on the synthetic
# demo slides: same pipeline as configs/slidechat/stage_1.py, small sizes, fp32, no DeepSpeed.
# configs/tiny/stage_2.py extends this file (read_base): what stage 2 does not change is written here once.
#   python tools/make_tiny_llm.py --out work_dirs/demo/tiny_llm
#   python tools/make_synthetic_dataset.py --manifest <slides>/manifest.csv --out work_dirs/demo/data
#   xtuner train configs/tiny/stage_1.py --work-dir work_dirs/demo/stage1
# Paths can be overridden: --cfg-options llm_name_or_path=... data_path=... feature_root=...
import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from mmengine.runner import EpochBasedTrainLoop
from mmengine.visualization import LocalVisBackend, Visualizer
from torch.optim import AdamW

from slidechat.data.collate import slidechat_collate_fn
from slidechat.data.dataset import SlideInstructionDataset
from slidechat.model.hf_folder import CheckedCausalLM, CheckedTokenizer  # no folder code, no random weights
# importing slidechat.engine.train_model also makes `xtuner test --checkpoint` read through slidechat's
# safe loader (no pickle code runs; see install_safe_xtuner_loader)
from slidechat.engine.train_model import SlideChatTrainModel
# mmengine reads this file in lazy-import mode: the imports above run only when the model is built, but
# `xtuner train --resume` reads the checkpoint before that; this import installs the safe loaders now
# (resume: weights-only with mmengine's own classes allowed; see install_safe_xtuner_loader)
__import__('slidechat.engine.train_model')

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
llm_name_or_path = 'work_dirs/demo/tiny_llm'
pretrained_pth = None
data_path = 'work_dirs/demo/data/stage1_caption.json'
feature_root = 'work_dirs/demo/features/h5_files'
feature_dim = 512
# Prompt format (docs/training.md, "Choosing the LLM"): 'qwen_chat' is the format the released SlideChat
# (Qwen2.5-7B-Instruct) was trained with; 'chat_template' renders through the LLM tokenizer's own chat
# template (any Hugging Face causal LM), with chat_template_kwargs as extra template variables.
prompt_template = 'qwen_chat'
chat_template_kwargs = dict()
max_length = 1024
max_patches = 256

batch_size = 2
accumulative_counts = 1
dataloader_num_workers = 0
max_epochs = 12
lr = 2e-3
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1
warmup_epochs = 1
save_epochs = 1
save_total_limit = 2

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(type=CheckedTokenizer.from_pretrained, trust_remote_code=False,
                 pretrained_model_name_or_path=llm_name_or_path, padding_side='right')

model = dict(
    type=SlideChatTrainModel,
    freeze_llm=True,
    train_stage='1',
    pretrained_pth=pretrained_pth,
    llm_lora=None,
    compat=None,
    use_activation_checkpointing=False,
    llm=dict(type=CheckedCausalLM.from_pretrained, trust_remote_code=False,
             pretrained_model_name_or_path=llm_name_or_path, torch_dtype=torch.float32),
    slidechat_config=dict(
        feature_dim=feature_dim,
        # embed_dim stays the released 512 (512-d features enter the encoder directly; features of
        # another width, set by feature_dim alone, get a trained input projection); depth/width are cut
        encoder=dict(embed_dim=512, ffn_dim=256, num_heads=8, num_layers=1,
                     segment_lengths=[64, 128, 256], dilated_ratios=[1, 2, 4],
                     dropout=0.0, drop_path=0.0),
        max_patches_train=max_patches, max_patches_test=max_patches,
        prompt_template=prompt_template, chat_template_kwargs=chat_template_kwargs),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(type=SlideInstructionDataset, data_path=data_path, feature_root=feature_root,
                     tokenizer=tokenizer, max_length=max_length, max_patches=max_patches,
                     feature_dim=feature_dim, template=prompt_template,
                     chat_template_kwargs=chat_template_kwargs)

train_dataloader = dict(batch_size=batch_size, num_workers=dataloader_num_workers,
                        dataset=train_dataset, sampler=dict(type=DefaultSampler, shuffle=True),
                        collate_fn=dict(type=slidechat_collate_fn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts)

# warmup of one epoch: 3% of a few dozen iterations would round to less than one iteration
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

#######################################################################
#                     PART 6  SlideBench test                         #
#######################################################################
# xtuner test <this config> --checkpoint CKPT --cfg-options test_slide_csv=A.csv \
#     test_output_csv=B.csv [feature_root=DIR feature_template=... test_batch_size=8 max_new_tokens=500]
# (or: slidechat test <this config> --checkpoint CKPT --test_slide_csv A.csv --test_output_csv B.csv)
# The checkpoint must hold the trained modules (a partial one is refused; add
# model.allow_partial=True to --cfg-options to accept it with a warning). xtuner's launcher
# exits 0 even when the test fails: scripts should use `slidechat test`.
# The loop reads these TOP-LEVEL keys (the only ones --cfg-options can change) and resumes an
# interrupted output; feature_root above is reused unless overridden.
from slidechat.data.slidebench_dataset import SlideBenchTestDataset
from slidechat.engine.testing import SlideBenchMetric, SlideBenchTestLoop

test_slide_csv = None
test_output_csv = None
feature_template = None  # default: {feature_root}/{Tumor}/{Slide} when a Tumor column exists
test_batch_size = 8
max_new_tokens = 500
overwrite = False
test_dataloader = dict(batch_size=test_batch_size, num_workers=0,
                       dataset=dict(type=SlideBenchTestDataset),  # rows/tokenizer filled in by the loop
                       sampler=dict(type=DefaultSampler, shuffle=False))
test_evaluator = dict(type=SlideBenchMetric)
test_cfg = dict(type=SlideBenchTestLoop)
