# SlideChat stage 1 on Qwen3-8B: configs/slidechat/stage_1.py (the released Qwen2.5-7B recipe) with only
# the LLM folder and the prompt format changed. Qwen3 prompts go through its own chat template
# ('chat_template'), thinking off (enable_thinking=False: the empty think block closes every answer's
# prompt, as Qwen3 renders it for a non-thinking reply); the projector follows the LLM's hidden size
# (4096) by itself. See docs/training.md, "Choosing the LLM".
#   NPROC_PER_NODE=8 xtuner train configs/slidechat/stage_1_qwen3_8b.py \
#       --deepspeed configs/deepspeed/deepspeed_zero2.json --work-dir work_dirs/stage1_qwen3_8b
# Paths: edit llm_name_or_path below, or override the nested keys as in stage_1.py.
from mmengine.config import read_base

with read_base():
    from .stage_1 import *  # noqa: F401,F403

llm_name_or_path = 'Qwen/Qwen3-8B'  # a local folder (no hub access at run time)
prompt_template = 'chat_template'
chat_template_kwargs = dict(enable_thinking=False)

tokenizer.update(pretrained_model_name_or_path=llm_name_or_path)  # noqa: F405
model['llm'].update(pretrained_model_name_or_path=llm_name_or_path)  # noqa: F405
model['slidechat_config'].update(prompt_template=prompt_template,  # noqa: F405
                                 chat_template_kwargs=chat_template_kwargs)
train_dataloader['dataset'].update(tokenizer=tokenizer, template=prompt_template,  # noqa: F405
                                   chat_template_kwargs=chat_template_kwargs)
