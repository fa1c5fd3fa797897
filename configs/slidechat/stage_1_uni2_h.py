# SlideChat stage 1 on UNI2-h patch features (https://huggingface.co/MahmoodLab/UNI2-h: the class token, 1,536-d),
# extracted with  slidechat extract-features --encoder uni2_h --checkpoint WEIGHTS ... --out dataset/features_uni2_h
# configs/slidechat/stage_1.py (CONCH, 512-d) with only the feature width and the feature folder changed:
# the LongNet slide encoder keeps its released size (512 wide) and the model puts a Linear 1536 -> 512 in
# front of it (input_proj, trained here with the encoder and the projector). See docs/training.md,
# "Features of other patch encoders". Training refuses a feature folder of another encoder or width.
#   NPROC_PER_NODE=8 xtuner train configs/slidechat/stage_1_uni2_h.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/stage1_uni2_h
from mmengine.config import read_base

with read_base():
    from .stage_1 import *  # noqa: F401,F403

feature_dim = 1536
feature_root = 'dataset/features_uni2_h'  # one encoder's features per folder

# mmengine resolved stage 1's variables when it read that file: each change is also set where it is used
model['slidechat_config'].update(feature_dim=feature_dim)  # noqa: F405
train_dataset.update(feature_root=feature_root, feature_dim=feature_dim)  # noqa: F405
train_dataloader['dataset'].update(feature_root=feature_root, feature_dim=feature_dim)  # noqa: F405
