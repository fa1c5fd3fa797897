"""Batch SlideChat examples of any size (the original only worked at batch size 1).

Text is right-padded with the pad id (attention mask 0, labels IGNORE_INDEX); slides keep their own
patch counts, so features and coords stay lists. The result is shaped like xtuner's collate output,
``{'data': {...}, 'data_samples': None}``, which mmengine passes to ``model.forward(**batch)``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from slidechat.model.constants import IGNORE_INDEX


def pad_text_batch(instances: Sequence[Dict[str, Any]], pad_token_id: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` to the longest row, shared by the slide and image collators.

    Padding gets ``pad_token_id`` (default: the items' own), labels ``IGNORE_INDEX`` and mask 0.
    Returns ``(input_ids, labels, attention_mask)``, each ``(batch, max_len)`` long.
    """
    if not instances:
        raise ValueError("empty batch")
    if pad_token_id is None:
        pad_token_id = instances[0].get("pad_token_id")
        if pad_token_id is None:
            raise ValueError("no pad_token_id given and the items carry none")
    max_len = max(len(x["input_ids"]) for x in instances)
    bsz = len(instances)
    input_ids = torch.full((bsz, max_len), int(pad_token_id), dtype=torch.long)
    labels = torch.full((bsz, max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((bsz, max_len), dtype=torch.long)
    for b, x in enumerate(instances):
        n = len(x["input_ids"])
        input_ids[b, :n] = torch.as_tensor(x["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(x["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return input_ids, labels, attention_mask


def slidechat_collate_fn(instances: Sequence[Dict[str, Any]], pad_token_id: Optional[int] = None
                         ) -> Dict[str, Any]:
    """Pad ``input_ids``/``labels`` to the longest row; ``pad_token_id`` defaults to the items'."""
    input_ids, labels, attention_mask = pad_text_batch(instances, pad_token_id)
    features: List[torch.Tensor] = [torch.as_tensor(x["features"]) for x in instances]
    coords_list = [x.get("coords") for x in instances]
    coords = None if all(c is None for c in coords_list) else coords_list
    data = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "features": features,
        "coords": coords,
        "ids": [str(x.get("id", "")) for x in instances],
    }
    return {"data": data, "data_samples": None}
