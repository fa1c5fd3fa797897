"""Training config (+ checkpoint) -> plain :class:`SlideChatModel` and tokenizer, for export/test/chat.

Accepts our xtuner checkpoints (``iter_N.pth``, DeepSpeed ``iter_N.pth/`` folders, work dirs),
released-style state dicts and exported folders (whose LLM and slide config then replace the config's).
LoRA checkpoints are loaded into the LoRA-wrapped model and merged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def is_exported_folder(path: PathLike) -> bool:
    """A ``SlideChatModel.save_pretrained`` folder (``slidechat export``)."""
    from slidechat.model.slidechat_model import CONFIG_FILE

    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def exported_folder_overrides(folder: Path) -> Dict[str, Any]:
    """Config overrides pointing the model at an exported folder (its LLM, tokenizer, slide config)."""
    from slidechat.model.slidechat_model import CONFIG_FILE, LLM_DIR

    meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    slide_cfg = {k: meta[k] for k in ("feature_dim", "encoder", "max_patches_train", "max_patches_test")
                 if k in meta}
    llm = str(folder / LLM_DIR)
    return {"llm_name_or_path": llm, "tokenizer.pretrained_model_name_or_path": llm,
            "model.llm.pretrained_model_name_or_path": llm, "model.slidechat_config": slide_cfg,
            "model.llm_lora": None, "model.compat": None}


def load_checkpoint_weights(checkpoint: PathLike) -> Dict[str, Any]:
    """Weights of a training checkpoint (.pth, DeepSpeed folder, work dir), a released-style
    state dict, or an exported folder's slide modules."""
    from slidechat.engine.model import resolve_checkpoint
    from slidechat.model.checkpoint import load_state_dict_file
    from slidechat.model.slidechat_model import SLIDE_MODULES_FILE

    path = Path(resolve_checkpoint(os.fspath(checkpoint)))
    if not path.exists():
        raise SlideChatError("checkpoint not found", path)
    if is_exported_folder(path):
        from safetensors.torch import load_file

        return load_file(str(path / SLIDE_MODULES_FILE), device="cpu")
    return load_state_dict_file(path)


def load_config(config_path: Union[str, os.PathLike], cfg_options: Optional[Dict[str, Any]] = None):
    from mmengine.config import Config

    if not os.path.isfile(config_path):
        raise SlideChatError("config file not found", config_path)
    cfg = Config.fromfile(os.fspath(config_path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if "model" not in cfg:
        raise SlideChatError("config has no 'model'", config_path)
    return cfg


def build_model_from_config(config_path: Union[str, os.PathLike], checkpoint: Optional[str] = None,
                            cfg_options: Optional[Dict[str, Any]] = None,
                            ) -> Tuple[Any, Any]:
    """``(SlideChatModel in eval mode, tokenizer)``; the checkpoint's key report is logged.

    With a checkpoint, the config's ``pretrained_pth`` is not loaded (the checkpoint holds the
    trained encoder/projector; the LLM comes from the config's LLM folder unless it was trained).
    """
    from xtuner.registry import BUILDER

    from slidechat.engine.model import SlideChatTrainModel, summarize_keys

    if checkpoint is not None and is_exported_folder(checkpoint):  # its LLM + slide config win
        cfg_options = {**(cfg_options or {}), **exported_folder_overrides(Path(checkpoint))}
    cfg = load_config(config_path, cfg_options)
    model_cfg = cfg.model.copy()
    if checkpoint is not None:
        model_cfg["pretrained_pth"] = None
    model_cfg["use_activation_checkpointing"] = False
    model = BUILDER.build(model_cfg)
    if not isinstance(model, SlideChatTrainModel):
        raise SlideChatError(f"config model is {type(model).__name__}, expected SlideChatTrainModel",
                             config_path)
    if checkpoint is not None:
        sd = load_checkpoint_weights(checkpoint)
        if model.use_lora:
            report = model.load_trained_state_dict(sd)
            missing, unexpected = report["missing"], report["unexpected"]
        else:
            rep = model.core.load_slidechat_state_dict(sd)
            missing = list(rep.missing) + list(getattr(rep, "missing_llm", []))
            unexpected = list(rep.unexpected)
        logger.info("checkpoint %s: %d tensors; missing %s; unexpected %s", checkpoint, len(sd),
                    summarize_keys(missing), summarize_keys(unexpected))
        bad = [k for k in missing if not k.startswith("llm.")]
        if bad:
            raise SlideChatError(f"checkpoint lacks slide encoder/projector weights: "
                                 f"{summarize_keys(bad)}", checkpoint)
    model.merge_lora()
    core = model.core
    core.eval()
    tokenizer = BUILDER.build(cfg.tokenizer) if "tokenizer" in cfg else None
    return core, tokenizer
