"""``--cfg-options`` for the paths of our configs.

mmengine resolves config variables when the file is read, so overriding the top-level
``llm_name_or_path`` alone does not reach the dicts built from it; the nested keys must be set.
This lists them for every config under ``configs/slidechat`` and ``configs/tiny`` (same layout).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

LLM_KEYS = ("llm_name_or_path", "tokenizer.pretrained_model_name_or_path",
            "model.llm.pretrained_model_name_or_path",
            "train_dataloader.dataset.tokenizer.pretrained_model_name_or_path")
DATA_KEYS = ("data_path", "train_dataloader.dataset.data_path")
FEATURE_KEYS = ("feature_root", "train_dataloader.dataset.feature_root")
PRETRAINED_KEYS = ("pretrained_pth", "model.pretrained_pth")
#: the features' width: the model's input and the training data's check (the test loop reads the model's)
FEATURE_DIM_KEYS = ("feature_dim", "model.slidechat_config.feature_dim", "train_dataloader.dataset.feature_dim")


def path_overrides(llm_name_or_path: Optional[PathLike] = None, data_path: Optional[PathLike] = None,
                   feature_root: Optional[PathLike] = None, pretrained_pth: Optional[PathLike] = None,
                   feature_dim: Optional[int] = None) -> List[str]:
    """``['key=value', ...]`` to pass after ``--cfg-options`` (only for the paths given; ``feature_dim``:
    the width of another encoder's features, the one setting a new encoder changes)."""
    out: List[str] = []
    for value, keys in ((llm_name_or_path, LLM_KEYS), (data_path, DATA_KEYS),
                        (feature_root, FEATURE_KEYS), (pretrained_pth, PRETRAINED_KEYS),
                        (feature_dim, FEATURE_DIM_KEYS)):
        if value is not None:
            text = str(value) if isinstance(value, int) else os.fspath(value)
            out += [f"{k}={text}" for k in keys]
    return out


def parse_cfg_options(items: Optional[Sequence[str]]) -> Optional[Dict[str, Any]]:
    """``key=value`` strings -> dict, values parsed like mmengine's DictAction."""
    if not items:
        return None
    from mmengine.config import DictAction

    out = {}
    for item in items:
        if "=" not in item:
            raise SlideChatError(f"--cfg-options expects KEY=VALUE, got '{item}'")
        key, val = item.split("=", 1)
        out[key] = DictAction._parse_iterable(val)
    return out
