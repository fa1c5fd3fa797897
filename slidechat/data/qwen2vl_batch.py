"""Qwen VL prompts + images -> the left-padded batch ``model.generate(**batch)`` takes: prompts
encoded with the family's LLaMA-Factory template, images scaled by LLaMA-Factory's rule (once: a
:class:`~slidechat.data.images.PreparedImage` is taken as it is) and then the processor's, each image
pad expanded as the processor does."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from transformers import BatchFeature

from slidechat.data.image_sizes import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS
from slidechat.data.images import prepare_image
from slidechat.data.llamafactory import Example
from slidechat.data.template import encode_qwen2vl_prompt, expand_image_pad_ids, get_vision_template
from slidechat.model.qwen2vl import family_of, mm_token_type_ids
from slidechat.utils.errors import SlideChatError


def prepare_generation_batch(processor: Any, examples_or_prompts: Sequence[Any],
                             images: Optional[Sequence[Optional[Sequence[Any]]]] = None, *,
                             image_max_pixels: int = IMAGE_MAX_PIXELS, image_min_pixels: int = IMAGE_MIN_PIXELS,
                             default_system: Optional[str] = None) -> Any:
    """A left-padded ``BatchFeature`` for ``model.generate(**batch)``.

    ``examples_or_prompts``: :class:`~slidechat.data.llamafactory.Example` rows (encoded slot by slot with
    the family's LLaMA-Factory template (``qwen2_vl`` or ``qwen3_vl``), final answer left out:
    :func:`slidechat.data.template.encode_qwen2vl_prompt`,
    the encoder training uses), prompt token ids (one ``<|image_pad|>`` per image, as that encoder and
    vllm_infer give them) or prompt strings already rendered (each image as
    ``<|vision_start|><|image_pad|><|vision_end|>``; tokenized whole, so only for single-turn prompts,
    where that equals the slot-by-slot ids). ``images[i]``: paths, PIL images or
    :class:`~slidechat.data.images.PreparedImage` of row ``i`` (default: the examples' own images). Paths
    and PIL images get LLaMA-Factory's scaling (``image_max_pixels``/``image_min_pixels``); prepared ones
    were scaled when they were read and are not scaled again. Then the processor's scaling; each image's
    pad is expanded to ``t*h*w / merge²`` pads as the processor does.
    """
    tpl = get_vision_template(family_of(processor).lf_template)
    span = f"{tpl.vision_bos}{tpl.image_token}{tpl.vision_eos}"
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids(tpl.image_token)
    rows: List[Any] = []
    counts: List[int] = []
    flat: List[Any] = []
    for i, item in enumerate(examples_or_prompts):
        if isinstance(item, Example):
            prompt: Any = encode_qwen2vl_prompt(tok, item.prompt_messages, item.label,
                                                item.system_prompt(default_system, tpl),
                                                default_system=default_system, template=tpl).prompt_ids
            row_images = item.images if images is None or images[i] is None else images[i]
            n_spans = prompt.count(pad_id)
        elif isinstance(item, str):
            prompt = item
            row_images = [] if images is None or images[i] is None else images[i]
            n_spans = item.count(span)
        elif isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
            prompt = list(item)
            row_images = [] if images is None or images[i] is None else images[i]
            n_spans = prompt.count(pad_id)
        else:
            raise TypeError(f"item {i}: expected an Example, prompt ids or a prompt string, "
                            f"got {type(item).__name__}")
        if n_spans != len(row_images):
            raise SlideChatError(f"prompt {i} has {n_spans} image span(s) but {len(row_images)} "
                                 f"image(s) were given")
        flat.extend(prepare_image(im, image_max_pixels, image_min_pixels).image for im in row_images)
        rows.append(prompt)
        counts.append(len(row_images))
    if all(isinstance(r, str) for r in rows):
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            return processor(text=rows, images=flat or None, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = old_side
    return _batch_from_ids(processor, rows, counts, flat, pad_id)


def _batch_from_ids(processor: Any, rows: Sequence[Any], counts: Sequence[int], flat: Sequence[Any],
                    pad_id: int) -> Any:
    """What ``processor(text=..., images=..., padding=True)`` returns (left padding), from token ids:
    the images through the processor's image processor, each ``<|image_pad|>`` repeated ``t*h*w / merge²``
    times, rows left-padded with the tokenizer's pad id (attention mask 0)."""
    tok = processor.tokenizer
    data: dict = {}
    seqlens: List[int] = []
    if flat:
        vis = processor.image_processor(images=list(flat), return_tensors="pt")
        merge = int(getattr(processor.image_processor, "merge_size", 2)) ** 2
        seqlens = [int(n) for n in (vis["image_grid_thw"].prod(-1) // merge).tolist()]
        data.update(pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"])
    ids_rows: List[List[int]] = []
    k = 0
    for r in rows:
        if isinstance(r, str):
            r = tok(r, add_special_tokens=False)["input_ids"]
        ids, k = expand_image_pad_ids(r, pad_id, seqlens, k)
        ids_rows.append(ids)
    width = max(len(r) for r in ids_rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(ids_rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids_rows), width), dtype=torch.long)
    for i, r in enumerate(ids_rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    if flat:  # transformers 5: M-RoPE needs the token types whenever images are in the batch
        # the processor carries the image/video token ids the model config has
        data["mm_token_type_ids"] = mm_token_type_ids(input_ids, processor)
    return BatchFeature(data={"input_ids": input_ids, "attention_mask": mask, **data})
