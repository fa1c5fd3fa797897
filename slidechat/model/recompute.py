"""Activation checkpointing (recompute in the backward pass) of a Hugging Face model, one rule for both families.

transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
name still works but warns on every training run). Non-reentrant checkpointing, as the training configs
have always used; the inputs' embeddings require grad so a frozen LLM still back-propagates to the
slide encoder / vision tower in front of it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["enable_activation_checkpointing"]


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on non-reentrant activation checkpointing of ``model`` (a transformers or peft model)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
