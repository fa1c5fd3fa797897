"""SlideBench rows -> model batches: the prompt ids and slide features of each pending row (a row that
cannot run gets its ``Error`` instead), shared by mmengine's test loop and the plain inference loop."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from slidechat.data.dataset import build_object, uniform_indices
from slidechat.data.limits import PromptLimit, check_prompt_length
from slidechat.data.slidebench import SlideBenchItem
from slidechat.data.template import encode_prompt
from slidechat.features.io import check_feature_provenance, load_features
from slidechat.model.constants import IMAGE_TOKEN_INDEX
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)


class SlideBenchTestDataset(Dataset):
    """Pending SlideBench rows -> prompt ids + slide features (errors become the row's ``Error``)."""

    metainfo: Dict[str, Any] = {"name": "SlideBench"}

    def __init__(self, items: Sequence[SlideBenchItem], tokenizer: Any, feature_dim: int = 512,
                 max_patches: int = 38400, template: Any = "qwen_chat", system: str = "",
                 prompt_limit: Optional[PromptLimit] = None) -> None:
        self.items = list(items)
        self.tokenizer = build_object(tokenizer)
        self.feature_dim = int(feature_dim)
        self.max_patches = int(max_patches)
        self.template = template
        self.system = system
        self.prompt_limit = prompt_limit or PromptLimit(None)  # no cap unless the loop sets one
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        # features of two encoders, or of a width the model was not built for, refuse the whole run
        self.provenance = check_feature_provenance((it.feature_path for it in self.items), self.feature_dim)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.prepare_item(self.items[i])

    def prepare_item(self, item: SlideBenchItem) -> Dict[str, Any]:
        """One row's collate input; unreadable features set ``item.error`` (also used by
        :class:`slidechat.inference.loop.SlideFamily`)."""
        out: Dict[str, Any] = {"item": item, "pad_token_id": self.pad_token_id}
        if not item.ok:
            return out
        # the length cap before reading features: characters first, then the text tokens (not the slide)
        ids, too_long = check_prompt_length(
            item.prompt, lambda: encode_prompt(self.tokenizer, [], item.prompt, self.template, self.system),
            self.prompt_limit, count=lambda t: sum(1 for x in t if x != IMAGE_TOKEN_INDEX))
        if too_long is not None:
            item.error = too_long
            logger.warning("row %s: %s", item.key, too_long)
            return out
        if item.feature_path is None:
            item.error = "no feature_root given: cannot find the slide's features"
            return out
        try:
            feats, coords = load_features(item.feature_path, num_columns=self.feature_dim,
                                          require_finite=True)
        except SlideChatError as e:
            item.error = str(e)
            logger.warning("row %s: %s", item.key, e)
            return out
        idx = uniform_indices(len(feats), self.max_patches)
        if len(idx) < len(feats):
            feats = feats[idx]
            coords = None if coords is None else coords[idx]
        out.update(input_ids=torch.tensor(ids, dtype=torch.long),
                   features=torch.from_numpy(np.ascontiguousarray(feats)),
                   coords=None if coords is None else torch.from_numpy(np.ascontiguousarray(coords)))
        return out


def slidebench_collate_fn(instances: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``{'data': <runnable rows, right-padded like training batches> | None, 'data_samples': items}``.

    ``data['rows']`` maps each runnable row to its position in ``data_samples``.
    """
    items = [x["item"] for x in instances]
    ok = [(j, x) for j, x in enumerate(instances) if x["item"].ok and "input_ids" in x]
    if not ok:
        return {"data": None, "data_samples": items}
    pad = int(ok[0][1]["pad_token_id"])
    max_len = max(len(x["input_ids"]) for _, x in ok)
    input_ids = torch.full((len(ok), max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(ok), max_len), dtype=torch.long)
    for b, (_, x) in enumerate(ok):
        n = len(x["input_ids"])
        input_ids[b, :n] = x["input_ids"]
        mask[b, :n] = 1
    coords = [x["coords"] for _, x in ok]
    data = {"input_ids": input_ids, "attention_mask": mask, "features": [x["features"] for _, x in ok],
            "coords": None if all(c is None for c in coords) else coords,
            "rows": [j for j, _ in ok]}
    return {"data": data, "data_samples": items}


def clean_output(text: str) -> str:
    """Generated text as written to the CSV: surrounding whitespace stripped (the writer quotes any
    line break inside, so the text is otherwise kept as generated)."""
    return text.strip()
