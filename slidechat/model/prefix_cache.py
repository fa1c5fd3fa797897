"""One prefill of a shared prompt prefix, many answers: the KV cache of the prefix is computed once and
each batch of questions continues from a copy of it (issue 14).

A SlideBench slide is 10,000-38,400 visual tokens in front of a 30-100-token question, so nearly all of
a row's compute is the prefill of the same prefix (system, user header, slide). Here the prefix is
prefilled once (batch 1) and every question of the slide is answered from a fork of that cache.

Exactness: the answers are those of the full-prompt path. Each question's sequence is laid out as
``[shared prefix | pad ... | own suffix]`` (padding in the MIDDLE, mask 0), so every real token keeps
the position it has in its full prompt: transformers' ``generate`` derives positions from the attention
mask's cumulative sum (``GenerationMixin._prepare_position_ids_for_generation``) and slices the inputs to
the tokens the cache does not hold yet (``GenerationMixin._prefill``: ``inputs_embeds`` / ``input_ids``
of the full length, ``next_sequence_length = length - cache length``). Nothing but floating-point
summation order differs from the full prefill; the tests check greedy answers token for token.

What is shared is only what is identical: :func:`common_prefix_len` is the longest common token prefix
of the group's prompts (never assumed), kept one token short of the shortest prompt so every row has a
suffix whose last logits start its answer.

Memory: one prefix cache at a time plus its fork to at most ``max_batch`` rows (the same as today's
batch of ``max_batch`` full prompts). :func:`fork_cache` copies the layer objects, not the tensors:
``DynamicLayer.update`` and ``crop`` replace tensors (``torch.cat`` / slicing), never write into them,
so the prefix cache stays valid for the next fork.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix of ``rows``, at most ``min(len) - 1`` (every row keeps >= 1 own token)."""
    if not rows:
        return 0
    first, cap = list(rows[0]), min(len(r) for r in rows) - 1
    n = 0
    while n < cap and all(r[n] == first[n] for r in rows):
        n += 1
    return max(n, 0)


def _base_model(llm: Any) -> Any:
    """The transformers model under a peft wrapper (its signature names the cache argument)."""
    get = getattr(llm, "get_base_model", None)
    return get() if callable(get) else llm


def cache_argument(llm: Any) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x): the forward's keyword."""
    params = inspect.signature(_base_model(llm).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def fork_cache(cache: Any, batch: int) -> Any:
    """A cache holding ``batch`` copies of ``cache``'s one row; ``cache`` itself is left as it is."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    if batch > 1:
        forked.batch_repeat_interleave(batch)
    else:  # the layers must not share tensors that a later in-place op could change
        for layer in forked.layers:
            if getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys):
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return forked


def prefill(llm: Any, cache: Any = None, **inputs: Any) -> Any:
    """Run ``llm`` on ``inputs`` (batch 1) into ``cache`` (a new one when None); returns the cache.
    Only the last position's logits are computed where the model allows (``logits_to_keep``)."""
    kw: Dict[str, Any] = dict(inputs, use_cache=True)
    kw[cache_argument(llm)] = cache
    if "logits_to_keep" in inspect.signature(_base_model(llm).forward).parameters:
        kw["logits_to_keep"] = 1
    return output_cache(llm(**kw))


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (in place)."""
    extra = cache.get_seq_length() - int(length)
    if extra > 0:
        cache.crop(-extra)


@dataclass
class PrefixCache:
    """A batch-1 KV cache kept between calls (a chat's turns) and the prompt ids it holds: ``ids[:n]``
    fill its positions, where an id may stand for several positions (a slide placeholder)."""

    cache: Any
    ids: List[int]


def shared_len(held: Sequence[int], row: Sequence[int]) -> int:
    """How many leading ids of ``row`` a cache holding ``held`` already covers (``row`` keeps >= 1 own id)."""
    n, cap = 0, min(len(held), len(row) - 1)
    while n < cap and held[n] == row[n]:
        n += 1
    return n


def middle_padded(prefix: Tensor, suffixes: Sequence[Tensor], pad: Any) -> "tuple[Tensor, Tensor]":
    """``[prefix | pad ... | suffix_i]`` for every row, and its attention mask (0 on the pads).

    ``prefix`` is ``[P, ...]`` and each suffix ``[S_i, ...]`` (ids or embeddings); ``pad`` fills the gap
    (a pad id, or 0 for embeddings)."""
    width = max(int(s.shape[0]) for s in suffixes)
    p = int(prefix.shape[0])
    out = prefix.new_full((len(suffixes), p + width, *prefix.shape[1:]), pad)
    mask = torch.zeros(len(suffixes), p + width, dtype=torch.long, device=prefix.device)
    out[:, :p] = prefix
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        n = int(s.shape[0])
        out[i, p + width - n:] = s
        mask[i, p + width - n:] = 1
    return out, mask


def generate_from_prefix(llm: Any, prefix_cache: Any, prefix: Tensor, suffixes: Sequence[Tensor], *,
                         embeds: bool, pad: Any = 0, fork: bool = True, **gen_kwargs: Any) -> Tensor:
    """``llm.generate`` for rows ``prefix + suffix_i`` whose prefix is already in ``prefix_cache``.

    ``embeds``: the rows are ``inputs_embeds`` (``[L, H]``) rather than ids. ``fork=False`` lets the call
    extend ``prefix_cache`` itself (one row: a chat keeps it for its next turn). Returns the new tokens
    ``[B, T]`` (stop/pad tokens included, as ``generate`` returns them).
    """
    if prefix_cache.get_seq_length() != int(prefix.shape[0]):
        raise RuntimeError(f"prefix cache holds {prefix_cache.get_seq_length()} positions, "
                           f"the prefix {int(prefix.shape[0])}")
    seq, mask = middle_padded(prefix, suffixes, pad)
    cache = fork_cache(prefix_cache, len(suffixes)) if fork else prefix_cache
    kw = dict(gen_kwargs, attention_mask=mask, use_cache=True)
    kw[cache_argument(llm)] = cache
    if embeds:
        return llm.generate(inputs_embeds=seq, **kw)  # embeddings in: only the new tokens come back
    out = llm.generate(input_ids=seq, **kw)
    return out[:, seq.shape[1]:]
