"""SlideChatModel with a tiny random Qwen2: splicing, loss masking, batched generation, export, loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX  # noqa: E402
from slidechat.model.slide_encoder import SlideEncoderConfig  # noqa: E402
from slidechat.model.slidechat_model import SlideChatConfig, SlideChatModel  # noqa: E402
from slidechat.model.tiny_llm import make_tiny_llm  # noqa: E402
from slidechat.utils.errors import SlideChatError  # noqa: E402
from tolerances import FP32_RTOL, assert_close_rel  # noqa: E402

try:  # tests/ is a rootdir-inserted folder (no package) under pytest's default import mode
    from test_model_encoder import released_slide_shapes  # noqa: E402
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.test_model_encoder import released_slide_shapes  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)


def load_llm(tiny_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)


def small_config(**enc) -> SlideChatConfig:
    e = dict(embed_dim=32, ffn_dim=64, num_heads=4, num_layers=2, segment_lengths=(8, 16), dilated_ratios=(1, 2))
    e.update(enc)
    return SlideChatConfig(feature_dim=32, encoder=SlideEncoderConfig(**e))


@pytest.fixture(scope="module")
def model(tiny_dir, tokenizer):
    torch.manual_seed(0)
    return SlideChatModel(load_llm(tiny_dir), small_config(), tokenizer=tokenizer).eval()


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}],
                                         tokenize=False, add_generation_prompt=True)
    before, after = text.split(IMAGE_TOKEN)
    return torch.tensor(tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after).input_ids)


def test_tiny_llm_folder_loads_like_qwen(tiny_dir, tokenizer):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert "<image>" not in tokenizer.get_vocab() and len(tokenizer.tokenize("<image>")) > 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Describe the slide."},
                                          {"role": "assistant", "content": "Invasive carcinoma."}], tokenize=False)
    assert text == ("<|im_start|>user\nDescribe the slide.<|im_end|>\n"
                    "<|im_start|>assistant\nInvasive carcinoma.<|im_end|>\n")
    sample = "The tumor shows necrosis and invasion."
    assert tokenizer.decode(tokenizer(sample).input_ids) == sample
    assert len(tokenizer(sample).input_ids) < len(sample) / 2  # real merges, not bytes


def test_forward_splices_and_masks_labels(model, tokenizer):
    prompts = [prompt_ids(tokenizer, "What is the diagnosis?"), prompt_ids(tokenizer, "Is there necrosis here?")]
    answers = [tokenizer("Carcinoma.<|im_end|>").input_ids, tokenizer("Yes.<|im_end|>").input_ids]
    rows = [torch.cat([p, torch.tensor(a)]) for p, a in zip(prompts, answers)]
    feats = [torch.randn(11, 32), torch.randn(5, 32)]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
        labels[i, len(prompts[i]): len(r)] = torch.tensor(answers[i])
    seen = {}
    orig = model.llm.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return orig(*args, **kwargs)

    model.llm.forward = spy
    try:
        # full_logits: the stock ``llm(..., labels=...)`` call, whose inputs and logits are checked here
        # (the labelled-positions-only loss is tests/test_label_logits.py's)
        out = model(ids, mask, feats, labels=labels, full_logits=True)
    finally:
        del model.llm.forward
    assert torch.isfinite(out.loss)
    lab, m, emb = seen["labels"], seen["attention_mask"], seen["inputs_embeds"]
    assert emb.shape[:2] == (2, max(len(r) - 1 + f.shape[0] for r, f in zip(rows, feats)))
    vis = model.encode_slides(feats)
    for i, r in enumerate(rows):
        p = int((r == IMAGE_TOKEN_INDEX).nonzero())
        n = feats[i].shape[0]
        assert (lab[i, p: p + n] == IGNORE_INDEX).all()
        assert torch.equal(emb[i, p: p + n], vis[i])  # the same encode_slides on the same inputs: exact
        length = len(r) - 1 + n
        assert m[i, :length].all() and not m[i, length:].any()
        assert (lab[i, length:] == IGNORE_INDEX).all()
        kept = torch.cat([labels[i, :p], labels[i, p + 1: len(r)]])
        assert torch.equal(torch.cat([lab[i, :p], lab[i, p + n: length]]), kept)
        # batching with right padding leaves each row's logits unchanged
        single = model(r[None], torch.ones(1, len(r), dtype=torch.long), [feats[i]])
        # other shapes, other kernel blocking: float noise only (FP32_RTOL; observed 2e-7 with 1 thread, 4e-7
        # with 2); the other row's slide tokens spliced in instead would move them by ~1 of max|logit| (measured)
        assert_close_rel(out.logits[i, :length], single.logits[0], FP32_RTOL, what="batched vs single")
    # loss reacts to the slide: gradients reach encoder and projector
    model.zero_grad()
    model(ids, mask, feats, labels=labels).loss.backward()
    assert model.LongNet_encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.projector.model[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_missing_placeholder_is_a_clear_error(model, tokenizer):
    ids = torch.tensor([tokenizer("no slide here").input_ids])
    with pytest.raises(SlideChatError, match="placeholder"):
        model(ids, torch.ones_like(ids), [torch.randn(3, 32)])
    with pytest.raises(SlideChatError, match="placeholder"):
        model.generate([ids[0]], [torch.randn(3, 32)], max_new_tokens=2)


def test_generate_batch_equals_single(model, tokenizer):
    prompts = [prompt_ids(tokenizer, "What is the diagnosis?"),
               prompt_ids(tokenizer, "Which histological feature is present in this slide? A. necrosis B. fibrosis"),
               prompt_ids(tokenizer, "Grade?")]
    feats = [torch.randn(17, 32), torch.randn(4, 32), torch.randn(9, 32)]
    batch = model.generate(prompts, feats, max_new_tokens=8)
    assert len(batch) == 3
    for i in range(3):
        single = model.generate([prompts[i]], [feats[i]], max_new_tokens=8)[0]
        # token ids, exact: greedy picks differ only if the top two logits lie within float noise (~1e-6 of
        # max|logit|); the closest pair in these 24 steps is 2.8e-3 of max|logit| apart (measured)
        assert torch.equal(batch[i], single)
        assert 0 < len(single) <= 8
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in single.tolist()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.default_eos_token_ids()
    # stopping: make the stop token whatever greedy decoding emits second
    forced = model.generate([prompts[0]], [feats[0]], max_new_tokens=8, eos_token_id=int(batch[0][1]))[0]
    assert torch.equal(forced, batch[0][:1])


def test_generate_with_precomputed_visual_tokens(model, tokenizer):
    prompts = [prompt_ids(tokenizer, "What is the diagnosis?"), prompt_ids(tokenizer, "Grade?")]
    feats = [torch.randn(11, 32), torch.randn(6, 32)]
    with torch.no_grad():
        vis = model.encode_slides(feats)
    assert [v.shape[0] for v in vis] == [11, 6]
    a = model.generate(prompts, feats, max_new_tokens=6)
    b = model.generate(prompts, feats, visual_tokens=vis, max_new_tokens=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_chat_session_encodes_the_slide_once(model, tokenizer, monkeypatch):
    from slidechat.apps.chat import ChatSession

    calls = []
    real = model.encode_slides
    monkeypatch.setattr(model, "encode_slides", lambda *a, **k: calls.append(1) or real(*a, **k))
    chat = ChatSession(model, tokenizer, torch.randn(9, 32).numpy(), max_new_tokens=4)
    first = chat.ask("What is the diagnosis?")
    chat.ask("Why?")
    assert len(calls) == 1 and len(chat.history) == 2 and chat.history[0] == ("What is the diagnosis?", first)


def test_export_reload_identical_logits(model, tokenizer, tmp_path):
    folder = model.save_pretrained(tmp_path / "export", tokenizer=tokenizer)
    assert (folder / "llm" / "config.json").is_file() and (folder / "llm" / "tokenizer.json").is_file()
    meta = json.loads((folder / "slidechat_config.json").read_text())
    assert meta["encoder"]["segment_lengths"] == [8, 16]
    again = SlideChatModel.from_pretrained(folder)
    assert again.tokenizer is not None and again.config == model.config
    ids = prompt_ids(tokenizer, "What is the diagnosis?")[None]
    feats = [torch.randn(13, 32)]
    with torch.no_grad():
        a = model(ids, torch.ones_like(ids), feats).logits
        b = again(ids, torch.ones_like(ids), feats).logits
    assert torch.equal(a, b)
    assert not list(folder.glob(".*.partial"))


def test_export_merges_lora(tiny_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    from slidechat.model.lora import apply_lora

    torch.manual_seed(1)
    llm = apply_lora(load_llm(tiny_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    m = SlideChatModel(llm, small_config()).eval()
    ids = prompt_ids(tokenizer, "Grade?")[None]
    feats = [torch.randn(6, 32)]
    with torch.no_grad():
        before = m(ids, torch.ones_like(ids), feats).logits
    # peft-wrapped names still map to released-style llm.* keys
    sd = {k: v for k, v in m.state_dict().items() if "lora_" not in k}
    canon = {k.replace("llm.base_model.model.", "llm.").replace(".base_layer.", "."): v for k, v in sd.items()}
    assert m.load_slidechat_state_dict(canon).unexpected == []
    m.save_pretrained(tmp_path / "merged")
    again = SlideChatModel.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in again.state_dict())
    with torch.no_grad():
        after = again(ids, torch.ones_like(ids), feats).logits
    # merged W + BA vs unmerged adapters: float32 rounding only (FP32_RTOL; observed 5e-7). The random
    # (init_lora_weights=False) adapters move the logits by 0.98 of max|logit| (measured with their scaling set
    # to 0), so a lost or mis-scaled merge fails
    assert_close_rel(after, before, FP32_RTOL, what="merged LoRA export vs adapters")


def test_released_keys_load_without_gaps(tiny_dir):
    m = SlideChatModel(load_llm(tiny_dir), SlideChatConfig())
    hidden = m.llm.config.hidden_size
    expected = released_slide_shapes(hidden)
    ours = {k: tuple(v.shape) for k, v in m.slide_state_dict().items()}
    assert ours == expected
    assert {k for k in m.state_dict() if not k.startswith(("LongNet_encoder.", "projector."))} == \
        {k for k in m.state_dict() if k.startswith("llm.")}
    for k in ("llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight"):
        assert k in m.state_dict()
    torch.manual_seed(3)
    ckpt = {k: torch.randn(s) for k, s in expected.items()}
    report = m.load_slidechat_state_dict(ckpt)
    assert report.missing == [] and report.unexpected == [] and report.ok
    # llm.* absent from a stage-1 style checkpoint: kept from the LLM folder, reported as such
    assert report.kept and all(k.startswith(("llm.", "LongNet_encoder.coord_pos_embed")) for k in report.kept)
    assert torch.equal(m.LongNet_encoder.layers[1].ffn.fc1.weight, ckpt["LongNet_encoder.layers.1.ffn.fc1.weight"])
    with pytest.raises(SlideChatError, match=r"lacks required weights: \d+ keys: llm\."):
        m.load_slidechat_state_dict(ckpt, strict_llm=True)
    # a full checkpoint (with llm.*) leaves nothing missing; an unknown key is refused unless partial loads
    # are allowed
    full = dict(ckpt)
    full.update({k: v.clone() for k, v in m.state_dict().items() if k.startswith("llm.")})
    full["extra.thing"] = torch.zeros(1)
    with pytest.raises(SlideChatError, match="does not use: 1 keys: extra.thing"):
        m.load_slidechat_state_dict(full, strict_llm=True)
    report = m.load_slidechat_state_dict(full, strict_llm=True, allow_partial=True)
    assert report.missing == [] and report.unexpected == ["extra.thing"]
    bad = dict(ckpt)
    bad["projector.model.0.weight"] = torch.zeros(3584, 512)
    with pytest.raises(SlideChatError, match="projector.model.0.weight"):
        m.load_slidechat_state_dict(bad)
    partial = {k: v for k, v in ckpt.items() if not k.startswith("LongNet_encoder.layer_norm")}
    with pytest.raises(SlideChatError, match="layer_norm"):
        m.load_slidechat_state_dict(partial)


def test_compat_model_and_released_checkpoint(tiny_dir):
    m = SlideChatModel(load_llm(tiny_dir), SlideChatConfig(encoder=SlideEncoderConfig(compat="slidechat_v1"))).eval()
    released = {k: torch.randn(s) * 0.02 for k, s in released_slide_shapes(m.llm.config.hidden_size).items()}
    assert m.load_slidechat_state_dict(released).missing == []
    feats = torch.randn(6, 512)
    a = m.encode_slides([feats])[0]
    b = m.encode_slides([feats[:3]])[0]
    assert_close_rel(a[:3], b, FP32_RTOL, what="6 vs 3 patches")  # no cross-patch interaction (kernel noise only)


def test_input_projection_follows_the_features(tiny_dir, tokenizer, tmp_path):
    """48-d features into a 32-wide LongNet: a trained Linear in front of it, saved, required and exported
    like the other slide modules; equal widths keep the released layout (no ``input_proj`` key)."""
    from torch import nn

    assert isinstance(SlideChatModel(load_llm(tiny_dir), small_config()).input_proj, nn.Identity)
    cfg = small_config()
    cfg.feature_dim = 48
    torch.manual_seed(4)
    m = SlideChatModel(load_llm(tiny_dir), cfg, tokenizer=tokenizer).eval()
    sd = m.slide_state_dict()
    assert tuple(sd["input_proj.weight"].shape) == (32, 48) and tuple(sd["input_proj.bias"].shape) == (32,)
    assert {"input_proj.weight", "input_proj.bias"} <= set(m.required_keys())
    # the reference: the encoder applied to x @ W.T + b, written out here (not through input_proj)
    x = torch.randn(9, 48)
    w, b = sd["input_proj.weight"], sd["input_proj.bias"]
    with torch.no_grad():
        ref = m.projector(m.LongNet_encoder((x @ w.T + b)[None]))[0]
        got = m.encode_slides([x])[0]
    # same ops on the same values, the Linear as addmm vs matmul + add: float32 summation order only
    # (FP32_RTOL); a projection skipped, transposed or applied twice changes the tokens by O(1)
    assert_close_rel(got, ref, FP32_RTOL, what="encode_slides vs LongNet(x W^T + b)")
    with pytest.raises(SlideChatError, match=r"expected features \[N>0, 48\], got \(9, 32\)"):
        m.encode_slides([torch.randn(9, 32)])
    # a checkpoint of the 512-d layout (no input_proj) is refused, naming the missing module
    without = {k: v for k, v in sd.items() if not k.startswith("input_proj.")}
    with pytest.raises(SlideChatError, match="input_proj"):
        m.load_slidechat_state_dict(without)
    # export and reload: same config, same logits
    again = SlideChatModel.from_pretrained(m.save_pretrained(tmp_path / "export", tokenizer=tokenizer))
    assert again.config.feature_dim == 48 and torch.equal(again.input_proj.weight, w)
    ids = prompt_ids(tokenizer, "What is the diagnosis?")[None]
    with torch.no_grad():
        assert torch.equal(m(ids, torch.ones_like(ids), [x]).logits, again(ids, torch.ones_like(ids), [x]).logits)


def test_feature_dim_must_be_a_width(tiny_dir):
    cfg = small_config()
    cfg.feature_dim = "auto"
    with pytest.raises(SlideChatError, match="feature_dim must be a positive integer.*'auto'"):
        SlideChatModel(load_llm(tiny_dir), cfg)
