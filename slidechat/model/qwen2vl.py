"""The Qwen VL families (CytoChat's Qwen2-VL, Qwen2.5-VL, Qwen3-VL): loading, batched generation inputs.

One engine, three registry entries (:data:`FAMILIES`): a family is its transformers model and processor
classes, its patch x merge factor, its native box convention and its LLaMA-Factory template; the family
of a folder is its config's ``model_type``. Weights always come from a local Hugging Face folder (base
Instruct models, CytoChat's released weights, a folder written by ``slidechat export``, or the tiny test
model) through the family's ``from_pretrained``; folders and checkpoints in the transformers 4.48 key
layout load through :data:`LEGACY_KEY_MAP`. Prompts use LLaMA-Factory's template of the family and images
LLaMA-Factory's scaling (:mod:`slidechat.data.images`), so inputs match what CytoChat saw.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

from slidechat.model.hf_folder import load_model, load_processor
from slidechat.model.lora import _hide_broken_bitsandbytes_from_peft
from slidechat.utils.devices import resolve_dtype
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

MODEL_TYPE = "qwen2_vl"


# ------------------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class VLFamily:
    """One Qwen VL family: everything that differs between them. The loop, dataset, loader and
    engine are shared; a family is only this entry (``model_type`` is what the folder's config says)."""

    model_type: str
    label: str
    model_class: str  # transformers class name
    processor_class: str  # transformers class name
    factor: int  # vision patch x spatial merge: pixels per side of one LLM image token
    box_format: str  # native box convention (slidechat.evaluation.boxes.BOX_FORMATS)
    lf_template: str  # LLaMA-Factory template name
    # LLaMA-Factory's composite-model keys (model/model_utils/visual.py), as module paths of transformers 5
    vision_tower_keys: Tuple[str, ...] = ("model.visual.patch_embed", "model.visual.blocks")
    projector_keys: Tuple[str, ...] = ("model.visual.merger",)
    language_model_keys: Tuple[str, ...] = ("model.language_model", "lm_head")


FAMILIES: Dict[str, VLFamily] = {f.model_type: f for f in (
    VLFamily("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 28, "qwen2_vl",
             "qwen2_vl"),
    VLFamily("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", 28,
             "qwen2_5_vl", "qwen2_vl"),
    VLFamily("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", 32, "qwen3_vl",
             "qwen3_vl",
             vision_tower_keys=("model.visual.pos_embed", "model.visual.patch_embed", "model.visual.blocks",
                                "model.visual.deepstack_merger_list")),
)}

#: transformers >= 4.52 moved the decoder under ``model.language_model`` and the vision tower under
#: ``model.visual``; checkpoints and exports written on 4.48 (``model.layers.*``, ``visual.*``,
#: ``lm_head.*``) load through this map (regex -> replacement, as ``from_pretrained(key_mapping=...)``).
LEGACY_KEY_MAP: Dict[str, str] = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
}


def get_family(model_type: str) -> VLFamily:
    """The registry entry of ``model_type``; a one-line error naming the known ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise SlideChatError(f"unknown Qwen VL family '{model_type}' (known: {', '.join(FAMILIES)})") from None


def family_of(model_or_processor: Any) -> VLFamily:
    """The family of a loaded model (its config's ``model_type``) or processor (its class)."""
    cfg = getattr(model_or_processor, "config", None)
    if cfg is not None and getattr(cfg, "model_type", None) in FAMILIES:
        return FAMILIES[cfg.model_type]
    name = type(model_or_processor).__name__
    for fam in FAMILIES.values():
        if name == fam.processor_class:
            return fam
    raise SlideChatError(f"{name} is not a Qwen VL model or processor (known: "
                         f"{', '.join(f.label for f in FAMILIES.values())})")


def map_legacy_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict`` with 4.48-layout keys renamed to the current layout (:data:`LEGACY_KEY_MAP`);
    keys already in the current layout are unchanged."""
    import re

    out: Dict[str, Any] = {}
    for k, v in state_dict.items():
        for pat, rep in LEGACY_KEY_MAP.items():
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ loading
def read_family(path: PathLike) -> Tuple[Path, VLFamily]:
    """``(folder, family)`` of a local Qwen VL model folder, detected from its config's ``model_type``;
    else a one-line SlideChatError saying why."""
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
    mtype = meta.get("model_type") if isinstance(meta, dict) else None
    if mtype not in FAMILIES:
        raise SlideChatError(f"not a Qwen2-VL model (model_type '{mtype}', expected one of "
                             f"{', '.join(FAMILIES)})", p)
    return p, FAMILIES[mtype]


def check_qwen2vl_folder(path: PathLike) -> Path:
    """``path`` if it is a local Qwen VL model folder of a known family (:data:`FAMILIES`)."""
    return read_family(path)[0]


def merge_adapter(model: Any, adapter_name_or_path: PathLike) -> Any:
    """Apply a peft LoRA adapter folder to ``model`` and merge it into the weights."""
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
    """``(model in eval mode, processor)`` of a local Qwen VL folder of any known family.

    The family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) comes from the folder's ``model_type``; weights written
    in the 4.48 key layout load through :data:`LEGACY_KEY_MAP`. ``adapter_name_or_path`` (a peft LoRA
    folder, e.g. LLaMA-Factory's) is merged into the weights. Refuses other folders, folders whose
    weights files lack model weights (unless ``allow_partial``) and folders that need their own code
    (unless ``trust_remote_code``) with a one-line error (:mod:`slidechat.model.hf_folder`).
    """
    import transformers

    folder, family = read_family(model_name_or_path)
    if not ((folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()):
        raise SlideChatError(f"no preprocessor_config.json or processor_config.json (the {family.label} image "
                             f"processor) in the model folder", folder)
    dtype = torch_dtype if torch_dtype is not None else resolve_dtype("auto", device)
    with quiet_tp_plan_check():
        model = load_model(getattr(transformers, family.model_class), folder, torch_dtype=dtype,
                           trust_remote_code=trust_remote_code, allow_partial=allow_partial,
                           key_mapping=dict(LEGACY_KEY_MAP))
    if adapter_name_or_path is not None:
        model = merge_adapter(model, adapter_name_or_path)
    model.to(device).eval()
    processor = load_processor(folder, trust_remote_code=trust_remote_code)
    if type(processor).__name__ != family.processor_class:
        raise SlideChatError(f"the folder's processor is {type(processor).__name__}, expected "
                             f"{family.processor_class}", folder)
    return model, processor


@contextlib.contextmanager
def quiet_tp_plan_check() -> Iterator[None]:
    """Hold back transformers 5's "The following layers were not sharded: ..." warning while a folder loads.

    ``from_pretrained`` checks the model's tensor-parallel plan whenever the ``modeling_utils`` logger is
    at WARNING or above (:mod:`slidechat.model.hf_folder` holds it at ERROR during loads) and lists every
    vision-tower layer, which has no tensor-parallel rule; no tensor parallelism is used here.
    """
    lg = logging.getLogger("transformers.distributed.tensor_parallel")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def mm_token_type_ids(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """transformers 5's ``mm_token_type_ids`` (text 0, image 1, video 2), what the processor returns
    beside ``input_ids``; needed for M-RoPE whenever images are in the batch."""
    cfg = getattr(config, "config", config)
    out = torch.zeros_like(input_ids, dtype=torch.int)
    out[input_ids == int(cfg.image_token_id)] = 1
    out[input_ids == int(cfg.video_token_id)] = 2
    return out


# ------------------------------------------------------------------------------------------------ forward
def mrope_position_ids(model: Any, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The family's 3-D (t, h, w) M-RoPE position ids, computed explicitly (as LLaMA-Factory's collator
    passes them) from ``get_rope_index`` of the inner ``model.model`` (transformers 5; it wants the
    ``mm_token_type_ids``, built here from the config's image/video token ids)."""
    inner = model.model if hasattr(getattr(model, "model", None), "get_rope_index") else model
    if image_grid_thw is None:  # text only: get_rope_index needs a vision span; plain positions in 3 rows
        if attention_mask is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        return pos.unsqueeze(0).expand(3, -1, -1)
    position_ids, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids(input_ids, inner.config),
                                           image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return position_ids


@contextlib.contextmanager
def per_image_vision(model: Any) -> Iterator[None]:
    """Run the vision tower image by image inside ``model(...)`` / ``model.generate``.

    transformers 4.48 packed a batch's images into one sequence with a dense block-diagonal attention
    mask (eager/SDPA), so the vision cost grew with the square of the batch's patch count. transformers 5
    already splits the vision attention per image (``cu_seqlens`` chunks) and has no top-level
    ``visual``: there this is a no-op, kept so callers read the same on both.
    """
    visual = getattr(model, "visual", None)
    if visual is None or "forward" in vars(visual) or not isinstance(visual, torch.nn.Module):
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
    if inputs.get("pixel_values") is not None:
        inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"], model.config)
    with torch.inference_mode(), per_image_vision(model):
        pos = mrope_position_ids(model, inputs["input_ids"], inputs.get("image_grid_thw"),
                                 inputs.get("attention_mask"))
        out = model(**inputs, position_ids=pos, use_cache=False)
    return out.logits[:, -1, :].float()
