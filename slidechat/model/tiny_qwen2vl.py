"""A tiny random Qwen2-VL (model + tokenizer + image processor + processor) built offline.

The folder it writes has the same layout as a real ``Qwen/Qwen2-VL-7B-Instruct`` folder (``config.json``
with ``model_type: qwen2_vl``, safetensors weights, a byte-level BPE tokenizer carrying Qwen2-VL's special
tokens, ``preprocessor_config.json`` and the official chat template), so everything that later runs on
the real model -- ``Qwen2VLForConditionalGeneration.from_pretrained``, ``AutoProcessor``, training,
export, batched generation -- can be exercised on a laptop in seconds. Sizes follow FACTS.md: text vocab
~300 + specials, hidden 32, 2 layers, 4 heads, 2 KV heads, M-RoPE sections [2, 1, 1]; vision depth 2,
width 32, 4 heads, patch 14, merge 2, temporal patch 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Qwen2-VL's added tokens in the order of their ids in the released tokenizer (151643 ... 151656).
QWEN2VL_SPECIAL_TOKENS = [
    ENDOFTEXT, IM_START, IM_END,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD,
]
# ``additional_special_tokens`` of the released tokenizer_config.json (everything but <|endoftext|>)
QWEN2VL_ADDITIONAL_SPECIAL_TOKENS = QWEN2VL_SPECIAL_TOKENS[1:]

# The chat template shipped with Qwen2-VL-*-Instruct (chat_template.json): default system prompt, images as
# <|vision_start|><|image_pad|><|vision_end|> in list-style contents.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CYTO_CORPUS = """
You are a helpful assistant. Describe the Cytology diagnosis results. Just answer the option.
Please answer the multiple-choice question based on the image, and select the best option from the options.
Locate all abnormal cells. Locate all enlarged nuclei. Locate all dark nuclei. Locate all irregular nuclei.
normal 1 is located at <region>12.5 30.0 48.25 66.75</region>. enlarged 2 is located at <region>0.0 9.5</region>.
Give a brief description of region. The smear shows normal squamous cells and a few inflammatory cells.
High-grade squamous intraepithelial lesion. Low-grade lesion. Negative for intraepithelial lesion or malignancy.
A.Benign. B.Atypical. C.Suspicious for malignancy. D.Malignant. hsil lsil ascus asch agc trichomonas
Were any abnormal cells found during the examination? Yes. No. What cells are present in the background?
0 1 2 3 4 5 6 7 8 9 . , : ; ( ) [ ] < > /
"""


def _build_qwen2vl_tokenizer(vocab_size: int = 300):
    from slidechat.model.tiny_llm import _build_tokenizer

    return _build_tokenizer(vocab_size=vocab_size, special_tokens=QWEN2VL_SPECIAL_TOKENS,
                            additional_special_tokens=QWEN2VL_ADDITIONAL_SPECIAL_TOKENS,
                            corpus=_CYTO_CORPUS, chat_template=QWEN2VL_CHAT_TEMPLATE)


def make_tiny_qwen2vl(out_dir: Union[str, os.PathLike], seed: int = 0, vocab_size: int = 300,
                      hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: int = 64, vision_depth: int = 2, vision_embed_dim: int = 32,
                      vision_heads: int = 4, initializer_range: float = 0.2) -> Path:
    """Write a tiny random ``Qwen2VLForConditionalGeneration`` + processor to ``out_dir``; returns the folder.

    Built from scratch (no download), deterministic for a given ``seed``. ``initializer_range`` is
    larger than Qwen2's 0.02 so the random output head has a usable logit range: with 0.02, LoRA on the
    frozen head and norms of a 32-wide model could barely move the loss (a real model's head is trained).
    """
    import torch
    from transformers import (GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)

    head_dim = hidden_size // num_heads
    if head_dim % 2 or head_dim // 2 < 3:
        raise ValueError(f"hidden_size/num_heads = {head_dim} is too small for M-RoPE (need >= 6, even)")
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 4), half // 4, half // 4]  # [2, 1, 1] for head_dim 8

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_qwen2vl_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section},
        vision_config=dict(depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=hidden_size,
                           num_heads=vision_heads, mlp_ratio=4, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        vision_token_id=ids[VISION_PAD],
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        torch_dtype="float32",
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], pad_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessor()  # released defaults: patch 14, merge 2, CLIP mean/std
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=QWEN2VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    logger.info("tiny Qwen2-VL (hidden %d, vocab %d, vision depth %d) written to %s", hidden_size,
                len(tokenizer), vision_depth, out)
    return out
