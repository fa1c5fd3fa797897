"""Training config (+ checkpoint) -> plain :class:`SlideChatModel` and tokenizer, for export/test/chat.

Accepts our xtuner checkpoints (``iter_N.pth``, DeepSpeed ``iter_N.pth/`` folders) and released-style
state dicts. LoRA checkpoints are loaded into the LoRA-wrapped model and merged.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)


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

    from slidechat.engine.model import SlideChatTrainModel, resolve_checkpoint, summarize_keys
    from slidechat.model.checkpoint import load_state_dict_file

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
        checkpoint = resolve_checkpoint(os.fspath(checkpoint))
        if not os.path.exists(checkpoint):
            raise SlideChatError("checkpoint not found", checkpoint)
        sd = load_state_dict_file(checkpoint)
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
