"""Qwen2-VL supervised fine-tuning data (CytoChat): LLaMA-Factory datasets -> model inputs and labels.

Rows come from :func:`slidechat.data.llamafactory.read_llamafactory` (checked at construction: a bad
row fails naming file and row before any training, or is skipped and counted with ``skip_bad``).
Each item is built like LLaMA-Factory's supervised processor for the ``qwen2_vl`` template:
images scaled by LLaMA-Factory's rule (``image_max_pixels`` 768², ``image_min_pixels`` 32², sides
>= 28) then Qwen2-VL's image processor; each ``<image>`` expanded to ``t*h*w / merge²`` pad tokens;
loss only on assistant slots; ``cutoff_len`` truncation by ``infer_seqlen``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from slidechat.data.collate import pad_text_batch
from slidechat.data.dataset import build_object
from slidechat.data.image_sizes import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS
from slidechat.data.images import load_image, scale_image
from slidechat.data.llamafactory import Example, read_llamafactory
from slidechat.data.template import ConversationError, encode_qwen2vl, get_vision_template
from slidechat.model.constants import IGNORE_INDEX
from slidechat.model.hf_folder import load_processor
from slidechat.model.qwen2vl import check_qwen2vl_folder, family_of
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


def build_processor(processor: Any) -> Any:
    """A processor object, an xtuner-style config dict, or a local model folder path."""
    if isinstance(processor, (str, os.PathLike)):
        return load_processor(check_qwen2vl_folder(processor))  # never runs the folder's code
    if isinstance(processor, dict) and "type" in processor:
        return build_object(processor)
    return processor


def _family_template(processor: Any) -> str:
    return family_of(processor).lf_template


def _family_template_or_none(processor: Any) -> Optional[str]:
    try:
        return _family_template(processor)
    except SlideChatError:  # a processor of no known family, with an explicit template
        return None


class CytologySFTDataset(Dataset):
    """LLaMA-Factory sharegpt rows for Qwen VL training (``xtuner train`` configs use this)."""

    def __init__(self, dataset: str, processor: Any, dataset_dir: Optional[PathLike] = None,
                 template: Optional[str] = None, cutoff_len: int = 2048,
                 image_max_pixels: int = IMAGE_MAX_PIXELS, image_min_pixels: int = IMAGE_MIN_PIXELS,
                 max_samples: Optional[int] = None, skip_bad: bool = False,
                 default_system: Optional[str] = None, check_images: bool = True, lf_rules: bool = False,
                 media_dir: Optional[PathLike] = None) -> None:
        self.processor = build_processor(processor)
        self.tokenizer = self.processor.tokenizer
        # template None: the LLaMA-Factory template of the processor's family (qwen2_vl for Qwen2-VL and
        # Qwen2.5-VL, qwen3_vl for Qwen3-VL), so the model path alone selects the family
        family_template = _family_template(self.processor) if template is None else _family_template_or_none(
            self.processor)
        self.template = get_vision_template(template if template is not None else family_template)
        if family_template and self.template.name != family_template:  # LLaMA-Factory allows it; rarely meant
            logger.warning("template %s for a model whose family's LLaMA-Factory template is %s",
                           self.template.name, family_template)
        if cutoff_len < 8:
            raise SlideChatError(f"cutoff_len must be >= 8, got {cutoff_len}")
        self.cutoff_len = int(cutoff_len)
        self.image_max_pixels = int(image_max_pixels)
        self.image_min_pixels = int(image_min_pixels)
        self.default_system = default_system
        self.skip_bad = bool(skip_bad)
        # check_images: open every image header up front (a bad image fails before training starts);
        # False defers that to load time (then skip_bad replaces a bad row by the next good one)
        # lf_rules: rows LLaMA-Factory drops are dropped (counted), empty answers kept, as it trains;
        # media_dir: where relative image paths resolve (LLaMA-Factory's media_dir, default dataset_dir)
        self.examples: List[Example] = read_llamafactory(dataset, dataset_dir, skip_bad=skip_bad,
                                                         max_samples=max_samples, check_images=check_images,
                                                         lf_rules=lf_rules, media_dir=media_dir)
        self.num_skipped = self.examples.num_skipped  # type: ignore[attr-defined]
        self.num_skipped_at_load = 0
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(self.template.image_token)
        self.merge_length = int(getattr(self.processor.image_processor, "merge_size", 2)) ** 2
        self._dummy: Optional[Dict[str, Any]] = None

    def __len__(self) -> int:
        return len(self.examples)

    def _error(self, ex: Example, reason: str) -> SlideChatError:
        rid = f" (id {ex.id})" if ex.id is not None else ""
        return SlideChatError(f"row {ex.index}{rid}: {reason}", ex.source)

    def dummy_image(self) -> Dict[str, Any]:
        """LLaMA-Factory's fake image for a batch without images (``data/collator.py``): a white 64x64 RGB
        image through the same scaling and processor as real ones, and its ``<image>`` span's ids. The
        collator appends it to the batch's first row, masked and without loss, so the vision tower runs on
        every step (under ZeRO-3 a rank whose batch skips it would wait for the others forever)."""
        if self._dummy is None:
            from PIL import Image

            img = scale_image(Image.new("RGB", (64, 64), (255, 255, 255)), self.image_max_pixels,
                              self.image_min_pixels)
            vis = self.processor.image_processor(images=[img], return_tensors="pt")
            n = int(vis["image_grid_thw"].prod(-1)[0]) // self.merge_length
            tpl = self.template
            ids = self.tokenizer.encode(f"{tpl.vision_bos}{tpl.image_token * n}{tpl.vision_eos}",
                                        add_special_tokens=False)
            self._dummy = {"input_ids": torch.tensor(ids, dtype=torch.long),
                           "pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}
        return self._dummy

    def load_item(self, i: int) -> Dict[str, Any]:
        """Model inputs of row ``i``; a row that cannot be built raises a SlideChatError naming it."""
        ex = self.examples[i]
        images = []
        for path in ex.images:
            try:
                images.append(load_image(path, self.image_max_pixels, self.image_min_pixels))
            except SlideChatError as e:
                raise self._error(ex, f"{e.path}: {e.reason}") from None
        item: Dict[str, Any] = {"id": ex.id if ex.id is not None else str(ex.index),
                                "pad_token_id": self.pad_token_id}
        seqlens: List[int] = []
        if images:
            vis = self.processor.image_processor(images=images, return_tensors="pt")
            grid = vis["image_grid_thw"]
            seqlens = [int(n) for n in (grid.prod(-1) // self.merge_length).tolist()]
            item["pixel_values"] = vis["pixel_values"]
            item["image_grid_thw"] = grid
        try:
            system = ex.system_prompt(self.default_system, self.template)
            ids, labels = encode_qwen2vl(self.tokenizer, ex.messages, system, seqlens, cutoff_len=self.cutoff_len,
                                         default_system=self.default_system, template=self.template)
        except ConversationError as e:
            raise self._error(ex, str(e)) from None
        if ids.count(self.image_pad_id) != sum(seqlens):
            raise self._error(ex, f"cutoff_len={self.cutoff_len} cuts into the image tokens "
                                  f"({sum(seqlens)} needed); raise cutoff_len or lower image_max_pixels")
        if all(lab == IGNORE_INDEX for lab in labels):
            raise self._error(ex, f"no answer token left within cutoff_len={self.cutoff_len}")
        item["input_ids"] = torch.tensor(ids, dtype=torch.long)
        item["labels"] = torch.tensor(labels, dtype=torch.long)
        if not images:  # a text-only row: the collator may need the fake image (see dummy_image)
            item["dummy_image"] = self.dummy_image()
        return item

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not self.skip_bad:
            return self.load_item(i)
        for k in range(len(self.examples)):  # a row failing at load time is replaced by the next good one
            try:
                return self.load_item((i + k) % len(self.examples))
            except SlideChatError as e:
                self.num_skipped_at_load += 1
                logger.warning("skipping bad row at load time: %s", e)
        raise SlideChatError("every row failed to load")


def qwen2vl_collate_fn(instances: Sequence[Dict[str, Any]], pad_token_id: Optional[int] = None
                       ) -> Dict[str, Any]:
    """Right-pad text (labels IGNORE_INDEX, mask 0) and concatenate image patches and grids, as
    LLaMA-Factory's collator does for training; shaped like xtuner's ``{'data', 'data_samples'}``.

    A batch without any image gets LLaMA-Factory's fake image (same condition: the template has an image
    token, the batch no image and no video): its span is appended to the first row with attention mask
    0 and no loss, its pixels become the batch's images (:meth:`CytologySFTDataset.dummy_image`).
    """
    instances = list(instances)
    with_images = [x for x in instances if x.get("pixel_values") is not None]
    dummy = instances[0].get("dummy_image") if instances and not with_images else None
    n_fake = 0
    if dummy is not None:
        first = dict(instances[0])
        fake = torch.as_tensor(dummy["input_ids"], dtype=torch.long)
        n_fake = int(fake.numel())
        first["input_ids"] = torch.cat([torch.as_tensor(first["input_ids"], dtype=torch.long), fake])
        first["labels"] = torch.cat([torch.as_tensor(first["labels"], dtype=torch.long),
                                     torch.full((n_fake,), IGNORE_INDEX, dtype=torch.long)])
        instances[0] = first
        with_images = [dummy]
    input_ids, labels, attention_mask = pad_text_batch(instances, pad_token_id)
    if n_fake:
        n = len(instances[0]["input_ids"])
        attention_mask[0, n - n_fake:n] = 0
    data: Dict[str, Any] = {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "pixel_values": torch.cat([x["pixel_values"] for x in with_images]) if with_images else None,
        "image_grid_thw": torch.cat([x["image_grid_thw"] for x in with_images]) if with_images else None,
        "ids": [str(x.get("id", "")) for x in instances],
    }
    return {"data": data, "data_samples": None}
