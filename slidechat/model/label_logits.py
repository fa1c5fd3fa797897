"""The causal-LM training loss with the output head applied only where a label is.

A Hugging Face ``...ForCausalLM(labels=...)`` call projects every position onto the whole vocabulary,
upcasts those logits to float32 and then ignores every position whose (shifted) label is ``-100``. In
SlideChat that is every visual token: with a 151,936-token vocabulary and thousands of patches, those
unused logits (their upcast and their gradient) were most of a training step's memory and time
(issue 18). Here the decoder runs as usual, the head is applied to the hidden states of labelled
positions only, and the loss is reduced as transformers 4.48 does (``loss_utils.ForCausalLMLoss``;
Qwen2-VL's inline ``CrossEntropyLoss()`` is its ``num_items_in_batch=None`` case). Only float32 summation
order differs from the stock call. Both model families (``SlideChatModel`` and ``Qwen2VLTrainModel``)
use this one helper.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from slidechat.model.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: model types whose ``ForCausalLM.forward`` in transformers 4.48 computes ``logits = lm_head(hidden)`` and
#: ``loss_function(logits, labels)`` with nothing in between (read in the installed source). Others (Gemma-2
#: soft-capping, Cohere/Granite logit scaling, MoE auxiliary losses, ...) keep the stock call. ``qwen3``:
#: ``Qwen3ForCausalLM.forward`` in transformers 5.25 is the same (``lm_head`` on the decoder's last hidden
#: state, then ``self.loss_function``), checked in the installed source.
PLAIN_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "phi3", "gemma", "olmo2"})

_fallback_logged: set = set()


def loss_at_labels(hidden: Tensor, lm_head: nn.Module, labels: Tensor,
                   num_items_in_batch: Optional[Any] = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token cross-entropy from decoder states ``hidden`` [B, L, H] and ``labels`` [B, L].

    Position ``t`` predicts ``labels[t + 1]``; the head sees only positions whose shifted label is not
    ``ignore_index``. Logits are upcast to float32 before the loss, as transformers does. Reduction as
    ``ForCausalLMLoss``: summed and divided by ``num_items_in_batch`` when it is given, else the mean over
    labelled tokens (NaN when there are none, like the stock call).
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    shift_labels = labels[:, 1:].to(hidden.device)
    keep = shift_labels != ignore_index
    logits = lm_head(hidden[:, :-1][keep]).float()
    target = shift_labels[keep]
    if num_items_in_batch is not None:
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")


def _peft_base(llm: nn.Module) -> Optional[nn.Module]:
    """The Hugging Face model inside a peft wrapper (``llm`` itself when not wrapped); ``None`` for
    prompt-learning adapters, whose forward changes the inputs and so must stay the stock call."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return llm
    if not isinstance(llm, PeftModel):
        return llm
    cfg = llm.peft_config.get(llm.active_adapter) if hasattr(llm, "peft_config") else None
    if cfg is None or getattr(cfg, "is_prompt_learning", False):
        return None
    return llm.get_base_model()


def causal_lm_parts(llm: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """``(decoder, lm_head)`` of a plain or peft(LoRA)-wrapped causal LM whose stock loss
    :func:`loss_at_labels` reproduces; ``None`` (stock path) for any other model.

    The decoder is the model's own submodule, so gradient checkpointing set on it, LoRA layers injected
    in it and DeepSpeed's parameter hooks all act as in the stock call; ``lm_head`` is called as a module
    (peft ``modules_to_save`` wrappers and ZeRO-3 gathering included).
    """
    base = _peft_base(llm)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    reason = None
    if base is None:
        reason = "a peft prompt-learning adapter"
    elif model_type not in PLAIN_HEAD_MODEL_TYPES:
        reason = f"model_type {model_type!r} is not known to compute logits as lm_head(hidden)"
    elif not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        reason = f"{type(base).__name__} has no get_decoder/get_output_embeddings"
    else:
        from transformers.loss.loss_utils import ForCausalLMLoss

        if getattr(base, "loss_function", None) is not ForCausalLMLoss:
            reason = f"{type(base).__name__} does not use ForCausalLMLoss"
    if reason is None:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if decoder is not None and head is not None:
            return decoder, head
        reason = f"{type(base).__name__} has no decoder or output head"
    if reason not in _fallback_logged:
        _fallback_logged.add(reason)
        logger.info("training loss over full-vocabulary logits at every position: %s", reason)
    return None
