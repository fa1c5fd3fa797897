"""Training config (+ checkpoint) -> plain :class:`SlideChatModel` and tokenizer, for export/test/chat.

Accepts our xtuner checkpoints (``iter_N.pth``, DeepSpeed ``iter_N.pth/`` folders, work dirs),
released-style state dicts and exported folders (whose LLM and slide config then replace the config's).
LoRA checkpoints are loaded into the LoRA-wrapped model and merged. Reading and the key check are
:mod:`slidechat.model.checkpoint`'s, through ``SlideChatTrainModel.load_checkpoint``; this module only
turns configs into models.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from slidechat.model.checkpoint import is_exported_folder  # noqa: F401  (re-exported for callers)
from slidechat.model.hf_folder import harden_config
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


def exported_folder_overrides(folder: Path) -> Dict[str, Any]:
    """Config overrides pointing the model at an exported folder (its LLM, tokenizer, slide config)."""
    from slidechat.model.slidechat_model import CONFIG_FILE, LLM_DIR

    meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    slide_cfg = {k: meta[k] for k in ("feature_dim", "encoder", "max_patches_train", "max_patches_test")
                 if k in meta}
    from slidechat.model.slide_encoder import saved_encoder_dict

    slide_cfg["encoder"] = saved_encoder_dict(slide_cfg.get("encoder", {}))  # no padding key: masked
    llm = str(folder / LLM_DIR)
    return {"llm_name_or_path": llm, "tokenizer.pretrained_model_name_or_path": llm,
            "model.llm.pretrained_model_name_or_path": llm, "model.slidechat_config": slide_cfg,
            "model.llm_lora": None, "model.compat": None}


def checkpoint_overrides(checkpoint: PathLike) -> Dict[str, Any]:
    """Config overrides for testing/exporting ``checkpoint``: it holds the trained weights, so the
    config's ``pretrained_pth`` is not loaded; an exported folder's LLM and slide config win."""
    from slidechat.model.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)  # a missing path is a one-line error before any model is built
    out: Dict[str, Any] = {"model.pretrained_pth": None}
    if is_exported_folder(path):
        out.update(exported_folder_overrides(path))
    return out


def load_config(config_path: Union[str, os.PathLike], cfg_options: Optional[Dict[str, Any]] = None,
                trust_remote_code: bool = False, allow_partial: bool = False):
    """The config with its overrides, every Hugging Face loader in it under
    :func:`slidechat.model.hf_folder.harden_config`'s rules (``trust_remote_code`` explicit: the
    user's ``--trust-remote-code``, else ``False`` unless the config itself says ``True``; models
    refused when their folder lacks weights unless ``allow_partial``)."""
    from mmengine.config import Config

    if not os.path.isfile(config_path):
        raise SlideChatError("config file not found", config_path)
    cfg = Config.fromfile(os.fspath(config_path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if "model" not in cfg:
        raise SlideChatError("config has no 'model'", config_path)
    for key in list(cfg.keys()):
        harden_config(cfg[key], trust_remote_code, allow_partial)
    return cfg


def build_model_from_config(config_path: Union[str, os.PathLike], checkpoint: Optional[PathLike] = None,
                            cfg_options: Optional[Dict[str, Any]] = None, allow_partial: bool = False,
                            trust_remote_code: bool = False) -> Tuple[Any, Any]:
    """``(SlideChatModel in eval mode, tokenizer)``; the checkpoint goes through the strict key check.

    With a checkpoint, the config's ``pretrained_pth`` is not loaded (the checkpoint holds the
    trained encoder/projector, and the LLM when the config trains it). ``allow_partial`` accepts a
    checkpoint lacking some of those, with a warning. ``trust_remote_code``: see :func:`load_config`.
    """
    from xtuner.registry import BUILDER

    from slidechat.engine.train_model import SlideChatTrainModel

    cfg_options = dict(cfg_options or {})
    if checkpoint is not None:
        cfg_options.update(checkpoint_overrides(checkpoint))
    cfg = load_config(config_path, cfg_options, trust_remote_code=trust_remote_code,
                      allow_partial=allow_partial)
    model_cfg = cfg.model.copy()
    model_cfg["use_activation_checkpointing"] = False
    model = BUILDER.build(model_cfg)
    if not isinstance(model, SlideChatTrainModel):
        raise SlideChatError(f"config model is {type(model).__name__}, expected SlideChatTrainModel",
                             config_path)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint, allow_partial=allow_partial)
    model.merge_lora()
    core = model.core
    core.eval()
    tokenizer = BUILDER.build(cfg.tokenizer) if "tokenizer" in cfg else None
    return core, tokenizer
