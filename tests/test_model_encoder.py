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
                                           saved_encoder_dict,
                                           )
from tolerances import FP32_RTOL, assert_close_rel, assert_differs_rel

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


def brute_force_dilated(q, k, v, segment_lengths, ratios, padding="masked"):
    """Independent reference of both edge rules: plain loops over branches, segments and heads.

    Per branch (segment ``sl`` = min(sl, N), ratio ``r``): head ``h`` belongs to group
    ``h // ceil(H / r)`` and, in each segment, sees the slots ``g, g + r, ...`` of the segment padded to a
    multiple of ``r`` (``ceil(sl / r)`` slots). A slot past the segment or past N is padding:
    ``"torchscale"`` makes it a key of zeros with a value of zeros (score 0, unmasked), ``"masked"`` drops
    it. Each real query gets (softmax output, log-sum-exp) per branch that covers it; the branches are
    mixed with softmax(lse) weights. float64 throughout.
    """
    b, n, h, d = q.shape
    q, k, v = q.double(), k.double(), v.double()
    per_pos = [[[[] for _ in range(h)] for _ in range(n)] for _ in range(b)]  # (out, lse) per branch
    for sl, r in zip(segment_lengths, ratios):
        sl = min(sl, n)
        n_seg = -(-n // sl)
        slots = -(-sl // r)
        per_group = -(-h // r)
        for bi in range(b):
            for s in range(n_seg):
                for head in range(h):
                    g = head // per_group
                    pos = [s * sl + g + r * j for j in range(slots)]
                    real = [(g + r * j) < sl and p < n for j, p in zip(range(slots), pos)]
                    keys, vals = [], []
                    for p, ok in zip(pos, real):
                        if ok:
                            keys.append(k[bi, p, head])
                            vals.append(v[bi, p, head])
                        elif padding == "torchscale":
                            keys.append(torch.zeros(d, dtype=torch.float64))
                            vals.append(torch.zeros(d, dtype=torch.float64))
                    if not keys:
                        continue
                    kk, vv = torch.stack(keys), torch.stack(vals)
                    for p, ok in zip(pos, real):
                        if not ok:
                            continue
                        scores = (kk @ q[bi, p, head]) / math.sqrt(d)
                        m = scores.max()
                        e = torch.exp(scores - m)
                        lse = m + torch.log(e.sum())
                        per_pos[bi][p][head].append(((e / e.sum()) @ vv, lse))
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    for bi in range(b):
        for p in range(n):
            for head in range(h):
                branches = per_pos[bi][p][head]
                lses = torch.stack([lse for _, lse in branches])
                w = torch.exp(lses - lses.max())
                w = w / w.sum()
                out[bi, p, head] = sum(wi * o for wi, (o, _) in zip(w, branches))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_with_lse_matches_math(impl):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8) for _ in range(3))
    bias = torch.zeros(3, 2, 1, 10)
    bias[1, :, :, 6:] = -1e30
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    out, lse = attention_with_lse(q, k, v, bias, impl=impl)
    # two float32 routes to one function (sums of <= 10 terms): kernel noise only, FP32_RTOL of the magnitude
    assert_close_rel(lse, torch.logsumexp(scores, -1), FP32_RTOL, what="lse")
    assert_close_rel(out, torch.softmax(scores, -1) @ v, FP32_RTOL, what="attention")


@pytest.mark.parametrize("impl", IMPLS)
def test_dilated_equals_dense_when_one_segment(impl):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 13, 4, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for sls in [(13,), (16,), (64,), (16, 32)]:  # segment >= N (incl. longer than N), ratio 1
        out = dilated_attention(q, k, v, sls, (1,) * len(sls), impl=impl)
        assert_close_rel(out, dense, FP32_RTOL, what=f"one segment {sls}")  # float32 both: kernel noise only


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", ["torchscale", "masked"])
@pytest.mark.parametrize("sls,ratios", [((4, 8), (1, 2)), ((4, 8, 16), (1, 2, 8)), ((3, 6), (1, 4))])
def test_dilated_matches_brute_force(impl, padding, sls, ratios):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 21, 4, 8) for _ in range(3))
    out = dilated_attention(q, k, v, sls, ratios, impl=impl, padding=padding)
    ref = brute_force_dilated(q, k, v, sls, ratios, padding)
    assert_close_rel(out, ref, FP32_RTOL, what="dilated vs float64 brute force")  # float32 error only


# N = 300 needs padding in every branch (300 = 4*64 + 44; 2*128 + 44; 256 + 44); N = 256 needs none;
# N = 301 with a 512 segment: one segment of 301, padded to a multiple of 4 inside it;
# 6 heads with ratio 4: heads padded to 8 and split into groups of 2 (the last group has no real head).
EDGE_CASES = [(300, (64, 128, 256), (1, 2, 4), 8), (256, (64, 128, 256), (1, 2, 4), 8),
              (301, (64, 128, 512), (1, 2, 4), 8), (130, (50, 100), (1, 4), 6)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,sls,ratios,heads", EDGE_CASES)
def test_padding_modes_match_brute_force_at_the_edge(impl, n, sls, ratios, heads):
    torch.manual_seed(5)
    # biased keys: scores far from 0, so a zero key (score 0) carries a very different weight than a mask
    q, k, v = (torch.randn(1, n, heads, 8) + 0.5 for _ in range(3))
    outs = {}
    for padding in ("torchscale", "masked"):
        outs[padding] = dilated_attention(q, k, v, sls, ratios, impl=impl, padding=padding).double()
        ref = brute_force_dilated(q, k, v, sls, ratios, padding)
        assert_close_rel(outs[padding], ref, FP32_RTOL, what=padding)  # float32 vs float64: float32 error only
    needs_padding = any(n % min(sl, n) or min(sl, n) % r for sl, r in zip(sls, ratios))
    if needs_padding:  # two different functions
        assert_differs_rel(outs["torchscale"], outs["masked"], 1e-3, what="padding modes")
    else:  # the same function when nothing is padded, by two float32 routes
        assert_close_rel(outs["torchscale"], outs["masked"], FP32_RTOL, what="padding modes, nothing padded")


@pytest.mark.parametrize("padding", ["torchscale", "masked"])
def test_attention_module_uses_its_padding_mode(padding):
    """The whole attention block (projections, sub-LN, out_proj) around the brute-force core."""
    torch.manual_seed(6)
    cfg = SlideEncoderConfig(embed_dim=64, ffn_dim=64, num_heads=8, num_layers=1,
                             segment_lengths=(64, 128, 256), dilated_ratios=(1, 2, 4), padding=padding)
    enc = LongNetEncoder(cfg).eval()
    attn = enc.layers[0].self_attn
    x = torch.randn(1, 300, 64)
    with torch.no_grad():
        q, k, v = (lin(x).view(1, 300, 8, 8) for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        core = brute_force_dilated(q, k, v, cfg.segment_lengths, cfg.dilated_ratios, padding).float()
        ref = attn.out_proj(attn.inner_attn_ln(core.reshape(1, 300, 64)))
        assert_close_rel(attn(x), ref, FP32_RTOL, what="attention block")  # float32 projections both sides


def test_torchscale_padding_refuses_a_key_mask():
    q = k = v = torch.randn(1, 10, 4, 8)
    pm = torch.zeros(1, 10, dtype=torch.bool)
    pm[0, 7:] = True
    with pytest.raises(ValueError, match="torchscale"):
        dilated_attention(q, k, v, (4,), (1,), padding_mask=pm, padding="torchscale")
    with pytest.raises(ValueError, match="padding mode"):
        dilated_attention(q, k, v, (4,), (1,), padding="zeros")


def test_dilated_attention_has_gradients():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 19, 4, 8, requires_grad=True) for _ in range(3))
    out = dilated_attention(q, k, v, (8, 16), (1, 2), impl="cpu_flash")
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dilated_attention(q2, k2, v2, (8, 16), (1, 2), impl="math").square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        assert_close_rel(a.grad, b.grad, FP32_RTOL, what="grad flash vs math")  # two float32 backward routes


def test_cross_patch_attention_default_vs_compat():
    x = torch.randn(1, 20, 32)
    x2 = x.clone()
    x2[0, 3] += torch.randn(32)  # (a constant shift would vanish in the first LayerNorm)
    enc = make_encoder()
    y, y2 = enc(x), enc(x2)
    others = [i for i in range(20) if i != 3]
    # patches see each other: a real change, 10x above the float-noise band (FP32_RTOL)
    assert_differs_rel(y[0, others], y2[0, others], 10 * FP32_RTOL, what="cross-patch")
    compat = make_encoder(compat="slidechat_v1")
    c, c2 = compat(x), compat(x2)
    # released bug: they don't. Exact: every row goes through the same kernels on the same shapes, and a row's
    # sums never read another row's values, so the unchanged rows come out bit for bit the same
    assert torch.equal(c[0, others], c2[0, others])
    assert_differs_rel(c[0, 3], c2[0, 3], 10 * FP32_RTOL, what="changed patch")


@pytest.mark.parametrize("padding", ["torchscale", "masked"])
def test_compat_equals_closed_form(padding):
    """The released behaviour (length-1 sequences) does not depend on the padding mode."""
    enc = make_encoder(compat="slidechat_v1", padding=padding)
    x = torch.randn(2, 9, 32)
    h = x
    for layer in enc.layers:
        a = layer.self_attn
        h = h + a.out_proj(a.inner_attn_ln(a.v_proj(layer.self_attn_layer_norm(h))))
        f = layer.ffn
        h = h + f.fc2(f.ffn_layernorm(F.gelu(f.fc1(layer.final_layer_norm(h)).float())))
    ref = enc.layer_norm(h)
    assert_close_rel(enc(x), ref, FP32_RTOL, what="compat vs closed form")  # same math, other kernels


def test_compat_ignores_padding_and_order():
    enc = make_encoder(compat="slidechat_v1")
    x = torch.randn(1, 12, 32)
    perm = torch.randperm(12)
    # rows land in other GEMM blocks (main vs tail kernels) when permuted: kernel noise only
    assert_close_rel(enc(x)[0, perm], enc(x[:, perm])[0], FP32_RTOL, what="permuted patches")


@pytest.mark.parametrize("padding", ["torchscale", "masked"])
@pytest.mark.parametrize("coord", [False, True])
def test_padding_does_not_change_real_positions(coord, padding):
    """Batching slides of different lengths gives each slide the tokens it gets alone, in both modes."""
    enc = make_encoder(coord_pos_embed=coord, padding=padding)
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
        assert_close_rel(y[i, : lens[i]], single, FP32_RTOL, what="batched vs alone")  # other shapes: kernel noise


def test_coord_embedding_zero_init_and_effect():
    torch.manual_seed(0)
    plain = make_encoder(seed=5)
    withc = make_encoder(seed=5, coord_pos_embed=True)
    assert all(k.startswith("coord_pos_embed.") for k in set(withc.state_dict()) - set(plain.state_dict()))
    withc.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 10, 32)
    coords = torch.randint(0, 5, (1, 10, 2)) * 256
    assert_close_rel(withc(x, coords=coords), plain(x), FP32_RTOL, what="zero-init coord embedding")
    with torch.no_grad():
        withc.coord_pos_embed.proj.weight.normal_()
    assert_differs_rel(withc(x, coords=coords), withc(x, coords=coords.flip(1)), 10 * FP32_RTOL, what="coords")


def test_dropout_and_drop_path_active_in_train_mode():
    enc = make_encoder()
    x = torch.randn(1, 16, 32)
    enc.train()
    torch.manual_seed(0)
    a = enc(x)
    torch.manual_seed(1)
    b = enc(x)
    assert_differs_rel(a, b, 10 * FP32_RTOL, what="dropout")  # a real change, not float noise
    enc.eval()
    assert torch.equal(enc(x), enc(x))  # eval: the same call twice is deterministic, bit for bit


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
    for padding in ("torchscale", "masked"):
        d = json.loads(json.dumps(tiny_cfg(padding=padding).to_dict()))
        assert d["padding"] == padding and SlideEncoderConfig.from_dict(d).padding == padding
    assert SlideEncoderConfig().padding == "torchscale"  # documented default
    legacy = {k: v for k, v in tiny_cfg().to_dict().items() if k != "padding"}
    assert SlideEncoderConfig.from_dict(saved_encoder_dict(legacy)).padding == "masked"
    assert saved_encoder_dict(tiny_cfg(padding="torchscale").to_dict())["padding"] == "torchscale"
    with pytest.raises(ValueError, match="padding"):
        SlideEncoderConfig(padding="zeros")
    # torchscale misplaces positions when a segment is not a multiple of its ratio: refused, not imitated
    with pytest.raises(ValueError, match="multiple of its dilated ratio"):
        SlideEncoderConfig(segment_lengths=(50, 100), dilated_ratios=(1, 3))
    assert SlideEncoderConfig(segment_lengths=(50, 100), dilated_ratios=(1, 3), padding="masked")
    with pytest.raises(ValueError):
        SlideEncoderConfig(segment_lengths=(8,), dilated_ratios=(1, 2))
    with pytest.raises(ValueError):
        SlideEncoderConfig(compat="v2")
