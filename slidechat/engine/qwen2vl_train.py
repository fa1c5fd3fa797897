"""Qwen VL training model (every family) for stock ``xtuner train`` (mmengine ``BaseModel``), LLaMA-Factory's recipe.

Kept apart from :mod:`slidechat.model.qwen2vl` so inference does not import mmengine;
``slidechat.model.qwen2vl.Qwen2VLTrainModel`` resolves to the class here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from mmengine.model import BaseModel

from slidechat.data.cytology_dataset import build_processor
from slidechat.engine.builder import load_config
# train_model also makes checkpoint reads in this process safe: install_safe_xtuner_loader (called again
# when the model is built) and the torch.load globals mmengine checkpoints need (weights-only resume)
from slidechat.engine.train_model import build_cfg, install_safe_xtuner_loader
from slidechat.model.checkpoint import ResolvedCheckpoint, load_checked, load_weights, read_checkpoint
from slidechat.model.hf_folder import load_model
from slidechat.model.label_logits import loss_at_labels
from slidechat.model.lora import apply_lora
from slidechat.model.qwen2vl import (FAMILIES, LEGACY_KEY_MAP, VLFamily, map_legacy_keys, mm_token_type_ids,
                                     mrope_position_ids, quiet_tp_plan_check, read_family)
from slidechat.model.recompute import enable_activation_checkpointing
from slidechat.utils.errors import SlideChatError
from slidechat.utils.outputs import check_output_folder, staged_folder
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ training
# LLaMA-Factory's composite-model keys (model/model_utils/visual.py) per family, as transformers-5 module
# paths (VLFamily.vision_tower_keys / projector_keys / language_model_keys); these are Qwen2-VL's
VISION_TOWER_KEYS = FAMILIES["qwen2_vl"].vision_tower_keys
PROJECTOR_KEY = FAMILIES["qwen2_vl"].projector_keys[0]
LANGUAGE_MODEL_KEYS = FAMILIES["qwen2_vl"].language_model_keys
LORA_CONFLICT_KEYS = ("patch_embed",)
#: the Hugging Face model's children registered on the training model (so its keys are the HF names);
#: transformers 5 has the vision tower inside ``model`` (``model.visual``), so it is not registered twice
HF_CHILDREN = ("model", "lm_head")


def _under(name: str, keys: Sequence[str]) -> bool:
    """Whether module/parameter ``name`` is one of ``keys`` or inside one (whole path components)."""
    return any(name == k or name.startswith(k + ".") for k in keys)


def _as_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        value = getattr(torch, dtype, None)
        if isinstance(value, torch.dtype):
            return value
    raise SlideChatError(f"unknown torch_dtype {dtype!r} (use float32, bfloat16 or float16)")


def forbidden_modules(freeze_vision_tower: bool, freeze_multi_modal_projector: bool,
                      freeze_language_model: bool, family: Optional[VLFamily] = None) -> List[str]:
    """Module paths LLaMA-Factory keeps frozen (``get_forbidden_modules``) for ``family`` (default
    Qwen2-VL). The language model is named by its own path (``model.language_model``), so freezing it
    leaves the vision tower (``model.visual``) as its own flags say."""
    fam = family or FAMILIES["qwen2_vl"]
    out: List[str] = []
    if freeze_vision_tower:
        out += list(fam.vision_tower_keys)
    if freeze_multi_modal_projector:
        out += list(fam.projector_keys)
    if freeze_language_model:
        out += list(fam.language_model_keys)
    return out


def lora_target_modules(model: torch.nn.Module, forbidden: Sequence[str],
                        targets: Optional[Sequence[str]] = None) -> List[str]:
    """LLaMA-Factory's ``lora_target: all`` for Qwen2-VL: every Linear but ``lm_head``, minus frozen
    parts (``patch_embed`` always); ``targets`` restricts to modules whose name contains one of them."""
    from torch import nn

    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or "lm_head" in name:
            continue
        if targets is not None and not any(t in name for t in targets):
            continue
        if _under(name, forbidden) or any(f in name for f in LORA_CONFLICT_KEYS):
            continue
        names.append(name)
    return names


class _LoadGuard:
    """Marks a load that already goes through :func:`load_checked` (no second check)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        object.__setattr__(self.owner, "_checked_load_active", True)

    def __exit__(self, *exc: Any) -> None:
        object.__setattr__(self.owner, "_checked_load_active", False)


class Qwen2VLTrainModel(BaseModel):
    """A Qwen VL model (Qwen2-VL, Qwen2.5-VL or Qwen3-VL: the folder's family) for stock ``xtuner train``
    (xtuner 0.2.0 has no Qwen VL support), trained like LLaMA-Factory trains CytoChat.

    The Hugging Face model's children (``model``, holding ``model.visual`` and ``model.language_model``,
    and ``lm_head``) are registered directly on this module, so checkpoint keys are the Hugging Face
    names; checkpoints in the 4.48 layout are renamed on load (``map_legacy_keys``). Full fine-tuning
    trains everything but the frozen parts, named by path per family (``freeze_vision_tower``: patch
    embedding + blocks; ``freeze_multi_modal_projector``: the merger; both True by default as in
    LLaMA-Factory; ``freeze_language_model``: ``model.language_model`` + ``lm_head``). ``lora`` (a peft
    ``LoraConfig`` or its config dict) puts adapters on every Linear of the unfrozen parts except
    ``lm_head`` and ``patch_embed`` (LLaMA-Factory's ``lora_target: all``); the base weights stay frozen.

    ``state_dict()`` holds only the trained tensors (LoRA: only adapter tensors). Every load
    (``load_state_dict`` for DeepSpeed resume / xtuner, mmengine's own resume, ``pretrained_pth``) goes
    through :func:`slidechat.model.checkpoint.load_checked`: shape mismatches, and (strictly) missing
    trained or unexpected keys, are one-line errors.
    """

    def __init__(self, model_name_or_path: PathLike, torch_dtype: Any = "float32",
                 freeze_vision_tower: bool = True, freeze_multi_modal_projector: bool = True,
                 freeze_language_model: bool = False, lora: Any = None,
                 lora_targets: Optional[Sequence[str]] = None, pretrained_pth: Optional[PathLike] = None,
                 use_activation_checkpointing: bool = False, attn_implementation: Optional[str] = None
                 ) -> None:
        super().__init__()
        install_safe_xtuner_loader()  # before any checkpoint is read in this process (see there)
        import transformers

        folder, family = read_family(model_name_or_path)
        kwargs: Dict[str, Any] = {"torch_dtype": _as_dtype(torch_dtype) or torch.float32,
                                  "key_mapping": dict(LEGACY_KEY_MAP)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        with quiet_tp_plan_check():  # no folder code, no missing weights
            hf = load_model(getattr(transformers, family.model_class), folder, **kwargs)
        hf.config.use_cache = False
        object.__setattr__(self, "_hf", hf)
        object.__setattr__(self, "_peft", None)
        object.__setattr__(self, "_checked_load_active", False)
        for name in HF_CHILDREN:
            setattr(self, name, getattr(hf, name))
        self.model_name_or_path = str(folder)
        self.family = family
        self.freeze_flags = dict(freeze_vision_tower=bool(freeze_vision_tower),
                                 freeze_multi_modal_projector=bool(freeze_multi_modal_projector),
                                 freeze_language_model=bool(freeze_language_model))
        self.use_lora = lora is not None
        self.use_activation_checkpointing = bool(use_activation_checkpointing)
        self.pretrained_report = None
        if pretrained_pth:
            self.pretrained_report = self.load_pretrained(pretrained_pth)

        forbidden = forbidden_modules(**self.freeze_flags, family=family)
        if self.use_lora:
            self._apply_lora(lora, lora_target_modules(hf, forbidden, lora_targets))
        else:
            for name, p in self.named_parameters():
                p.requires_grad_(not _under(name, forbidden))
        if self.use_activation_checkpointing:
            enable_activation_checkpointing(hf)
        trained = [n for n, p in self.named_parameters() if p.requires_grad]
        if not trained:
            raise SlideChatError("nothing to train: every part is frozen", folder)
        object.__setattr__(self, "_trained_keys", frozenset(trained))
        # frozen weights are never in our checkpoints: keep them out of "missing" reports (mmengine's
        # resume prints one after load_checked has already checked the trained ones)
        self.register_load_state_dict_post_hook(_drop_untrained_missing)
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.parameters())
        logger.info("%s %s: %d of %d parameters trainable (%s)", family.label,
                    "LoRA" if self.use_lora else "full", n_train, n_all,
                    ", ".join(f"{k}={v}" for k, v in self.freeze_flags.items()))

    # ------------------------------------------------------------------ structure
    @property
    def hf_model(self) -> Any:
        """The family's ``...ForConditionalGeneration`` (shares every parameter with this module)."""
        return self._hf

    @property
    def trained_keys(self) -> frozenset:
        return self._trained_keys

    def _apply_lora(self, lora_cfg: Any, targets: List[str]) -> None:
        if not targets:
            raise SlideChatError("LoRA has no target modules (everything is frozen)")
        if isinstance(lora_cfg, dict):
            lora_cfg = build_cfg(lora_cfg) if "type" in lora_cfg else _lora_config(**lora_cfg)
        peft_model = apply_lora(self._hf, lora_cfg, target_modules=targets)
        object.__setattr__(self, "_peft", peft_model)
        logger.info("LoRA on %d modules (r=%s, alpha=%s)", len(targets), lora_cfg.r, lora_cfg.lora_alpha)

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights (for export); children are replaced in place."""
        if self._peft is None:
            return
        merged = self._peft.merge_and_unload()
        object.__setattr__(self, "_hf", merged)
        object.__setattr__(self, "_peft", None)
        for name in HF_CHILDREN:
            setattr(self, name, getattr(merged, name))
        self.use_lora = False

    def train(self, mode: bool = True) -> "Qwen2VLTrainModel":
        super().train(mode)
        self._hf.train(mode)
        return self

    def init_weights(self) -> None:
        """Weights come from the model folder and ``pretrained_pth``; nothing is re-initialised."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        sd = super().state_dict(*args, **kwargs)
        for k in list(sd.keys()):
            name = k[len(prefix):] if prefix and k.startswith(prefix) else k
            if name not in self._trained_keys:
                del sd[k]
        return sd

    def _checked_load(self, state_dict: Mapping[str, torch.Tensor], strict: bool, source: str,
                      required: Optional[Sequence[str]] = None) -> Any:
        """Every load of this model: ``module.`` prefixes dropped, 4.48-layout keys renamed
        (:func:`~slidechat.model.qwen2vl.map_legacy_keys`), then :func:`load_checked` (``required``
        defaults to the trained keys; ``strict=False`` allows a partial load)."""
        sd = map_legacy_keys({(k[len("module."):] if k.startswith("module.") else k): v
                              for k, v in state_dict.items()})
        req = sorted(self._trained_keys) if required is None else required
        with _LoadGuard(self):
            return load_checked(self, sd, required=req, allow_partial=not strict, source=source)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False) -> Any:
        """Load a checkpoint of this model (what DeepSpeed resume and ``xtuner test`` call).

        ``strict``: every trained key present, nothing unexpected; shapes always checked.
        """
        from torch.nn.modules.module import _IncompatibleKeys

        report = self._checked_load(state_dict, strict, "state_dict")
        return _IncompatibleKeys(report.missing, report.unexpected)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        # Module walkers that bypass load_state_dict reach this module first with every key under
        # ``prefix``: mmengine's runner (resume / load_from), or torch's load_state_dict on a wrapper
        # (DistributedDataParallel: prefix "module."). The same strict check runs here, so such a load
        # either fits or is a one-line error (a wrapper given un-prefixed keys would load nothing).
        if not self._checked_load_active:
            own = {k[len(prefix):]: v for k, v in state_dict.items()
                   if k.startswith(prefix) and isinstance(v, torch.Tensor)}
            self._checked_load(own, strict=True, source="checkpoint")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def load_pretrained(self, path: PathLike) -> Any:
        """Initial weights from a checkpoint or a Hugging Face folder (before freezing/LoRA): every
        tensor must fit the model (no unexpected keys, no shape mismatch); model keys it lacks keep
        the model folder's values."""
        report = self._checked_load(load_weights(path), strict=True, source=os.fspath(path), required=[])
        logger.info("pretrained_pth %s", report.summary())
        return report

    # ------------------------------------------------------------------ forward
    def _hf_inputs(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        """Model inputs with explicit M-RoPE position ids and, with images, ``mm_token_type_ids``.

        LLaMA-Factory's collator passes the positions from ``get_rope_index`` on every step (transformers
        4.48 would otherwise fall back to 1-D positions after the first forward); so do we.
        """
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "position_ids")
        inputs = {k: data[k] for k in keys if data.get(k) is not None}
        if inputs.get("pixel_values") is not None:
            inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"], self._hf.config)
        if "position_ids" not in inputs:
            inputs["position_ids"] = mrope_position_ids(
                self._hf, inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("attention_mask"))
        return inputs

    def loss_at_labels(self, data: Mapping[str, Any]) -> torch.Tensor:
        """The stock ``...ForConditionalGeneration(..., labels=...)`` loss with the LM head applied only at
        labelled positions (``label_logits``): the family's own inner model (vision features spliced in,
        Qwen3-VL's deepstack features added, explicit M-RoPE positions), then the head where the shifted
        label is not ignored."""
        inputs = self._hf_inputs(data)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            n_tokens = int((inputs["input_ids"] == self._hf.config.image_token_id).sum())
            merge = int(self._hf.config.vision_config.spatial_merge_size) ** 2
            n_features = int(inputs["image_grid_thw"].prod(-1).sum()) // merge
            if n_tokens != n_features:
                raise SlideChatError(f"image features and image tokens do not match: tokens {n_tokens}, "
                                     f"features {n_features}")
        out = self._hf.model(**inputs, use_cache=False, return_dict=True)
        return loss_at_labels(out.last_hidden_state, self._hf.get_output_embeddings(), data["labels"])

    def forward(self, data: Dict[str, Any], data_samples: Any = None, mode: str = "loss") -> Any:
        if mode == "loss":
            return {"loss": self.loss_at_labels(data)}
        if mode == "tensor":
            return self._hf(**self._hf_inputs(data), use_cache=False).logits
        raise NotImplementedError(f"mode '{mode}' is not supported (use slidechat infer for predictions)")


def _drop_untrained_missing(module: "Qwen2VLTrainModel", incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k in module.trained_keys]


def _lora_config(**kwargs: Any) -> Any:
    """A peft ``LoraConfig`` with LLaMA-Factory's defaults (alpha = 2 * r, dropout 0)."""
    from peft import LoraConfig

    r = int(kwargs.pop("r", 8))
    kwargs.setdefault("lora_alpha", 2 * r)
    kwargs.setdefault("lora_dropout", 0.0)
    kwargs.setdefault("bias", "none")
    return LoraConfig(r=r, **kwargs)


# ------------------------------------------------------------------------------------------------ config -> model
def config_is_qwen2vl(config: Any) -> bool:
    """Whether a training config (path or mmengine Config) builds a :class:`Qwen2VLTrainModel`."""
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    mtype = cfg.model.get("type") if "model" in cfg else None
    return mtype is Qwen2VLTrainModel or (isinstance(mtype, str) and mtype.endswith("Qwen2VLTrainModel"))


def build_qwen2vl_from_config(config: Any, checkpoint: Optional[ResolvedCheckpoint] = None,
                              cfg_options: Optional[Mapping[str, Any]] = None, allow_partial: bool = False
                              ) -> Any:
    """The config's :class:`Qwen2VLTrainModel` with ``checkpoint`` loaded through ``load_checked``.

    With a checkpoint, the config's ``pretrained_pth`` is not loaded (the checkpoint holds what was
    trained; the rest comes from the model folder). Strict unless ``allow_partial``.
    """
    from xtuner.registry import BUILDER

    cfg = load_config(config, dict(cfg_options or {})) if isinstance(config, (str, os.PathLike)) else config
    model_cfg = cfg.model.copy()
    if checkpoint is not None:
        model_cfg["pretrained_pth"] = None
    model_cfg["use_activation_checkpointing"] = False
    model = BUILDER.build(model_cfg)
    if not isinstance(model, Qwen2VLTrainModel):
        raise SlideChatError(f"config model is {type(model).__name__}, expected Qwen2VLTrainModel",
                             config if isinstance(config, (str, os.PathLike)) else None)
    if checkpoint is not None:
        report = model._checked_load(read_checkpoint(checkpoint), strict=not allow_partial,
                                     source=os.fspath(checkpoint.path))
        logger.info("checkpoint %s", report.summary())
    model.eval()
    return model


def _processor_source(cfg: Any, model: Qwen2VLTrainModel) -> Any:
    """The processor the config trains with (its dataset's ``processor``), else the model folder's."""
    ds = cfg.get("train_dataloader", {}).get("dataset", {}) if "train_dataloader" in cfg else {}
    src = ds.get("processor") if hasattr(ds, "get") else None
    return build_processor(src if src is not None else model.model_name_or_path)


#: ``utils.outputs`` kind of an exported Qwen2-VL folder
QWEN2VL_EXPORT_KIND = "Qwen2-VL model export"


def export_qwen2vl(config: PathLike, checkpoint: Optional[ResolvedCheckpoint], out: PathLike,
                   cfg_options: Optional[Mapping[str, Any]] = None, allow_partial: bool = False,
                   overwrite: bool = False) -> Path:
    """Training checkpoint -> a plain Hugging Face Qwen2-VL folder (LoRA merged) that
    ``Qwen2VLForConditionalGeneration.from_pretrained``, ``AutoProcessor`` and vLLM load as they are.

    The output-folder rule (``utils.outputs``) is checked before the model is built; the folder is
    written whole beside ``out`` and swapped in when complete, so a crash leaves an earlier export as
    it was. A non-empty ``out`` that is not an export of ours is refused unless ``overwrite`` (the
    user's other files there are kept).
    """
    out = check_output_folder(out, QWEN2VL_EXPORT_KIND, overwrite=overwrite)
    cfg = load_config(config, dict(cfg_options or {}))
    model = build_qwen2vl_from_config(cfg, checkpoint, allow_partial=allow_partial)
    model.merge_lora()
    hf = model.hf_model
    hf.config.use_cache = True
    processor = _processor_source(cfg, model)
    with staged_folder(out, QWEN2VL_EXPORT_KIND, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    logger.info("exported Qwen2-VL to %s", out)
    return out
