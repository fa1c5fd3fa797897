# SlideChat stage 1 on Virchow2 patch features (https://huggingface.co/paige-ai/Virchow2: the class token and the mean of the patch tokens, 2 x 1,280 = 2,560-d),
# extracted with  slidechat extract-features --encoder virchow2 --checkpoint WEIGHTS ... --out dataset/features_virchow2
# configs/slidechat/stage_1.py (CONCH, 512-d) with only the feature width and the feature folder changed:
# the LongNet slide encoder keeps its released size (512 wide) and the model puts a Linear 2560 -> 512 in
# front of it (input_proj, trained here with the encoder and the projector). See docs/training.md,
# "Features of other patch encoders". Training refuses a feature folder of another encoder or width.
#   NPROC_PER_NODE=8 xtuner train configs/slidechat/stage_1_virchow2.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/stage1_virchow2
from mmengine.config import read_base

with read_base():
    from .stage_1 import *  # noqa: F401,F403

feature_dim = 2560
feature_root = 'dataset/features_virchow2'  # one encoder's features per folder

# mmengine resolved stage 1's variables when it read that file: each change is also set where it is used
model['slidechat_config'].update(feature_dim=feature_dim)  # noqa: F405
train_dataset.update(feature_root=feature_root, feature_dim=feature_dim)  # noqa: F405
train_dataloader['dataset'].update(feature_root=feature_root, feature_dim=feature_dim)  # noqa: F405
