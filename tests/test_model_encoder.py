"""Slide encoder: dilated attention numerics, masking, compat mode, released parameter layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slidechat.model.projector import Projector
from slidechat.model.slide_encoder import (
    LongNetEncoder,
    SlideEncoderConfig,
    attention_with_lse,
    dilated_attention,
)

IMPLS = ["math", "cpu_flash"]


def tiny_cfg(**kw) -> SlideEncoderConfig:
    base = dict(embed_dim=32, ffn_dim=64, num_heads=4, num_layers=2, segment_lengths=(8, 16),
                dilated_ratios=(1, 2), dropout=0.1, drop_path=0.1)
    base.update(kw)
    return SlideEncoderConfig(**base)


def make_encoder(seed: int = 0, **kw) -> LongNetEncoder:
    torch.manual_seed(seed)
    enc = LongNetEncoder(tiny_cfg(**kw)).eval()
    # random LayerNorm affine parameters so the closed-form checks cannot pass by identity/zero defaults
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name or "_ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return enc


def brute_force_dilated(q, k, v, segment_lengths, ratios):
    """Per head, per segment, explicit index lists; branches mixed by summing exp-scores (= lse softmax)."""
    b, n, h, d = q.shape
    num = torch.zeros(b, n, h, d, dtype=torch.float64)
    den = torch.zeros(b, n, h, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for sl, r in zip(segment_lengths, ratios):
        sl = min(sl, n)
        per_group = math.ceil(h / r)
        for head in range(h):
            off = head // per_group
            for s0 in range(0, n, sl):
                idx = [p for p in range(s0, min(s0 + sl, n)) if (p - s0) % r == off]
                if not idx:
                    continue
                idx = torch.tensor(idx)
                w = torch.exp(q[:, idx, head] @ k[:, idx, head].transpose(-1, -2) / math.sqrt(d))
                num[:, idx, head] += w @ v[:, idx, head]
                den[:, idx, head] += w.sum(-1)
    return num / den.clamp_min(1e-300).unsqueeze(-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_with_lse_matches_math(impl):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8) for _ in range(3))
    bias = torch.zeros(3, 2, 1, 10)
    bias[1, :, :, 6:] = -1e30
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    out, lse = attention_with_lse(q, k, v, bias, impl=impl)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_dilated_equals_dense_when_one_segment(impl):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 13, 4, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for sls in [(13,), (16,), (64,), (16, 32)]:  # segment >= N (incl. longer than N), ratio 1
        out = dilated_attention(q, k, v, sls, (1,) * len(sls), impl=impl)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sls,ratios", [((4, 8), (1, 2)), ((4, 8, 16), (1, 2, 8)), ((3, 6), (1, 4))])
def test_dilated_matches_brute_force(impl, sls, ratios):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 21, 4, 8) for _ in range(3))
    out = dilated_attention(q, k, v, sls, ratios, impl=impl)
    ref = brute_force_dilated(q, k, v, sls, ratios)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_dilated_attention_has_gradients():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 19, 4, 8, requires_grad=True) for _ in range(3))
    out = dilated_attention(q, k, v, (8, 16), (1, 2), impl="cpu_flash")
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dilated_attention(q2, k2, v2, (8, 16), (1, 2), impl="math").square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_cross_patch_attention_default_vs_compat():
    x = torch.randn(1, 20, 32)
    x2 = x.clone()
    x2[0, 3] += torch.randn(32)  # (a constant shift would vanish in the first LayerNorm)
    enc = make_encoder()
    y, y2 = enc(x), enc(x2)
    others = [i for i in range(20) if i != 3]
    assert (y[0, others] - y2[0, others]).abs().max() > 1e-4  # patches see each other
    compat = make_encoder(compat="slidechat_v1")
    c, c2 = compat(x), compat(x2)
    torch.testing.assert_close(c[0, others], c2[0, others], atol=0, rtol=0)  # released bug: they don't
    assert (c[0, 3] - c2[0, 3]).abs().max() > 1e-4


def test_compat_equals_closed_form():
    enc = make_encoder(compat="slidechat_v1")
    x = torch.randn(2, 9, 32)
    h = x
    for layer in enc.layers:
        a = layer.self_attn
        h = h + a.out_proj(a.inner_attn_ln(a.v_proj(layer.self_attn_layer_norm(h))))
        f = layer.ffn
        h = h + f.fc2(f.ffn_layernorm(F.gelu(f.fc1(layer.final_layer_norm(h)).float())))
    ref = enc.layer_norm(h)
    torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=1e-5)


def test_compat_ignores_padding_and_order():
    enc = make_encoder(compat="slidechat_v1")
    x = torch.randn(1, 12, 32)
    perm = torch.randperm(12)
    torch.testing.assert_close(enc(x)[0, perm], enc(x[:, perm])[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("coord", [False, True])
def test_padding_does_not_change_real_positions(coord):
    enc = make_encoder(coord_pos_embed=coord)
    if coord:
        with torch.no_grad():
            enc.coord_pos_embed.proj.weight.normal_()
    lens = [23, 9, 16]
    feats = [torch.randn(n, 32) for n in lens]
    coords = [torch.stack(torch.meshgrid(torch.arange(n), torch.arange(1), indexing="ij"), -1).reshape(n, 2) * 224
              for n in lens]
    n = max(lens)
    x = torch.zeros(3, n, 32)
    c = torch.zeros(3, n, 2)
    pad = torch.ones(3, n, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : lens[i]] = f
        c[i, : lens[i]] = coords[i].float()
        pad[i, : lens[i]] = False
    x_noise = x.clone()
    x_noise[pad] = 1e3 * torch.randn(int(pad.sum()), 32)  # garbage in padded slots must not leak
    y = enc(x_noise, pad, c if coord else None)
    assert torch.isfinite(y).all()
    assert y[pad].abs().max() == 0
    for i, f in enumerate(feats):
        single = enc(f[None], None, coords[i][None].float() if coord else None)[0]
        torch.testing.assert_close(y[i, : lens[i]], single, atol=1e-5, rtol=1e-5)


def test_coord_embedding_zero_init_and_effect():
    torch.manual_seed(0)
    plain = make_encoder(seed=5)
    withc = make_encoder(seed=5, coord_pos_embed=True)
    assert all(k.startswith("coord_pos_embed.") for k in set(withc.state_dict()) - set(plain.state_dict()))
    withc.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 10, 32)
    coords = torch.randint(0, 5, (1, 10, 2)) * 256
    torch.testing.assert_close(withc(x, coords=coords), plain(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        withc.coord_pos_embed.proj.weight.normal_()
    assert (withc(x, coords=coords) - withc(x, coords=coords.flip(1))).abs().max() > 1e-4


def test_dropout_and_drop_path_active_in_train_mode():
    enc = make_encoder()
    x = torch.randn(1, 16, 32)
    enc.train()
    torch.manual_seed(0)
    a = enc(x)
    torch.manual_seed(1)
    b = enc(x)
    assert (a - b).abs().max() > 1e-4
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))


# key names/shapes of the released checkpoint (FACTS.md), built independently of the implementation
def released_slide_shapes(llm_hidden: int = 3584):
    shapes = {}
    for i in range(2):
        p = f"LongNet_encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (512, 512)
            shapes[p + f"self_attn.{proj}.bias"] = (512,)
        for ln, dim in (("self_attn.inner_attn_ln", 512), ("self_attn_layer_norm", 512),
                        ("ffn.ffn_layernorm", 1024), ("final_layer_norm", 512)):
            shapes[p + f"{ln}.weight"] = (dim,)
            shapes[p + f"{ln}.bias"] = (dim,)
        shapes[p + "ffn.fc1.weight"] = (1024, 512)
        shapes[p + "ffn.fc1.bias"] = (1024,)
        shapes[p + "ffn.fc2.weight"] = (512, 1024)
        shapes[p + "ffn.fc2.bias"] = (512,)
    shapes["LongNet_encoder.layer_norm.weight"] = (512,)
    shapes["LongNet_encoder.layer_norm.bias"] = (512,)
    shapes["projector.model.0.weight"] = (llm_hidden, 512)
    shapes["projector.model.0.bias"] = (llm_hidden,)
    shapes["projector.model.2.weight"] = (llm_hidden, llm_hidden)
    shapes["projector.model.2.bias"] = (llm_hidden,)
    return shapes


def test_released_layout_keys_and_shapes():
    enc = LongNetEncoder(SlideEncoderConfig())
    proj = Projector(512, 3584)
    ours = {f"LongNet_encoder.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    ours.update({f"projector.{k}": tuple(v.shape) for k, v in proj.state_dict().items()})
    assert ours == released_slide_shapes(3584)
    compat = LongNetEncoder(SlideEncoderConfig(compat="slidechat_v1"))
    assert set(compat.state_dict()) == set(enc.state_dict())


def test_config_roundtrip_json():
    cfg = tiny_cfg(compat="slidechat_v1", coord_pos_embed=True)
    again = SlideEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError):
        SlideEncoderConfig(segment_lengths=(8,), dilated_ratios=(1, 2))
    with pytest.raises(ValueError):
        SlideEncoderConfig(compat="v2")
