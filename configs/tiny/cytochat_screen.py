# Tiny CPU run that teaches the tiny random Qwen2-VL the screening question ("[Screening of Cytology
# Field] ... [A.Normal, B.Abnormal]") on native 224-px synthetic fields, for `slidechat screen` in the
# demo. Extends configs/tiny/cytochat_sft.py: same pipeline, but the vision tower and merger are trained
# too (a random tiny vision tower cannot see nuclei frozen), batch 8, 2 epochs. Measured: frozen tower on
# 512-px fields shrunk to 224^2 did not learn (field AUC 0.50); this recipe gives slide AUC 1.0 on
# held-out synthetic slides (benchmarks/RESULTS.md, README "Slide-level screening").
#   python tools/make_synthetic_cytology.py fields --out work_dirs/demo/cytology --n-fields 800 \
#       --size 224 --test-fraction 0.1
#   xtuner train configs/tiny/cytochat_screen.py --work-dir work_dirs/demo/cytochat_screen
from mmengine.config import read_base

with read_base():
    from .cytochat_sft import *  # noqa: F401,F403

dataset = 'cyto_screening_train'
batch_size = 8
max_epochs = 2
model.update(freeze_vision_tower=False, freeze_multi_modal_projector=False)  # noqa: F405
train_dataloader.update(batch_size=batch_size)  # noqa: F405
train_dataloader['dataset'].update(dataset=dataset)  # noqa: F405
param_scheduler[1].update(end=max_epochs)  # noqa: F405
train_cfg.update(max_epochs=max_epochs)  # noqa: F405
