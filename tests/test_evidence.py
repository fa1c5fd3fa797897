"""Answer evidence (``slidechat.inference.evidence``), checked against its definition.

The relevance of patch i is s_i = sum_d x_id * d/dx_id log p(answer | prompt, slide). Equivalently
s_i = d/de log p(answer | prompt, slide with x_i scaled by (1 + e)) at e = 0, which a finite difference
measures without any gradient code; log p itself is checked against the model's own training loss.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slidechat.data.template import encode_prompt, tokenize_pairs  # noqa: E402
from slidechat.inference.evidence import (METHOD, answer_evidence, end_of_turn_ids, scored_answer_ids,  # noqa: E402
                                          top_patches)
from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN  # noqa: E402
from slidechat.model.slide_encoder import SlideEncoderConfig  # noqa: E402
from slidechat.model.slidechat_model import SlideChatConfig, SlideChatModel  # noqa: E402
from slidechat.model.tiny_llm import make_tiny_llm  # noqa: E402
from slidechat.utils.errors import SlideChatError  # noqa: E402
from tolerances import FP32_RTOL, max_rel_diff  # noqa: E402

N_PATCHES = 20   # more than one LongNet segment (8, 16): patches interact through the encoder
FEAT_DIM = 32
ANSWER = "Invasive carcinoma with necrosis."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("evidence_llm"))


def build_model(tiny_dir, dtype=torch.float32, dropout: float = 0.0, seed: int = 0,
                segments=((8, 16), (1, 2))) -> SlideChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    enc = SlideEncoderConfig(embed_dim=32, ffn_dim=64, num_heads=4, num_layers=2, segment_lengths=segments[0],
                             dilated_ratios=segments[1], dropout=dropout)
    model = SlideChatModel(llm, SlideChatConfig(feature_dim=FEAT_DIM, encoder=enc),
                           tokenizer=AutoTokenizer.from_pretrained(tiny_dir))
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model64(tiny_dir):
    return build_model(tiny_dir, torch.float64)


@pytest.fixture(scope="module")
def model32(tiny_dir):
    return build_model(tiny_dir, torch.float32)


def features(dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_PATCHES, FEAT_DIM, generator=g, dtype=dtype)


def prompt_and_answer(model: SlideChatModel):
    tok = model.tokenizer
    prompt = encode_prompt(tok, [], "What is the diagnosis?", "qwen_chat")
    answer = scored_answer_ids(model, tok.encode(ANSWER, add_special_tokens=False), truncated=False)
    return prompt, answer


def log_p(model: SlideChatModel, prompt, answer, feats: torch.Tensor) -> float:
    """log p(answer | prompt, feats) by hand: log-softmax of the full logits (in the model's dtype, float64
    for the finite differences) at the positions that predict each answer token, summed."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids, features=[feats]).logits[0]
    n = len(answer)
    logp = torch.log_softmax(logits[-(n + 1):-1], dim=-1)
    return float(logp[torch.arange(n), torch.tensor(answer)].sum())


def training_log_p(model: SlideChatModel, prompt, answer, feats: torch.Tensor) -> float:
    """log p from the model's own training loss: -(mean NLL over the labelled answer tokens) * count."""
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer])
    with torch.no_grad():
        loss = model(input_ids=ids, features=[feats], labels=labels).loss
    return -float(loss) * len(answer)


def finite_difference(model, prompt, answer, feats, i: int, eps: float) -> float:
    """(log p(x_i * (1 + eps)) - log p(x_i * (1 - eps))) / (2 eps): d/de log p at e = 0, error O(eps^2)."""
    up, down = feats.clone(), feats.clone()
    up[i] *= 1 + eps
    down[i] *= 1 - eps
    return (log_p(model, prompt, answer, up) - log_p(model, prompt, answer, down)) / (2 * eps)


@pytest.mark.parametrize("segments", [((8,), (1,)), ((32,), (1,))], ids=["three-segments", "one-segment"])
def test_scores_are_the_derivative_of_log_p_under_patch_scaling(tiny_dir, segments):
    """(a) s_i = d/de log p(x_i -> (1 + e) x_i) at 0, by central differences on a float64 model whose encoder
    has one dilated branch (its backward is then the exact derivative; several branches: the next test).

    Tolerance: the encoder accumulates its attention in float32 even in a float64 model, so log p carries
    ~1e-7 relative rounding, which a difference step divides by 2 eps; eps = 1e-2 keeps that near 1e-5
    while the truncation error eps^2 / 6 * f''' stays ~1e-5 of the scores. Measured: |fd - s| <= 2e-6
    against max|s| ~ 1.7e-2; the bound is 0.5% of max|s| (~8e-5). A sign flip, a missing x factor, a
    gradient of another row, or of the mean instead of the sum over answer tokens, all move s_i by far more.
    """
    model = build_model(tiny_dir, torch.float64, segments=segments)
    prompt, answer = prompt_and_answer(model)
    feats = features()
    ev = answer_evidence(model, prompt, answer, feats)
    assert ev.scores.shape == (N_PATCHES,) and ev.scores.dtype == np.float64
    tol = 5e-3 * np.abs(ev.scores).max()
    for i in (0, 7, 13, N_PATCHES - 1):
        fd = finite_difference(model, prompt, answer, feats, i, 1e-2)
        assert abs(fd - ev.scores[i]) <= tol, (i, fd, ev.scores[i])


def test_multi_branch_encoder_scores_stay_close_to_the_derivative(model64):
    """(a) with several dilated branches the branch-mixing weights carry no gradient (module doc): the scores
    are the model's training gradient, within a few % of the true derivative (measured about 1.7% of max|s|
    on this model). The bound, 5% of max|s|, catches a wrong gradient, not this known approximation."""
    prompt, answer = prompt_and_answer(model64)
    feats = features()
    ev = answer_evidence(model64, prompt, answer, feats)
    tol = 5e-2 * np.abs(ev.scores).max()
    for i in (0, 7, 13, N_PATCHES - 1):
        assert abs(finite_difference(model64, prompt, answer, feats, i, 1e-2) - ev.scores[i]) <= tol


def test_log_likelihood_is_the_training_loss_times_token_count(model64, model32):
    """(b) log p of the answer = the summed log-softmax of its tokens (by hand, float64) = -(the model's mean
    training loss over the answer's tokens) * their count (that loss upcasts logits to float32 only)."""
    prompt, answer = prompt_and_answer(model64)
    feats = features()
    ev = answer_evidence(model64, prompt, answer, feats)
    assert ev.log_likelihood == pytest.approx(log_p(model64, prompt, answer, feats), rel=1e-10)
    assert max_rel_diff(ev.log_likelihood, training_log_p(model64, prompt, answer, feats)) <= FP32_RTOL
    assert ev.log_likelihood < 0 and ev.method == METHOD
    # float32 model: same quantity up to float32 reordering (FP32_RTOL); dropping one answer token moves it
    # by far more, so the comparison can tell answers apart
    ev32 = answer_evidence(model32, prompt, answer, feats.float())
    ref32 = training_log_p(model32, prompt, answer, feats.float())
    assert max_rel_diff(ev32.log_likelihood, ref32) <= FP32_RTOL
    other = training_log_p(model32, prompt, answer[:-2] + answer[-1:], feats.float())
    assert max_rel_diff(other, ref32) > 10 * FP32_RTOL


def test_all_zero_patch_scores_exactly_zero(model64):
    """(c) x * grad is 0 where x is 0, whatever the gradient there."""
    prompt, answer = prompt_and_answer(model64)
    feats = features()
    feats[5] = 0.0
    scores = answer_evidence(model64, prompt, answer, feats).scores
    assert scores[5] == 0.0
    assert np.count_nonzero(scores) == N_PATCHES - 1


def test_top_patches_order_boxes_and_ties():
    """(d) best first; boxes are (x, y, size, size) at each patch's level-0 corner; ties keep row order."""
    scores = np.array([0.1, 0.5, -0.2, 0.5, 0.3, -0.7])
    coords = np.array([[0, 0], [224, 0], [448, 0], [0, 224], [224, 224], [448, 224]])
    top = top_patches(scores, coords, 224, k=3)
    assert top == [(224, 0, 224, 224, 0.5), (0, 224, 224, 224, 0.5), (224, 224, 224, 224, 0.3)]
    everything = top_patches(scores, coords, 512, k=100)
    assert [t[4] for t in everything] == sorted(scores.tolist(), reverse=True)
    assert len(everything) == 6 and all(t[2] == t[3] == 512 for t in everything)
    assert everything[-1][:2] == (448, 224)  # the most negative patch is last
    assert top_patches(scores, coords, 224, k=0) == []
    with pytest.raises(ValueError, match="coords"):
        top_patches(scores, coords[:5], 224)
    with pytest.raises(ValueError, match="NaN"):
        top_patches(np.array([0.1, np.nan]), coords[:2], 224)
    with pytest.raises(ValueError, match="patch_size"):
        top_patches(scores, coords, 0)


def test_no_parameter_gradients_and_mode_kept(tiny_dir):
    """(e) only the features are differentiated: parameters keep .grad None and requires_grad; a model in
    training mode (dropout 0.5 in its encoder) is explained without dropout and handed back in training mode."""
    model = build_model(tiny_dir, torch.float32, dropout=0.5)
    prompt, answer = prompt_and_answer(model)
    feats = features(torch.float32)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(flags.values())
    reference = answer_evidence(model, prompt, answer, feats)
    model.train()
    first = answer_evidence(model, prompt, answer, feats)
    second = answer_evidence(model, prompt, answer, feats)
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # no dropout: identical to the eval-mode result (dropout 0.5 would change every score)
    assert np.array_equal(first.scores, reference.scores) and np.array_equal(second.scores, reference.scores)
    model.eval()
    assert not any(m.training for m in model.modules())
    answer_evidence(model, prompt, answer, feats)
    assert not any(m.training for m in model.modules())


def test_lora_model_is_explained_through_its_adapters(tiny_dir):
    """(e) a peft LoRA-wrapped LLM: the adapters take part (log p is the wrapped model's loss, not the base
    model's) and no LoRA parameter gets a gradient."""
    from peft import LoraConfig

    from slidechat.model.lora import apply_lora

    model = build_model(tiny_dir, torch.float32)
    prompt, answer = prompt_and_answer(model)
    feats = features(torch.float32)
    base = training_log_p(model, prompt, answer, feats)
    model.llm = apply_lora(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    model.eval()
    ev = answer_evidence(model, prompt, answer, feats)
    wrapped = training_log_p(model, prompt, answer, feats)
    assert max_rel_diff(ev.log_likelihood, wrapped) <= FP32_RTOL
    assert max_rel_diff(wrapped, base) > 10 * FP32_RTOL  # measured 9e-3: the adapters act
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is None for p in lora) and all(p.requires_grad for p in lora)


def test_bad_inputs_are_one_line_errors(model32):
    """(f) empty features, a prompt without the slide, an empty answer."""
    prompt, answer = prompt_and_answer(model32)
    with pytest.raises(SlideChatError, match="no patches to explain"):
        answer_evidence(model32, prompt, answer, torch.zeros(0, FEAT_DIM))
    with pytest.raises(SlideChatError, match="no patches to explain"):
        answer_evidence(model32, prompt, answer, torch.zeros(FEAT_DIM))
    with pytest.raises(SlideChatError, match="placeholder"):
        answer_evidence(model32, [t for t in prompt if t >= 0], answer, features(torch.float32))
    with pytest.raises(SlideChatError, match="no answer tokens"):
        answer_evidence(model32, prompt, [], features(torch.float32))
    bad = features(torch.float32)
    bad[2, 3] = float("nan")
    with pytest.raises(SlideChatError, match="NaN"):
        answer_evidence(model32, prompt, answer, bad)


def test_scored_tokens_are_the_training_labels_of_the_answer(model32):
    """The ids scored for a finished answer are exactly what training labels for that answer (answer +
    end-of-turn); a truncated answer is scored as generated."""
    tok = model32.tokenizer
    generated = tok.encode(ANSWER, add_special_tokens=False)
    _, labels = tokenize_pairs(tok, [(f"{IMAGE_TOKEN}\nWhat is the diagnosis?", ANSWER)], "qwen_chat")
    assert scored_answer_ids(model32, generated, truncated=False) == [t for t in labels if t != IGNORE_INDEX]
    assert scored_answer_ids(model32, generated, truncated=True) == generated
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok, "qwen_chat") == [im_end]
    assert end_of_turn_ids(tok, "chat_template") == [im_end]  # the tiny tokenizer's template ends turns so
