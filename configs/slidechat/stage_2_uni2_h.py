# SlideChat stage 2 on UNI2-h patch features (1536-d; see configs/slidechat/stage_1_uni2_h.py):
# configs/slidechat/stage_2.py with only the feature width, the feature folder and the stage-1 result
# (a run of stage_1_uni2_h.py: its weights hold the 1536 -> 512 input projection) changed.
#   NPROC_PER_NODE=8 xtuner train configs/slidechat/stage_2_uni2_h.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/stage2_uni2_h
from mmengine.config import read_base

with read_base():
    from .stage_2 import *  # noqa: F401,F403

feature_dim = 1536
feature_root = 'dataset/features_uni2_h'  # one encoder's features per folder
pretrained_pth = 'work_dirs/stage1_uni2_h'

# mmengine resolved stage 2's variables when it read that file: each change is also set where it is used
model.update(pretrained_pth=pretrained_pth)  # noqa: F405
model['slidechat_config'].update(feature_dim=feature_dim)  # noqa: F405
train_dataset.update(feature_root=feature_root, feature_dim=feature_dim)  # noqa: F405
train_dataloader['dataset'].update(feature_root=feature_root, feature_dim=feature_dim)  # noqa: F405
