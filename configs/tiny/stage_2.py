# Tiny CPU run of SlideChat stage 2 (everything trained, starting from the stage-1 weights) on the
# synthetic demo VQA: same pipeline as configs/slidechat/stage_2.py, small sizes, fp32, no DeepSpeed.
# Everything else is configs/tiny/stage_1.py, which this file extends, changing only what stage 2 changes.
#   python tools/make_tiny_llm.py --out work_dirs/demo/tiny_llm
#   python tools/make_synthetic_dataset.py --manifest <slides>/manifest.csv --out work_dirs/demo/data
#   xtuner train configs/tiny/stage_1.py --work-dir work_dirs/demo/stage1
#   xtuner train configs/tiny/stage_2.py --work-dir work_dirs/demo/stage2
# Paths can be overridden: --cfg-options llm_name_or_path=... data_path=... feature_root=...
from mmengine.config import read_base

with read_base():
    from .stage_1 import *  # noqa: F401,F403

# a checkpoint file, a DeepSpeed checkpoint folder, or a work dir (its last checkpoint is used)
pretrained_pth = 'work_dirs/demo/stage1'
data_path = 'work_dirs/demo/data/stage2_vqa.json'
max_epochs = 6
lr = 1e-3

# mmengine resolved stage 1's variables when it read that file: each change is also set where it is used
model.update(freeze_llm=False, train_stage='2', pretrained_pth=pretrained_pth)  # noqa: F405
train_dataset.update(data_path=data_path)  # noqa: F405
train_dataloader['dataset'].update(data_path=data_path)  # noqa: F405
optim_wrapper['optimizer']['lr'] = lr  # noqa: F405
param_scheduler[1]['end'] = max_epochs  # noqa: F405
train_cfg['max_epochs'] = max_epochs  # noqa: F405
