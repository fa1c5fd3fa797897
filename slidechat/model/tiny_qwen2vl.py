"""A tiny random Qwen VL model (Qwen2-VL, Qwen2.5-VL or Qwen3-VL: model + tokenizer + processor) built offline.

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
from typing import Optional, Union

from slidechat.model.qwen2vl import get_family
from slidechat.model.tiny_llm import _build_tokenizer

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


def _build_qwen2vl_tokenizer(vocab_size: int = 300, arch: str = "qwen2_vl"):
    qwen3 = arch == "qwen3_vl"
    tok = _build_tokenizer(vocab_size=vocab_size, special_tokens=QWEN2VL_SPECIAL_TOKENS,
                           additional_special_tokens=QWEN2VL_ADDITIONAL_SPECIAL_TOKENS, corpus=_CYTO_CORPUS,
                           chat_template=QWEN3VL_CHAT_TEMPLATE if qwen3 else QWEN2VL_CHAT_TEMPLATE)
    if qwen3:  # added but not special in the released Qwen3-VL tokenizer: decoding keeps them
        tok.add_tokens(THINK_TOKENS)
    return tok


#: the families the builder knows (the registry entries of :mod:`slidechat.model.qwen2vl`)
ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Qwen3-VL's chat template has no default system prompt; otherwise the same list-style contents.
QWEN3VL_CHAT_TEMPLATE = QWEN2VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
# Qwen3's reasoning markers (added tokens of the released Qwen3-VL tokenizer), used by LLaMA-Factory's
# ``qwen3_vl`` template for the empty thought it puts before answers
THINK_TOKENS = ["<think>", "</think>"]


def _mrope_section(head_dim: int, arch: str = "qwen2_vl") -> list:
    """M-RoPE (t, h, w) split of the ``head_dim / 2`` rotary frequencies: the released values at head_dim
    128 (Qwen2-VL / Qwen2.5-VL [16, 24, 24], Qwen3-VL [24, 20, 20]); otherwise t gets what h and w
    (a quarter each) leave, [2, 1, 1] for head_dim 8."""
    if head_dim % 2 or head_dim // 2 < 3:
        raise ValueError(f"hidden_size/num_heads = {head_dim} is too small for M-RoPE (need >= 6, even)")
    if head_dim == 128:
        return [24, 20, 20] if arch == "qwen3_vl" else [16, 24, 24]
    half = head_dim // 2
    return [half - 2 * (half // 4), half // 4, half // 4]


def _config(arch: str, ids: dict, vocab: int, hidden_size: int, num_layers: int, num_heads: int,
            num_kv_heads: int, intermediate_size: int, vision_depth: int, vision_embed_dim: int,
            vision_heads: int, initializer_range: float) -> "object":
    """The family's transformers config, fields named as its own config classes name them
    (``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` with their text and vision sub-configs)."""
    import transformers

    head_dim = hidden_size // num_heads
    text = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=32768, rms_norm_eps=1e-6, initializer_range=initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": _mrope_section(head_dim, arch)},
                bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    tokens = dict(image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
                  vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
                  tie_word_embeddings=False)
    if arch == "qwen2_vl":
        text.update(use_sliding_window=False)
        vision = dict(depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=hidden_size,
                      num_heads=vision_heads, mlp_ratio=4, in_channels=3, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=initializer_range)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, vision_token_id=ids[VISION_PAD],
                                          **tokens)
    if arch == "qwen2_5_vl":
        text.update(use_sliding_window=False)
        # full attention in every 8th block as released (7, 15, 23, 31 of 32), else the last one only;
        # window attention elsewhere
        full = [i for i in range(vision_depth) if i % 8 == 7] or [vision_depth - 1]
        vision = dict(depth=vision_depth, hidden_size=vision_embed_dim, intermediate_size=4 * vision_embed_dim,
                      num_heads=vision_heads, in_channels=3, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, out_hidden_size=hidden_size,
                      fullatt_block_indexes=full, initializer_range=initializer_range)
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if arch == "qwen3_vl":
        text.update(head_dim=head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        # deepstack taps every block but the last (released: blocks 8, 16, 24 of 27)
        vision = dict(depth=vision_depth, hidden_size=vision_embed_dim, intermediate_size=4 * vision_embed_dim,
                      num_heads=vision_heads, in_channels=3, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=hidden_size, num_position_embeddings=64,
                      deepstack_visual_indexes=list(range(max(vision_depth - 1, 1))),
                      initializer_range=initializer_range)
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"unknown arch '{arch}' (known: {', '.join(ARCHS)})")


def _processor(arch: str, tokenizer: "object") -> "object":
    """The family's processor with the released image/video processor settings."""
    import transformers
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if arch == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        # released Qwen3-VL preprocessor_config.json: patch 16, merge 2, mean/std 0.5, 64K..16M pixels
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                      size={"shortest_edge": 65536, "longest_edge": 16777216})
        return transformers.Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer,
                                             video_processor=Qwen3VLVideoProcessor(),
                                             chat_template=QWEN3VL_CHAT_TEMPLATE)
    image = Qwen2VLImageProcessor()  # released defaults: patch 14, merge 2, CLIP mean/std
    cls = transformers.Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else transformers.Qwen2VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
               chat_template=QWEN2VL_CHAT_TEMPLATE)


def make_tiny_qwen2vl(out_dir: Union[str, os.PathLike], seed: int = 0, vocab_size: Optional[int] = None,
                      hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: int = 64, vision_depth: int = 2, vision_embed_dim: int = 32,
                      vision_heads: int = 4, initializer_range: float = 0.2, arch: str = "qwen2_vl",
                      tokenizer_vocab_size: int = 300, dtype: str = "float32") -> Path:
    """Write a tiny random Qwen VL model of family ``arch`` + its processor to ``out_dir``; returns the folder.

    Built from scratch (no download), deterministic for a given ``seed``. The tokenizer stays tiny
    (``tokenizer_vocab_size`` BPE merges + the family's special tokens); ``vocab_size`` (default: the
    tokenizer's size) only sets the embedding rows, so benchmark-sized models can be built offline.
    ``initializer_range`` is larger than Qwen2's 0.02 so the random output head has a usable logit range:
    with 0.02, LoRA on the frozen head and norms of a 32-wide model could barely move the loss (a real
    model's head is trained).
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}' (known: {', '.join(ARCHS)})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_qwen2vl_tokenizer(tokenizer_vocab_size, arch)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    vocab = len(tokenizer) if vocab_size is None else int(vocab_size)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = _config(arch, ids, vocab, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                     vision_depth, vision_embed_dim, vision_heads, initializer_range)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown dtype '{dtype}' (float32 or bfloat16)")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = getattr(transformers, get_family(arch).model_class)(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], pad_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    _processor(arch, tokenizer).save_pretrained(out)
    logger.info("tiny %s (hidden %d, vocab %d, vision depth %d) written to %s", arch, hidden_size, vocab,
                vision_depth, out)
    return out
