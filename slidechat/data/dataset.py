"""SlideInstruction-style training data: JSON/JSONL rows -> token ids, labels and slide features.

Cheap checks (JSON structure, roles, ``<image>``, empty answers, feature file present, and the feature
files' provenance: one encoder, of the width ``feature_dim`` says) run at construction so a bad file
fails before any GPU time is spent; NaN/Inf features are only seen when a
slide is loaded. Either way the error names the file and the row (``id`` or index). With
``skip_bad=True`` such rows are skipped and counted instead.

Two row formats: SlideChat's (``id``, ``image: [name]``, ``conversations`` from/value, feature files under
``feature_root``) and LLaMA-Factory's (``messages`` + ``images``, a JSON/JSONL path or names registered in
``dataset_dir/dataset_info.json``), read by the same :func:`slidechat.data.llamafactory.read_llamafactory`
as the cytology model; there each row's single "image" is its feature file (H5/CSV, suffix optional),
relative to ``dataset_dir`` (default: the data file's folder), and a system message is honoured.

Sequence budget: each patch becomes one visual token replacing the single ``<image>`` id, so an
example costs ``len(text) - 1 + n_patches`` positions. Patches are first capped at ``max_patches``
(uniform ``np.linspace`` over rows, as the original), then, if the total still exceeds
``max_length``, further subsampled uniformly to fit. Text is truncated (from the end) only when the
text alone leaves fewer than ``min_patches`` positions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from slidechat.data.llamafactory import DATA_CONFIG, load_dataset_info, read_llamafactory, read_raw_rows
from slidechat.data.template import (ConversationError, describe_template, encode_conversation,
                                     normalize_conversation, resolve_template)
from slidechat.features.io import FEATURE_SUFFIXES, check_feature_provenance, find_feature_file, load_features
from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


def _print_log(msg: str) -> None:
    """To the runner's log file when a runner's logger exists (training), else ``logging`` (no mmengine
    logger is created just for this: it would print to the console of library users)."""
    try:
        from mmengine.logging import MMLogger, print_log

        if getattr(MMLogger, "_instance_dict", None):
            print_log(msg, logger="current", level=logging.INFO)
            return
    except Exception:  # noqa: BLE001 - logging only
        pass
    logger.info(msg)


def build_object(obj: Any) -> Any:
    """Build an mmengine/xtuner-style ``dict(type=callable, **kwargs)``; anything else as is."""
    if isinstance(obj, dict) and "type" in obj:
        kwargs = {k: v for k, v in obj.items() if k != "type"}
        fn = obj["type"]
        if not callable(fn):
            raise SlideChatError(f"cannot build object of type {fn!r}: not callable")
        return fn(**kwargs)
    return obj


def read_rows(data_path: PathLike, raw_rows: Optional[List[Any]] = None) -> List[Any]:
    """A JSON list, or JSONL (one object per line); errors name the file (and line for JSONL).

    ``raw_rows``: the file as :func:`slidechat.data.llamafactory.read_raw_rows` already read it (not
    read again)."""
    p = Path(data_path)
    rows: List[Any] = []
    if raw_rows is None:
        raw_rows = read_raw_rows(p, kind="training data file")
    for _, lineno, row, error in raw_rows:
        if error is not None:  # SlideChat training has no skip for unparsable lines: stop at the first
            raise SlideChatError(f"line {lineno}: {error}", p)
        rows.append(row)
    return rows


def resolve_feature_path(name: str, feature_root: Optional[PathLike]) -> Optional[Path]:
    """``name`` (e.g. ``TCGA-XX.csv``, with or without suffix) under ``feature_root``, H5 preferred."""
    p = Path(name)
    if not p.is_absolute() and feature_root is not None:
        p = Path(feature_root) / p
    if p.suffix.lower() in FEATURE_SUFFIXES:
        p = p.with_suffix("")
    return find_feature_file(p)


def sniff_training_data(data_path: PathLike, dataset_dir: Optional[PathLike] = None
                        ) -> Tuple[bool, Optional[List[Any]]]:
    """``(is_llamafactory, raw_rows)``: whether ``data_path`` names LLaMA-Factory data (a name in
    ``dataset_dir/dataset_info.json``, or a JSON/JSONL file whose first row has ``messages`` or ``images``;
    SlideChat rows have ``image``), and the file's raw rows (``read_raw_rows``) when it had to be read to
    tell, else None, so a SlideChat file is parsed once, not twice."""
    names = [n.strip() for n in str(data_path).split(",") if n.strip()]
    if dataset_dir is not None and (Path(dataset_dir) / DATA_CONFIG).is_file():
        registry = load_dataset_info(dataset_dir)
        if any(n in registry for n in names):
            return True, None
    p = Path(data_path)
    if len(names) != 1 or not p.is_file():
        return len(names) > 1, None
    raw_rows = read_raw_rows(p)
    first = next((row for _, _, row, err in raw_rows if err is None), None)
    is_lf = isinstance(first, dict) and ("messages" in first or ("images" in first and "image" not in first))
    return is_lf, raw_rows


def uniform_indices(n: int, k: int) -> np.ndarray:
    """``k`` row indices spread evenly over ``n`` rows (all rows when ``n <= k``)."""
    if n <= k:
        return np.arange(n)
    return np.linspace(0, n - 1, num=k, dtype=np.int64)


class SlideInstructionDataset(Dataset):
    """SlideChat training JSON (``id``, ``image: [name]``, ``conversations``) for any stage.

    ``tokenizer`` may be a tokenizer or an xtuner-style config dict. ``feature_root`` replaces the
    original's ignored ``image_folder``.
    """

    def __init__(self, data_path: PathLike, tokenizer: Any, feature_root: Optional[PathLike] = None,
                 max_length: int = 51200, max_patches: int = 10240, min_patches: int = 1,
                 feature_dim: int = 512, template: str = "qwen_chat", system: str = "",
                 skip_bad: bool = False, check_files: bool = True,
                 dataset_dir: Optional[PathLike] = None,
                 chat_template_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.data_path = Path(data_path)
        self.tokenizer = build_object(tokenizer)
        self.feature_root = None if feature_root is None else Path(feature_root)
        if max_patches < 1 or min_patches < 1 or max_length < min_patches + 1:
            raise SlideChatError(f"bad limits: max_length={max_length}, max_patches={max_patches}, "
                                 f"min_patches={min_patches}", self.data_path)
        self.max_length = int(max_length)
        self.max_patches = int(max_patches)
        self.min_patches = int(min_patches)
        self.feature_dim = feature_dim
        try:  # 'qwen_chat' (compat) or 'chat_template' (the tokenizer's own; see data.template)
            self.template = resolve_template(template, chat_template_kwargs)
        except ConversationError as e:
            raise SlideChatError(str(e), self.data_path) from None
        _print_log(f"{self.data_path.name}: prompt format {describe_template(self.template)}")
        self.system = system
        self.skip_bad = skip_bad
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.rows: List[Dict[str, Any]] = []
        self.num_skipped = 0
        self.num_skipped_at_load = 0
        is_lf, raw_rows = sniff_training_data(data_path, dataset_dir)
        if is_lf:
            self._read_llamafactory(str(data_path), dataset_dir, check_files)
        else:
            for index, row in enumerate(read_rows(self.data_path, raw_rows)):
                try:
                    self.rows.append(self._validate(index, row, check_files))
                except SlideChatError as e:
                    if not skip_bad:
                        raise
                    self.num_skipped += 1
                    logger.warning("skipping bad row: %s", e)
        if self.num_skipped:
            logger.warning("%s: skipped %d bad row(s) of %d", self.data_path, self.num_skipped,
                           self.num_skipped + len(self.rows))
        if not self.rows:
            raise SlideChatError("no usable rows", self.data_path)
        self.provenance = check_feature_provenance((r["path"] for r in self.rows), self.feature_dim)
        if self.provenance is not None:
            _print_log(f"{self.data_path.name}: features of {self.provenance.describe()}")

    def _row_name(self, index: int, row: Any) -> str:
        rid = row.get("id") if isinstance(row, dict) else None
        return f"row {index} (id {rid})" if rid is not None else f"row {index}"

    def _error(self, index: int, row: Any, reason: str, source: Optional[Path] = None) -> SlideChatError:
        """``source``: the file a LLaMA-Factory record came from (default: ``data_path``). Never read from
        ``row`` itself: a SlideChat row may carry its own ``source`` field."""
        return SlideChatError(f"{self._row_name(index, row)}: {reason}", source or self.data_path)

    def _read_llamafactory(self, dataset: str, dataset_dir: Optional[PathLike], check_files: bool) -> None:
        """Rows in LLaMA-Factory's format (``messages`` + ``images``, or a ``dataset_info.json`` name),
        read by the same reader as the cytology model; each row's one "image" is its feature file."""
        def check_feature_file(p: Path) -> None:
            if resolve_feature_path(str(p), None) is None:
                raise SlideChatError(f"feature file not found (tried {', '.join(FEATURE_SUFFIXES)})", p)

        examples = read_llamafactory(dataset, dataset_dir, skip_bad=self.skip_bad, check_images=check_files,
                                     check_image=check_feature_file)
        self.num_skipped = examples.num_skipped
        for ex in examples:
            conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                    for m in ex.messages]
            rec = {"index": ex.index, "id": ex.id if ex.id is not None else str(ex.index),
                   "image": str(ex.images[0]) if ex.images else "", "conversations": conv,
                   "system": ex.system, "source": ex.source}
            try:
                if ex.tools:  # never dropped silently: the slide templates have no tool format
                    raise self._error(ex.index, rec, "a 'tools' column is not supported for slide models "
                                                     "(only the qwen2_vl template writes tools)", ex.source)
                if len(ex.images) != 1:
                    raise self._error(ex.index, rec, f"a slide sample needs exactly one feature file in its "
                                                     f"images, got {len(ex.images)}", ex.source)
                try:
                    normalize_conversation(conv)
                except ConversationError as e:
                    raise self._error(ex.index, rec, str(e), ex.source) from None
            except SlideChatError as e:
                if not self.skip_bad:
                    raise
                self.num_skipped += 1
                logger.warning("skipping bad row: %s", e)
                continue
            rec["path"] = resolve_feature_path(rec["image"], None)
            self.rows.append(rec)

    def _validate(self, index: int, row: Any, check_files: bool) -> Dict[str, Any]:
        if not isinstance(row, dict):
            raise self._error(index, row, f"expected an object, got {type(row).__name__}")
        image = row.get("image")
        if isinstance(image, list):
            if len(image) != 1 or not isinstance(image[0], str):
                raise self._error(index, row, f"'image' must list exactly one slide, got {image!r}")
            image = image[0]
        if not isinstance(image, str) or not image:
            raise self._error(index, row, "missing 'image' (the slide's feature file name)")
        try:
            normalize_conversation(row.get("conversations"))
        except ConversationError as e:
            raise self._error(index, row, str(e)) from None
        path = resolve_feature_path(image, self.feature_root)
        if path is None and check_files:
            where = self.feature_root if self.feature_root is not None else "the current directory"
            raise self._error(index, row, f"feature file for '{image}' not found under {where} "
                                          f"(tried {', '.join(FEATURE_SUFFIXES)})")
        return {"index": index, "id": str(row.get("id", index)), "image": image,
                "path": path, "conversations": row["conversations"]}

    def __len__(self) -> int:
        return len(self.rows)

    def fit_lengths(self, n_text: int, n_patches: int) -> tuple:
        """``(text_tokens_kept, patches_kept)`` under ``max_patches`` and ``max_length``."""
        n_patches = min(n_patches, self.max_patches)
        text_budget = self.max_length - self.min_patches + 1  # the placeholder is not a position
        n_text_kept = min(n_text, text_budget)
        n_patches = min(n_patches, self.max_length - (n_text_kept - 1))
        return n_text_kept, n_patches

    def load_item(self, i: int) -> Dict[str, Any]:
        """Load row ``i``; raises SlideChatError on unreadable or non-finite features."""
        rec = self.rows[i]
        path = rec["path"] or resolve_feature_path(rec["image"], self.feature_root)
        if path is None:
            raise self._error(rec["index"], rec, f"feature file for '{rec['image']}' not found",
                              rec.get("source"))
        try:
            feats, coords = load_features(path, num_columns=self.feature_dim, require_finite=True)
        except SlideChatError as e:  # name the training row too
            raise SlideChatError(f"{self._row_name(rec['index'], rec)}: {e.reason}", path) from None
        try:
            enc = encode_conversation(self.tokenizer, rec["conversations"], self.template,
                                      rec.get("system") or self.system)
        except ConversationError as e:  # e.g. a chat template whose answer spans miss token edges
            raise self._error(rec["index"], rec, str(e), rec.get("source")) from None
        input_ids, labels = enc["input_ids"], enc["labels"]
        n_text, n_patches = self.fit_lengths(len(input_ids), len(feats))
        if n_text < len(input_ids):
            logger.warning("%s %s: text of %d tokens truncated to %d to fit max_length=%d",
                           self.data_path, self._row_name(rec["index"], rec), len(input_ids),
                           n_text, self.max_length)
            input_ids, labels = input_ids[:n_text], labels[:n_text]
            if IMAGE_TOKEN_INDEX not in input_ids:
                raise self._error(rec["index"], rec, "max_length too small to keep the slide",
                                  rec.get("source"))
            if all(x == IGNORE_INDEX for x in labels):
                logger.warning("%s %s: no answer token left after truncation",
                               self.data_path, self._row_name(rec["index"], rec))
        idx = uniform_indices(len(feats), n_patches)
        feats = feats[idx]
        if coords is not None:
            coords = coords[idx]
        return {
            "id": rec["id"],
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "coords": None if coords is None else torch.from_numpy(np.ascontiguousarray(coords)),
            "pad_token_id": self.pad_token_id,
        }

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not self.skip_bad:
            return self.load_item(i)
        for k in range(len(self.rows)):  # a bad slide is replaced by the next good one
            try:
                return self.load_item((i + k) % len(self.rows))
            except SlideChatError as e:
                self.num_skipped_at_load += 1
                logger.warning("skipping bad row at load time: %s", e)
        raise SlideChatError("every row failed to load", self.data_path)
