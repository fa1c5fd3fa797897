"""Which patches drove an answer: gradient x input of the answer's log-likelihood per patch.

**Method.** For a slide model's answer ``a`` (token ids) to a prompt ``q`` about a slide whose patch
features are ``x_1..x_N`` (the rows the model was given, each ``D``-d), the relevance of patch ``i`` is

    s_i = sum_d x_id * d/dx_id log p(a | q, x)

where ``log p(a | q, x)`` is the teacher-forced log-likelihood of the answer's tokens (the sum of their
log-softmax probabilities, the same quantity whose negative mean is the training loss). ``s_i`` is signed:
positive means that, to first order, *more* of patch ``i`` (its feature vector scaled up) makes this answer
*more* likely; negative means the patch argues against it. Exactly: ``s_i = d/de log p(a | q, x with x_i
scaled by (1 + e))`` at ``e = 0`` -- the sensitivity of the answer to turning the patch up or down. A patch
with all-zero features scores 0. One forward and one backward pass through the slide encoder and the LLM
(on a single-GPU model, seconds; no per-patch forward as occlusion would need); no parameter gradient is
formed, the model is run in eval mode (no dropout) and left in the mode it was in.

**Which tokens are scored.** ``answer_ids`` are scored exactly as given. For a chat answer they should be
:func:`scored_answer_ids`: the generated tokens (stop token cut off, as ``ChatSession`` produced them) plus
the end-of-turn token of the model's training template (``<|im_end|>`` for ``qwen_chat``), unless the
answer was cut at ``max_new_tokens``. Training puts the end-of-turn token in the answer's loss
(``slidechat.data.template``: answer + suffix is labelled), so the score is the evidence for "this answer,
and nothing more", the quantity the model was trained to raise; a truncated answer never ended, so it has
no end-of-turn token to score.

**Limits (read before trusting a map).**

- It is a first-order, local explanation: it says how the answer's likelihood moves for a small change of
  each patch's features, not what happens if a patch is removed (the encoder and attention are
  non-linear; occlusion can disagree). Saturated patches (the model is sure either way) can score low.
- It explains the *features*, not pixels: a patch scores high because of its encoder embedding; what in the
  tissue caused that embedding is outside the method.
- Scores are relative to this answer and this conversation; different answers to the same question give
  different maps, and the sum of scores is not the log-likelihood (no completeness axiom).
- A random or undertrained model gives a map too: the map is only as meaningful as the model (the serve
  page shows the model line next to it).
- The gradient is the model's own backward pass. SlideChat's LongNet encoder (as torchscale's) mixes its
  dilated-attention branches with softmax weights of their log-sum-exps that carry no gradient (the
  fused attention kernels do not differentiate them), so with several branches the score treats those
  mixing weights as constants: the gradient training follows, exact for a one-branch encoder. On the
  tiny test model (two branches) this moved scores by about 2% of the largest one.
- Precision follows the model's dtype: the features are differentiated in float32 (float64 for a float64
  encoder) and the answer's logits are upcast to float32, but a bfloat16 LLM computes its backward pass in
  bfloat16 (and the encoder mixes its branches in float32 whatever its dtype).
- Long answers are explained as a whole (the sum over their tokens), not token by token.
- Cost: the backward pass keeps the activations of the whole prompt, slide tokens included, like a
  training step without optimizer state (no parameter gradients are formed). A slide that a model can
  answer about may still not fit for evidence; the out-of-memory error reaches the caller, who can show the
  answer without a map. Not measured on a GPU or a 7B model yet.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidechat.data.template import ChatTemplate, config_template, resolve_template, tokenize_pairs
from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from slidechat.model.slidechat_model import SlideChatModel
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

#: what :attr:`PatchEvidence.method` says (shown beside every evidence map)
METHOD = "gradient x input of log p(answer | prompt, slide) w.r.t. patch features"


@dataclass
class PatchEvidence:
    """One answer's per-patch relevance (row ``i`` of ``scores`` is row ``i`` of the features given)."""

    scores: np.ndarray      # (N,) float64, signed; > 0: the patch supports the answer
    method: str
    log_likelihood: float   # log p(answer | prompt, slide), natural log, summed over the scored tokens


@contextlib.contextmanager
def _inference_only(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while inside; every module's mode and every parameter's
    ``requires_grad`` are put back as they were (a training caller gets its model back unchanged)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _as_tensor(x: Union[Tensor, np.ndarray], what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        return x
    raise SlideChatError(f"{what} must be a tensor or an array, got {type(x).__name__}")


def _answer_log_prob(model: SlideChatModel, embeds: Tensor, answer: Tensor) -> Tensor:
    """Sum of log p(answer token | everything before it) for the answer at the end of ``embeds`` [1, T, H].

    The stock ``llm(...)`` call with ``logits_to_keep``: the model computes its logits its own way
    (soft-capping, peft wrappers), only the last ``n + 1`` positions go through the head."""
    n = int(answer.shape[0])
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=n + 1)
    logits = out.logits[0, -(n + 1):-1]              # position t predicts token t + 1
    if logits.dtype != torch.float64:
        logits = logits.float()                      # as the training loss does; a float64 model stays so
    if logits.shape[0] != n:
        raise SlideChatError(f"the LLM returned {out.logits.shape[1]} logit rows, expected {n + 1}")
    return F.log_softmax(logits, dim=-1).gather(1, answer.to(logits.device)[:, None]).sum()


def answer_evidence(model: SlideChatModel, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                    features: Union[Tensor, np.ndarray], coords: Optional[Union[Tensor, np.ndarray]] = None
                    ) -> PatchEvidence:
    """Per-patch gradient x input of ``log p(answer_ids | prompt_ids, features)`` (see the module doc).

    ``prompt_ids`` hold the one slide placeholder (``IMAGE_TOKEN_INDEX``) and end where the answer starts
    (the open assistant turn); ``features`` [N, D] and ``coords`` [N, 2] are exactly what the model was
    given when it answered (after any subsampling), so the scores line up with those rows.
    """
    feats = _as_tensor(features, "features")
    if feats.dim() != 2 or feats.shape[0] == 0:
        raise SlideChatError(f"no patches to explain: features have shape {tuple(feats.shape)} "
                             f"(expected [N>0, {model.config.feature_dim}])")
    if not torch.isfinite(feats).all():
        raise SlideChatError("features hold NaN or infinite values; evidence would be meaningless")
    prompt = [int(t) for t in prompt_ids]
    answer = [int(t) for t in answer_ids]
    if prompt.count(IMAGE_TOKEN_INDEX) != 1:
        raise SlideChatError(f"the prompt must hold exactly one slide placeholder ({IMAGE_TOKEN_INDEX}), "
                             f"it holds {prompt.count(IMAGE_TOKEN_INDEX)}")
    if not answer:
        raise SlideChatError("no answer tokens to explain (empty answer_ids)")
    if any(t < 0 for t in answer):
        raise SlideChatError("answer_ids hold a negative id (a placeholder or ignore index is not an answer)")
    enc = next(model.LongNet_encoder.parameters())
    work = torch.float64 if enc.dtype == torch.float64 else torch.float32
    x = feats.detach().to(device=enc.device, dtype=work).clone().requires_grad_(True)
    c = None if coords is None else [_as_tensor(coords, "coords")]
    ids = torch.tensor(prompt + answer, dtype=torch.long)
    with _inference_only(model), torch.enable_grad():
        vis = model.encode_slides([x], c)[0]
        embeds = model.prompt_embeddings([ids], [vis])[0][None]
        log_p = _answer_log_prob(model, embeds, torch.tensor(answer, dtype=torch.long))
        (grad,) = torch.autograd.grad(log_p, [x])
    scores = (x.detach().double() * grad.double()).sum(dim=1).cpu().numpy()
    ll = float(log_p.detach())
    if not np.isfinite(ll) or not np.isfinite(scores).all():
        raise SlideChatError(f"evidence is not finite (log-likelihood {ll}); the model overflowed in its "
                             f"dtype ({enc.dtype})")
    logger.debug("evidence: %d patches, %d answer tokens, log p = %.4f", len(scores), len(answer), ll)
    return PatchEvidence(scores=scores, method=METHOD, log_likelihood=ll)


def end_of_turn_ids(tokenizer: Any, template: Any = "qwen_chat") -> List[int]:
    """The token(s) the training template labels right after an answer: ``qwen_chat``'s suffix
    (``<|im_end|>``), or for ``chat_template`` the end-of-turn token the tokenizer's template writes
    (found by labelling a probe conversation exactly as training does)."""
    tpl = resolve_template(template)
    if isinstance(tpl, ChatTemplate):
        return [int(t) for t in tokenizer.encode(tpl.suffix, add_special_tokens=False)] if tpl.suffix else []
    probe = "ok"
    _, labels = tokenize_pairs(tokenizer, [(f"{IMAGE_TOKEN}\nq", probe)], tpl)
    labelled = [t for t in labels if t != IGNORE_INDEX]
    answer = tokenizer.encode(probe, add_special_tokens=False)
    if labelled[:len(answer)] != answer or len(labelled) == len(answer):
        logger.warning("could not find the chat template's end-of-turn token; scoring the answer alone")
        return []
    return labelled[-1:]


def scored_answer_ids(model: SlideChatModel, generated_ids: Sequence[int], *, truncated: bool,
                      tokenizer: Any = None, template: Any = None) -> List[int]:
    """The ids :func:`answer_evidence` should score for a generated answer: the tokens as generated (stop
    token excluded) plus the template's end-of-turn token, as training labels an answer, unless the
    answer was ``truncated`` at ``max_new_tokens``. ``tokenizer``/``template`` default to the model's."""
    ids = [int(t) for t in generated_ids]
    if truncated:
        return ids
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise SlideChatError("the model has no tokenizer; pass tokenizer= to find the end-of-turn token")
    if template is None:
        cfg = model.config
        template = config_template(cfg.prompt_template, cfg.chat_template_kwargs)
    return ids + end_of_turn_ids(tok, template)


def top_patches(scores: np.ndarray, coords: np.ndarray, patch_size_level0: int, k: int = 10
                ) -> List[Tuple[int, int, int, int, float]]:
    """The ``k`` highest-scoring patches as ``(x, y, w, h, score)`` boxes in level-0 pixels, best first.

    ``coords`` are the patches' level-0 top-left corners (rows matching ``scores``); every box is
    ``patch_size_level0`` square. Ties keep the patches' order (the earlier row first), so a listing is
    reproducible. Scores are signed: when fewer than ``k`` patches score above 0, negative ones follow,
    and the caller shows the sign.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] != s.shape[0]:
        raise ValueError(f"coords must be [N, 2] for {s.shape[0]} scores, got {c.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    if int(patch_size_level0) <= 0:
        raise ValueError(f"patch_size_level0 must be positive, got {patch_size_level0}")
    if int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order = np.argsort(-s, kind="stable")[: int(k)]
    size = int(patch_size_level0)
    return [(int(c[i, 0]), int(c[i, 1]), size, size, float(s[i])) for i in order]
