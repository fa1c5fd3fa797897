"""The training loss with the LM head applied only at labelled positions (issue 18) equals the stock
Hugging Face call with ``labels=`` -- the reference rule is transformers' own ``ForCausalLMLoss`` /
Qwen2-VL's ``CrossEntropyLoss`` as run by the unmodified model -- for the slide family (plain,
gradient-checkpointed and LoRA-wrapped LLM) and the cytology family (Qwen2-VL full, checkpointed and
LoRA), in loss and in every trainable parameter's gradient; and the head sees only labelled rows.

Tolerance: the two paths compute the same float32 values, but the stock loss sums per-token losses over
all B*(L-1) positions (zeros at ignored ones) and runs the head's matmul on a [B*L, H] block, ours on
an [N, H] block of labelled rows, so reductions are reordered and blocked differently: float32 noise,
FP32_RTOL of the value's scale (tests/tolerances.py). A wrong shift or a lost label span moves the loss
by O(1) of its value (checked below with assert_differs_rel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tolerances import FP32_RTOL, assert_close_rel, assert_differs_rel, max_rel_diff
from train_data import field, write_sharegpt_dataset

ENC = dict(embed_dim=512, ffn_dim=64, num_heads=8, num_layers=1, segment_lengths=[16, 32],
           dilated_ratios=[1, 2], dropout=0.0, drop_path=0.0)


# ------------------------------------------------------------------------------------------------ helpers
def _trainable_grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model: torch.nn.Module, run) -> tuple:
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    grads = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(new, stock, what: str) -> None:
    (loss, grads), (ref_loss, ref_grads) = new, stock
    assert torch.isfinite(ref_loss)
    assert_close_rel(loss, ref_loss, FP32_RTOL, what=f"{what}: loss")
    assert grads.keys() == ref_grads.keys() and grads
    moved = 0
    for name, g in ref_grads.items():
        assert_close_rel(grads[name], g, FP32_RTOL, what=f"{what}: grad {name}")
        moved += bool(g.abs().sum() > 0)
    assert moved > len(ref_grads) // 2, f"{what}: most trainable parameters got no gradient"


def _assert_has_power(cut, stock, what: str) -> None:
    """The comparison can fail: one row's label span left out moves the loss by well over the tolerance
    (a per-token mean of similar values: 5e-3 to 2e-2 of it, measured) and some gradient by more than
    its own scale (1.5-1.8x measured on the slide model)."""
    (loss, grads), (ref_loss, ref_grads) = cut, stock
    assert_differs_rel(loss, ref_loss, 10 * FP32_RTOL, what=f"{what}: span dropped, loss")
    worst = max(max_rel_diff(grads[n], g) for n, g in ref_grads.items())
    assert worst > 1000 * FP32_RTOL, f"{what}: dropping a span moved the gradients by only {worst:.2e}"


class _RowCounter:
    """Forward hook on the LM head: how many hidden-state rows it projected in total."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = head.register_forward_hook(self)

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        self.rows += args[0].shape[:-1].numel()


# ------------------------------------------------------------------------------------------------ slide family
@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from slidechat.model.tiny_llm import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_label_logits"))


def _slide_model(llm_dir: Path, variant: str):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from slidechat.engine.train_model import SlideChatTrainModel

    torch.manual_seed(0)
    kw: Dict[str, Any] = {}
    if variant == "lora":
        kw = dict(freeze_llm=True, llm_lora=dict(type=LoraConfig, r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    m = SlideChatTrainModel(
        llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(llm_dir),
                 torch_dtype=torch.float32),
        slidechat_config=dict(feature_dim=512, encoder=ENC),
        use_activation_checkpointing=(variant == "checkpointed"), **kw)
    if variant == "lora":
        with torch.no_grad():  # non-trivial adapters (lora_B starts at zero: lora_A would get no gradient)
            for n, p in m.llm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    return m.train()


def _slide_batch() -> Dict[str, Any]:
    """Two rows of different lengths (right padding), a slide of 20 and of 7 patches (so the spliced rows
    pad differently too), two label spans in the first row and one in the second."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 18), generator=g)
    ids[:, 2] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:10] = ids[0, 6:10]
    labels[0, 13:17] = ids[0, 13:17]
    labels[1, 8:13] = ids[1, 8:13]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "features": [torch.randn(20, 512, generator=g), torch.randn(7, 512, generator=g)], "coords": None}


def _core_kwargs(batch: Dict[str, Any]) -> Dict[str, Any]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "features", "coords", "labels")}


@pytest.mark.parametrize("variant", ["plain", "checkpointed", "lora"])
def test_slide_loss_and_grads_equal_stock_call(llm_dir, variant):
    m = _slide_model(llm_dir, variant)
    batch = _slide_batch()
    stock_seen: List[Dict[str, Any]] = []
    orig = m.llm.forward

    def spy(*args, **kwargs):
        stock_seen.append(kwargs)
        return orig(*args, **kwargs)

    m.llm.forward = spy
    try:
        # reference: the model's own ``llm(inputs_embeds=..., labels=...)`` call (transformers' loss rule)
        stock = _loss_and_grads(m, lambda: m.core(**_core_kwargs(batch), full_logits=True).loss)
        assert len(stock_seen) == 1 and stock_seen[0]["labels"] is not None
        assert (stock_seen[0]["labels"] != IGNORE_INDEX).sum() == (batch["labels"] != IGNORE_INDEX).sum()
        # the training entry point xtuner calls: must not go through the full-logits call
        new = _loss_and_grads(m, lambda: m(batch, mode="loss")["loss"])
        assert len(stock_seen) == 1, "the training loss still called the LLM's full forward"
    finally:
        del m.llm.forward
    _assert_same(new, stock, f"slide {variant}")
    cut = dict(batch, labels=batch["labels"].clone())
    cut["labels"][1] = IGNORE_INDEX
    _assert_has_power(_loss_and_grads(m, lambda: m(cut, mode="loss")["loss"]), stock, f"slide {variant}")


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_slide_loss_and_grads_equal_stock_call_on_other_architectures(tmp_path, arch):
    """The same rule on the other LLM families the slide model runs on (their tiny builders carry the
    families' real configs): the head-at-labelled-rows loss equals the model's own ``labels=`` call."""
    from slidechat.model.label_logits import causal_lm_parts
    from slidechat.model.tiny_llm import make_tiny_llm

    m = _slide_model(make_tiny_llm(tmp_path / arch, arch=arch), "plain")
    assert causal_lm_parts(m.llm) is not None
    batch = _slide_batch()
    stock = _loss_and_grads(m, lambda: m.core(**_core_kwargs(batch), full_logits=True).loss)
    new = _loss_and_grads(m, lambda: m(batch, mode="loss")["loss"])
    _assert_same(new, stock, f"slide {arch}")


def test_slide_num_items_in_batch_matches_stock(llm_dir):
    """``num_items_in_batch`` (transformers' gradient-accumulation reduction): sum / n, as ForCausalLMLoss."""
    m = _slide_model(llm_dir, "plain").eval()
    batch = _slide_batch()
    with torch.no_grad():
        for n in (9, torch.tensor(30)):
            ref = m.core(**_core_kwargs(batch), full_logits=True, num_items_in_batch=n).loss
            new = m.core(**_core_kwargs(batch), num_items_in_batch=n).loss
            assert_close_rel(new, ref, FP32_RTOL, what=f"num_items_in_batch={n}")
        assert_differs_rel(m.core(**_core_kwargs(batch), num_items_in_batch=9).loss,
                           m.core(**_core_kwargs(batch)).loss, 10 * FP32_RTOL, what="sum/9 vs mean")


@pytest.mark.parametrize("variant", ["plain", "lora"])
def test_slide_head_sees_only_labelled_rows(llm_dir, variant):
    m = _slide_model(llm_dir, variant)
    batch = _slide_batch()
    counter = _RowCounter(m.llm.get_output_embeddings())
    try:
        with torch.no_grad():
            out = m.core(**_core_kwargs(batch))
            n_new = counter.rows
            m.core(**_core_kwargs(batch), full_logits=True)
    finally:
        counter.handle.remove()
    # position t predicts label t+1; no row is labelled at position 0, so one head row per label token
    assert n_new == int((batch["labels"] != IGNORE_INDEX).sum()) == 13
    spliced_len = 18 - 1 + 20
    assert counter.rows - n_new == 2 * spliced_len  # the stock call: every position of the padded batch
    assert out.logits is None and torch.isfinite(out.loss)


def test_slide_generation_and_tensor_mode_unchanged(llm_dir):
    """Without labels the stock call runs: full logits come back as before."""
    m = _slide_model(llm_dir, "plain").eval()
    batch = _slide_batch()
    with torch.no_grad():
        logits = m(batch, mode="tensor")
        direct = m.core(**{k: v for k, v in _core_kwargs(batch).items() if k != "labels"}).logits
    assert logits.shape == (2, 18 - 1 + 20, m.llm.config.vocab_size)
    assert torch.equal(logits, direct)


def test_unknown_head_falls_back_to_stock_call():
    """A model whose forward changes the logits after the head (Gemma-2 soft-capping, Cohere scaling...)
    keeps the stock call."""
    from slidechat.model.label_logits import causal_lm_parts

    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "cohere"})()

    assert causal_lm_parts(Odd()) is None


# ------------------------------------------------------------------------------------------------ cytology family
@pytest.fixture(scope="module")
def cyto(tmp_path_factory):
    from slidechat.data.cytology_dataset import CytologySFTDataset, qwen2vl_collate_fn
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    root = tmp_path_factory.mktemp("cyto_label_logits")
    tiny = make_tiny_qwen2vl(root / "tiny_qwen2vl")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rows = [  # a two-turn row (two label spans) and a shorter one-turn row (right-padded in the batch)
        {"images": ["images/a.png"], "messages": [
            {"role": "user", "content": "<image>How many dark nuclei?"},
            {"role": "assistant", "content": "Two dark nuclei."},
            {"role": "user", "content": "Any mitoses?"},
            {"role": "assistant", "content": "No mitotic figures are seen."}]},
        {"images": ["images/b.png"], "messages": [
            {"role": "user", "content": "<image>Adequate?"},
            {"role": "assistant", "content": "Yes."}]},
    ]
    field(data / "images" / "a.png", 0, 2)
    field(data / "images" / "b.png", 1, 0)
    write_sharegpt_dataset(data, "ll", rows, "train.jsonl")
    ds = CytologySFTDataset("ll", str(tiny), data, image_max_pixels=224 * 224)
    batch = qwen2vl_collate_fn([ds[0], ds[1]])["data"]
    lab = batch["labels"]
    assert (batch["attention_mask"] == 0).any()  # padding present
    spans = [int(((lab[i, 1:] != IGNORE_INDEX) & (lab[i, :-1] == IGNORE_INDEX)).sum()) for i in range(2)]
    assert spans == [2, 1]
    return {"tiny": tiny, "batch": batch}


def _cyto_model(tiny: Path, variant: str):
    from slidechat.engine.qwen2vl_train import Qwen2VLTrainModel

    torch.manual_seed(0)
    if variant == "lora":
        m = Qwen2VLTrainModel(tiny, lora=dict(r=4))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    else:  # vision tower and merger trained too: gradients through the spliced image features are compared
        m = Qwen2VLTrainModel(tiny, freeze_vision_tower=False, freeze_multi_modal_projector=False,
                              use_activation_checkpointing=(variant == "checkpointed"))
    return m.train()


@pytest.mark.parametrize("variant", ["full", "checkpointed", "lora"])
def test_cytology_loss_and_grads_equal_stock_call(cyto, variant):
    m = _cyto_model(cyto["tiny"], variant)
    batch = cyto["batch"]

    def stock_loss():  # what the training forward did before: the unmodified HF call with labels
        return m.hf_model(**m._hf_inputs(batch), labels=batch["labels"], use_cache=False).loss

    stock = _loss_and_grads(m, stock_loss)
    new = _loss_and_grads(m, lambda: m(dict(batch), mode="loss")["loss"])
    _assert_same(new, stock, f"cytology {variant}")
    if variant == "full":  # gradients reached the vision tower through the spliced features
        assert new[1]["model.visual.blocks.0.attn.qkv.weight"].abs().sum() > 0
    cut = dict(batch, labels=batch["labels"].clone())
    cut["labels"][1] = IGNORE_INDEX
    _assert_has_power(_loss_and_grads(m, lambda: m(cut, mode="loss")["loss"]), stock, f"cytology {variant}")


def test_cytology_head_sees_only_labelled_rows(cyto):
    m = _cyto_model(cyto["tiny"], "lora")
    batch = cyto["batch"]
    counter = _RowCounter(m.hf_model.get_output_embeddings())
    try:
        with torch.no_grad():
            loss = m(dict(batch), mode="loss")["loss"]
    finally:
        counter.handle.remove()
    assert torch.isfinite(loss)
    assert counter.rows == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert counter.rows < batch["labels"].numel() // 3
