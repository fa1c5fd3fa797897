"""Training config (+ checkpoint) -> plain :class:`SlideChatModel` and tokenizer (export, chat) or the mmengine
Runner (test).

Accepts our xtuner checkpoints (``iter_N.pth``, DeepSpeed ``iter_N.pth/`` folders, work dirs),
released-style state dicts and exported folders (whose LLM and slide config then replace the config's),
resolved once by the caller (:func:`slidechat.model.checkpoint.resolve_checkpoint`).
LoRA checkpoints are loaded into the LoRA-wrapped model and merged. Reading and the key check are
:mod:`slidechat.model.checkpoint`'s, through ``SlideChatTrainModel.load_checkpoint``; this module only
turns configs into models and mmengine runners.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mmengine.config import Config
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from xtuner.registry import BUILDER

from slidechat.engine.train_model import SlideChatTrainModel
from slidechat.model.checkpoint import CheckpointKind, ResolvedCheckpoint
from slidechat.model.hf_folder import harden_config
from slidechat.model.slide_encoder import saved_encoder_dict
from slidechat.model.slidechat_model import CONFIG_FILE, LLM_DIR
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


def exported_folder_overrides(folder: Path) -> Dict[str, Any]:
    """Config overrides pointing the model at an exported folder (its LLM, tokenizer, slide config)."""
    meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    slide_cfg = {k: meta[k] for k in ("feature_dim", "encoder", "max_patches_train", "max_patches_test")
                 if k in meta}
    slide_cfg["encoder"] = saved_encoder_dict(slide_cfg.get("encoder", {}))  # no padding key: masked
    llm = str(folder / LLM_DIR)
    return {"llm_name_or_path": llm, "tokenizer.pretrained_model_name_or_path": llm,
            "model.llm.pretrained_model_name_or_path": llm, "model.slidechat_config": slide_cfg,
            "model.llm_lora": None, "model.compat": None}


def checkpoint_overrides(checkpoint: ResolvedCheckpoint) -> Dict[str, Any]:
    """Config overrides for testing/exporting ``checkpoint``: it holds the trained weights, so the
    config's ``pretrained_pth`` is not loaded; an exported folder's LLM and slide config win."""
    out: Dict[str, Any] = {"model.pretrained_pth": None}
    if checkpoint.kind is CheckpointKind.EXPORTED:
        out.update(exported_folder_overrides(checkpoint.path))
    return out


def load_config(config_path: PathLike, cfg_options: Optional[Dict[str, Any]] = None,
                trust_remote_code: bool = False, allow_partial: bool = False) -> Config:
    """The config with its overrides, every Hugging Face loader in it under
    :func:`slidechat.model.hf_folder.harden_config`'s rules (``trust_remote_code`` explicit: the
    user's ``--trust-remote-code``, else ``False`` unless the config itself says ``True``; models
    refused when their folder lacks weights unless ``allow_partial``)."""
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


def build_runner(cfg: Config, config_path: PathLike, work_dir: Optional[PathLike] = None,
                 checkpoint: Optional[ResolvedCheckpoint] = None, allow_partial: bool = False) -> Any:
    """The mmengine Runner stock xtuner tools build from ``cfg`` (plain functions in the config become
    registry names; work dir ``./work_dirs/<config name>`` unless given or set), with ``checkpoint``
    loaded into its model through the strict key check (``SlideChatTrainModel.load_checkpoint``)."""
    try:  # as xtuner test does: plain functions in the config become registry names
        from xtuner.tools.test import register_function

        register_function(cfg._cfg_dict)
    except ImportError:  # pragma: no cover - xtuner is a dependency of the engine
        pass
    if work_dir is not None:
        cfg.work_dir = os.fspath(work_dir)
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("./work_dirs", os.path.splitext(os.path.basename(config_path))[0])
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if checkpoint is not None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.load_checkpoint(checkpoint, allow_partial=allow_partial)
    return runner


def build_model_from_config(config_path: PathLike, checkpoint: Optional[ResolvedCheckpoint] = None,
                            cfg_options: Optional[Dict[str, Any]] = None, allow_partial: bool = False,
                            trust_remote_code: bool = False) -> Tuple[Any, Any]:
    """``(SlideChatModel in eval mode, tokenizer)``; the checkpoint goes through the strict key check.

    With a checkpoint, the config's ``pretrained_pth`` is not loaded (the checkpoint holds the
    trained encoder/projector, and the LLM when the config trains it). ``allow_partial`` accepts a
    checkpoint lacking some of those, with a warning. ``trust_remote_code``: see :func:`load_config`.
    """
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
