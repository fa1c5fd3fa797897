"""The cytology copilot (a Qwen VL model) as a scorer of fields of view, for slide screening.

The field score is the model's **probability** of the abnormal option(s) of a multiple-choice question:
one forward pass, the logits at the answer position restricted to the first token of each option's
answer text (``A.Normal.`` -> ``A``), softmax over those. Nothing is parsed from generated text.
``option_mass`` (the full-vocabulary probability on the option tokens) says how much the model believes
it is answering the question at all. Grounding asks the free-text question (``Locate all abnormal
cells.``) and returns the greedy answers; parsing them is the caller's job.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from slidechat.data.image_sizes import lf_scaled_size
from slidechat.data.qwen2vl_batch import prepare_generation_batch
from slidechat.data.template import get_vision_template, render_qwen2vl_prompt
from slidechat.data.vocabulary import LETTERS
from slidechat.model.qwen2vl import family_of, last_token_logits, load_qwen2vl
from slidechat.utils.devices import resolve_device
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike


class ScorerSettings(Protocol):
    """What the field scorer reads of a run's settings (``slidechat.apps.screening.ScreenOptions``)."""

    prompt: str
    options: Tuple[str, ...]
    abnormal_options: Tuple[int, ...]
    ground_prompt: str
    image_max_pixels: int
    image_min_pixels: int
    max_new_tokens: int
    device: str
    trust_remote_code: bool
    allow_partial: bool


def option_token_ids(tokenizer: Any, options: Sequence[str]) -> List[int]:
    """First token of each option's answer text ``"<letter>.<option>."`` (how the model starts it).

    Options whose answers start with the same token cannot be told apart by one logit: an error.
    """
    ids: List[int] = []
    for i, o in enumerate(options):
        toks = tokenizer.encode(f"{LETTERS[i]}.{o}.", add_special_tokens=False)
        if not toks:
            raise SlideChatError(f"option {LETTERS[i]}.{o} tokenizes to nothing")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise SlideChatError(f"the answers of options {list(options)} start with the same token; "
                             f"option probabilities need distinct first tokens")
    return ids


def _check_options(opts: ScorerSettings) -> None:
    if not 2 <= len(opts.options) <= 10:
        raise SlideChatError(f"the screening question needs 2-10 options, got {len(opts.options)}")
    if not opts.abnormal_options or any(not 0 <= i < len(opts.options) for i in opts.abnormal_options):
        raise SlideChatError(f"abnormal option indices {list(opts.abnormal_options)} out of range for "
                             f"{len(opts.options)} options")


class FieldModel:
    """The cytology copilot as a field scorer: option probabilities (one forward) and grounding.

    ``opts`` are the run's settings (what :class:`ScorerSettings` lists); ``model``/``processor`` an
    already loaded model, else it is loaded from ``model_name_or_path`` on ``opts.device``.
    """

    def __init__(self, model_name_or_path: PathLike, adapter_name_or_path: Optional[PathLike] = None,
                 opts: Optional[ScorerSettings] = None, model: Any = None, processor: Any = None) -> None:
        if opts is None:
            raise TypeError("FieldModel needs opts: the run's settings (slidechat.apps.screening.ScreenOptions)")
        self.opts = opts
        if model is None:
            model, processor = load_qwen2vl(model_name_or_path, adapter_name_or_path,
                                            device=resolve_device(opts.device),
                                            trust_remote_code=opts.trust_remote_code,
                                            allow_partial=opts.allow_partial)
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.source = str(model_name_or_path)
        _check_options(opts)
        self.option_ids = option_token_ids(processor.tokenizer, opts.options)
        tpl = get_vision_template(family_of(model).lf_template)
        # a reasoning template (qwen3_vl) trains every answer after an empty thought: the option token is
        # scored after it (LLaMA-Factory's enable_thinking=False prompt), not at the thought's first token
        self.prompt_text = render_qwen2vl_prompt([{"role": "user", "content": "<image>" + opts.prompt}],
                                                 template=tpl) + tpl.empty_thought()
        self.ground_text = render_qwen2vl_prompt([{"role": "user", "content": "<image>" + opts.ground_prompt}],
                                                 template=tpl)

    def _batch(self, text: str, images: Sequence[Any]) -> Any:
        batch = prepare_generation_batch(self.processor, [text] * len(images), [[im] for im in images],
                                         image_max_pixels=self.opts.image_max_pixels,
                                         image_min_pixels=self.opts.image_min_pixels)
        return batch.to(self.device)

    def option_logits(self, images: Sequence[Any]) -> Any:
        """Logits (N, vocab) at the answer position (the last prompt token; prompts are left-padded).

        Same result as a stock ``model(**batch)`` on a fresh model, through
        :func:`slidechat.model.qwen2vl.last_token_logits`: the vision tower runs image by image (a
        batch of 8 would otherwise cost 8x per image) and the M-RoPE ``position_ids`` are explicit (a
        plain forward reuses ``rope_deltas`` cached by an earlier call and falls back to 1-D positions).
        """
        return self.logits_from_batch(self._batch(self.prompt_text, images))

    def logits_from_batch(self, batch: Any) -> Any:
        """Last-position logits of a prepared batch (see :meth:`option_logits`)."""
        return last_token_logits(self.model, batch)

    def option_probs(self, images: Sequence[Any]) -> Tuple[np.ndarray, np.ndarray]:
        """(N, n_options) softmax over the option tokens' logits, and the full-vocab mass on them."""
        logits = self.option_logits(images)
        ids = torch.tensor(self.option_ids, device=logits.device)
        sel = logits[:, ids]
        probs = torch.softmax(sel, dim=-1)
        mass = torch.softmax(logits, dim=-1)[:, ids].sum(-1)
        return probs.cpu().numpy().astype(np.float64), mass.cpu().numpy().astype(np.float64)

    def abnormal_score(self, probs: np.ndarray) -> np.ndarray:
        """P(abnormal) per field: the sum of the abnormal options' probabilities."""
        return probs[:, list(self.opts.abnormal_options)].sum(axis=1)

    def ground(self, images: Sequence[Any]) -> List[str]:
        """Greedy answers to the grounding prompt (special tokens skipped, as vllm_infer decodes)."""
        batch = self._batch(self.ground_text, images)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.opts.max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def provenance(self) -> Dict[str, Any]:
        """What the field tables' settings file records of the model."""
        return {"model": self.source, "option_token_ids": self.option_ids}


def model_image_size(field_px: int, opts: ScorerSettings) -> Tuple[int, int]:
    """Size of the field image the model sees after LLaMA-Factory's scaling (grounded boxes are in it)."""
    return lf_scaled_size((field_px, field_px), opts.image_max_pixels, opts.image_min_pixels)
