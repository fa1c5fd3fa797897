"""The Qwen2-VL model family (CytoChat): loading, batched generation inputs, training and export.

Weights always come from a local Hugging Face folder (base Qwen2-VL-Instruct, CytoChat's released
weights, a folder written by ``slidechat export``, or the tiny test model) through
``Qwen2VLForConditionalGeneration.from_pretrained``; prompts use LLaMA-Factory's ``qwen2_vl`` template
and images LLaMA-Factory's scaling (:mod:`slidechat.data.images`), so inputs match what CytoChat saw.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from slidechat.data.images import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, load_image, scale_image
from slidechat.model.hf_folder import load_model, load_processor
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

MODEL_TYPE = "qwen2_vl"


# ------------------------------------------------------------------------------------------------ loading
def check_qwen2vl_folder(path: PathLike) -> Path:
    """``path`` if it is a local Qwen2-VL model folder; else a one-line SlideChatError saying why."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SlideChatError("model folder not found (a local Hugging Face folder is required; nothing "
                             "is downloaded)", p)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise SlideChatError("not a Hugging Face model folder (no config.json)", p)
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlideChatError(f"malformed config.json: {e}", cfg) from None
    mtype = meta.get("model_type")
    if mtype != MODEL_TYPE:
        hint = "Qwen2.5-VL needs transformers >= 4.49" if mtype == "qwen2_5_vl" else None
        raise SlideChatError(f"not a Qwen2-VL model (model_type '{mtype}', expected '{MODEL_TYPE}')", p,
                             hint=hint)
    return p


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on a GPU that supports it (as CytoChat runs), fp32 on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def merge_adapter(model: Any, adapter_name_or_path: PathLike) -> Any:
    """Apply a peft LoRA adapter folder to ``model`` and merge it into the weights."""
    from slidechat.model.lora import _hide_broken_bitsandbytes_from_peft

    a = Path(adapter_name_or_path).expanduser()
    if not (a / "adapter_config.json").is_file():
        raise SlideChatError("not a LoRA adapter folder (no adapter_config.json)", a)
    _hide_broken_bitsandbytes_from_peft()
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(a))
    except Exception as e:  # wrong base model, bad files
        raise SlideChatError(f"cannot apply the adapter: {type(e).__name__}: {e}", a) from None
    logger.info("merging LoRA adapter %s", a)
    return peft_model.merge_and_unload()


def load_qwen2vl(model_name_or_path: PathLike, adapter_name_or_path: Optional[PathLike] = None, *,
                 torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                 trust_remote_code: bool = False, allow_partial: bool = False) -> Tuple[Any, Any]:
    """``(Qwen2VLForConditionalGeneration in eval mode, Qwen2VLProcessor)`` from a local folder.

    ``adapter_name_or_path`` (a peft LoRA folder, e.g. LLaMA-Factory's) is merged into the weights.
    Refuses non-Qwen2-VL folders, folders whose weights files lack model weights (unless
    ``allow_partial``) and folders that need their own code (unless ``trust_remote_code``) with a
    one-line error (:mod:`slidechat.model.hf_folder`).
    """
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    folder = check_qwen2vl_folder(model_name_or_path)
    if not (folder / "preprocessor_config.json").is_file():
        raise SlideChatError("no preprocessor_config.json (the Qwen2-VL image processor) in the model "
                             "folder", folder)
    dtype = torch_dtype if torch_dtype is not None else default_dtype(device)
    model = load_model(Qwen2VLForConditionalGeneration, folder, torch_dtype=dtype,
                       trust_remote_code=trust_remote_code, allow_partial=allow_partial)
    if adapter_name_or_path is not None:
        model = merge_adapter(model, adapter_name_or_path)
    model.to(device).eval()
    processor = load_processor(folder, trust_remote_code=trust_remote_code)
    if not isinstance(processor, Qwen2VLProcessor):
        raise SlideChatError(f"the folder's processor is {type(processor).__name__}, expected "
                             f"Qwen2VLProcessor", folder)
    return model, processor


# ------------------------------------------------------------------------------------------------ generation
def prepare_generation_batch(processor: Any, examples_or_prompts: Sequence[Any],
                             images: Optional[Sequence[Optional[Sequence[Any]]]] = None, *,
                             image_max_pixels: int = IMAGE_MAX_PIXELS, image_min_pixels: int = IMAGE_MIN_PIXELS,
                             default_system: Optional[str] = None) -> Any:
    """A left-padded ``BatchFeature`` for ``model.generate(**batch)``.

    ``examples_or_prompts``: :class:`~slidechat.data.llamafactory.Example` rows (encoded slot by slot with
    the ``qwen2_vl`` template, final answer left out: :func:`slidechat.data.template.encode_qwen2vl_prompt`,
    the encoder training uses), prompt token ids (one ``<|image_pad|>`` per image, as that encoder and
    vllm_infer give them) or prompt strings already rendered (each image as
    ``<|vision_start|><|image_pad|><|vision_end|>``; tokenized whole, so only for single-turn prompts,
    where that equals the slot-by-slot ids). ``images[i]``: paths or PIL images of row ``i`` (default: the
    examples' own images). Images get LLaMA-Factory's scaling, then the processor's; each image's pad is
    expanded to ``t*h*w / merge²`` pads as the processor does.
    """
    from PIL import Image

    from slidechat.data.llamafactory import Example
    from slidechat.data.template import QWEN2_VL, encode_qwen2vl_prompt

    span = f"{QWEN2_VL.vision_bos}{QWEN2_VL.image_token}{QWEN2_VL.vision_eos}"
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids(QWEN2_VL.image_token)
    rows: List[Any] = []
    counts: List[int] = []
    flat: List[Any] = []
    for i, item in enumerate(examples_or_prompts):
        if isinstance(item, Example):
            prompt: Any = encode_qwen2vl_prompt(tok, item.prompt_messages, item.label,
                                                item.system_prompt(default_system),
                                                default_system=default_system).prompt_ids
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
        for im in row_images:
            if isinstance(im, Image.Image):
                flat.append(scale_image(im, image_max_pixels, image_min_pixels))
            else:
                flat.append(load_image(im, image_max_pixels, image_min_pixels))
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
    from transformers import BatchFeature

    from slidechat.data.template import expand_image_pad_ids

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
    return BatchFeature(data={"input_ids": input_ids, "attention_mask": mask, **data})


def __getattr__(name: str) -> Any:
    # the training model needs mmengine (seconds to import): loaded only when asked for
    if name in ("Qwen2VLTrainModel",):
        from slidechat.model import qwen2vl_train

        return getattr(qwen2vl_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------ forward
def mrope_position_ids(model: Any, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Qwen2-VL's 3-D (t, h, w) M-RoPE position ids, computed explicitly.

    transformers 4.48 computes them only on a model's first forward without ``position_ids`` and
    caches ``rope_deltas``; every later plain forward (training steps, scoring) then silently falls
    back to 1-D positions. LLaMA-Factory's collator passes them explicitly; so does every caller here.
    """
    position_ids, _ = model.get_rope_index(input_ids, image_grid_thw, None, attention_mask)
    return position_ids


@contextlib.contextmanager
def per_image_vision(model: Any) -> Iterator[None]:
    """Run Qwen2-VL's vision tower image by image inside ``model(...)`` / ``model.generate``.

    transformers 4.48 packs a batch's images into one sequence with a dense block-diagonal attention
    mask (eager/SDPA), so the vision cost grows with the square of the batch's patch count; per image
    it is linear, and each image's features no longer depend on its batch-mates. Same maths (the mask
    is block-diagonal), so the results are those of the packed call.
    """
    visual = getattr(model, "visual", None)
    if visual is None or "forward" in vars(visual):
        yield
        return
    packed = visual.forward

    def forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kw: Any) -> torch.Tensor:
        if grid_thw.shape[0] <= 1:
            return packed(hidden_states, grid_thw=grid_thw, **kw)
        sizes = [int(n) for n in grid_thw.prod(-1).tolist()]
        return torch.cat([packed(h, grid_thw=g[None], **kw)
                          for h, g in zip(hidden_states.split(sizes), grid_thw)])

    visual.forward = forward
    try:
        yield
    finally:
        del visual.forward


def last_token_logits(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Float logits ``(N, vocab)`` at the last position of a left-padded batch (the answer's first
    token): one forward with explicit M-RoPE positions and the vision tower run image by image."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
              if batch.get(k) is not None}
    with torch.inference_mode(), per_image_vision(model):
        pos = mrope_position_ids(model, inputs["input_ids"], inputs.get("image_grid_thw"),
                                 inputs.get("attention_mask"))
        out = model(**inputs, position_ids=pos, use_cache=False)
    return out.logits[:, -1, :].float()
