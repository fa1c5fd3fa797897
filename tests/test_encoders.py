"""Encoder registry: conch_v1 key names/structure (built from CONCH's published layout), refusal of
checkpoints without vision weights, resnet50_trunc, timm, tiny_test determinism. No downloads."""

from __future__ import annotations

import math

import pytest
import torch

from slidechat.features.encoders import build_encoder
from slidechat.features.encoders.registry import CLIP_MEAN, CLIP_STD
from slidechat.utils.errors import SlideChatError
from tolerances import FP32_RTOL, assert_close_rel


def conch_like_state_dict(grid: int = 14, seed: int = 0) -> dict:
    """A full-CoCa-style state dict with CONCH v1's key names and shapes, written out from the
    published layout (timm ViT-B/16 trunk, 1-query attentional pooler 512<-768, LayerNorm(512))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"visual.trunk.cls_token": r(1, 1, 768), "visual.trunk.pos_embed": r(1, 1 + grid * grid, 768),
          "visual.trunk.patch_embed.proj.weight": r(768, 3, 16, 16),
          "visual.trunk.patch_embed.proj.bias": r(768),
          "visual.trunk.norm.weight": 1 + r(768), "visual.trunk.norm.bias": r(768)}
    for i in range(12):
        b = f"visual.trunk.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(768), b + "norm1.bias": r(768),
                   b + "attn.qkv.weight": r(2304, 768), b + "attn.qkv.bias": r(2304),
                   b + "attn.proj.weight": r(768, 768), b + "attn.proj.bias": r(768),
                   b + "norm2.weight": 1 + r(768), b + "norm2.bias": r(768),
                   b + "mlp.fc1.weight": r(3072, 768), b + "mlp.fc1.bias": r(3072),
                   b + "mlp.fc2.weight": r(768, 3072), b + "mlp.fc2.bias": r(768)})
    p = "visual.attn_pool_contrast."
    sd.update({p + "query": torch.randn(1, 512, generator=g),
               p + "attn.q_proj_weight": r(512, 512) * 5, p + "attn.k_proj_weight": r(512, 768) * 5,
               p + "attn.v_proj_weight": r(512, 768) * 5, p + "attn.in_proj_bias": r(1536),
               p + "attn.out_proj.weight": r(512, 512) * 5, p + "attn.out_proj.bias": r(512),
               p + "ln_q.weight": 1 + r(512), p + "ln_q.bias": r(512),
               p + "ln_k.weight": 1 + r(768), p + "ln_k.bias": r(768),
               "visual.ln_contrast.weight": 1 + r(512), "visual.ln_contrast.bias": r(512),
               "visual.proj_contrast": r(512, 512),
               "visual.attn_pool_caption.query": r(256, 768), "visual.ln_caption.weight": r(768),
               "text.token_embedding.weight": r(10, 768), "text_decoder.ln_final.weight": r(768),
               "logit_scale": torch.tensor(4.6)})
    return sd


@pytest.fixture(scope="module")
def conch_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    sd = {"module." + k: v for k, v in conch_like_state_dict().items()}
    torch.save({"state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def conch(conch_ckpt):
    return build_encoder("conch_v1", conch_ckpt)


def _reference_pool(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """CoCa attentional pooling + ln_contrast written out with explicit matrix algebra."""
    p = "visual.attn_pool_contrast."
    ln = torch.nn.functional.layer_norm
    q = ln(sd[p + "query"], (512,), sd[p + "ln_q.weight"], sd[p + "ln_q.bias"])
    k_in = ln(tokens, (768,), sd[p + "ln_k.weight"], sd[p + "ln_k.bias"])
    bq, bk, bv = sd[p + "attn.in_proj_bias"].split(512)
    Q = q @ sd[p + "attn.q_proj_weight"].T + bq                       # (1, 512)
    K = k_in @ sd[p + "attn.k_proj_weight"].T + bk                    # (B, L, 512)
    V = k_in @ sd[p + "attn.v_proj_weight"].T + bv
    B, L, _ = tokens.shape
    Qh = Q.view(1, 8, 64).transpose(0, 1)                             # (8, 1, 64)
    Kh = K.view(B, L, 8, 64).permute(0, 2, 1, 3)                      # (B, 8, L, 64)
    Vh = V.view(B, L, 8, 64).permute(0, 2, 1, 3)
    att = torch.softmax((Qh.unsqueeze(0) @ Kh.transpose(-1, -2)) / math.sqrt(64), -1)
    o = (att @ Vh).permute(0, 2, 1, 3).reshape(B, 1, 512)
    o = o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    return ln(o[:, 0], (512,), sd["visual.ln_contrast.weight"], sd["visual.ln_contrast.bias"])


def test_conch_loads_conch_keys_and_pools_like_coca(conch):
    sd = conch_like_state_dict()
    own = conch.visual.state_dict()
    for k, v in sd.items():
        sub = k[len("visual."):]
        if sub.startswith(("trunk.", "attn_pool_contrast.", "ln_contrast.")) and sub != "trunk.pos_embed":
            assert torch.equal(own[sub], v), k
    assert own["trunk.pos_embed"].shape == (1, 1 + 28 * 28, 768)  # resampled from 14x14
    tokens = torch.randn(2, 785, 768)
    got = conch.visual.ln_contrast(conch.visual.attn_pool_contrast(tokens)[:, 0])
    # float32 both ways, reductions over 768 features and 785 tokens: K * eps <= 1e-4 of the magnitude (FP32_RTOL)
    assert_close_rel(got, _reference_pool(sd, tokens), FP32_RTOL, what="CoCa pooling vs explicit algebra")


def test_conch_forward_512d_with_clip_preprocessing(conch):
    assert conch.resize_to == 448 and conch.crop == 448 and tuple(conch.mean) == CLIP_MEAN
    white = torch.full((1, 224, 224, 3), 255, dtype=torch.uint8)
    x = conch.preprocess(white)
    assert x.shape == (1, 3, 448, 448)
    expect = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    # a few float32 ops on a constant image (resize weights summing to 1, scale, shift): within a few eps of
    # |value| <= 2.2; a wrong mean or std moves it by > 1e-2
    assert_close_rel(x[0, :, 10, 10], expect, FP32_RTOL, what="white pixel after CLIP normalisation")
    with torch.inference_mode():
        out = conch(torch.randint(0, 255, (1, 224, 224, 3), dtype=torch.uint8))
        tokens = conch.visual.trunk.forward_features(conch.preprocess(white))
    assert out.shape == (1, 512) and torch.isfinite(out).all()
    assert tokens.shape == (1, 785, 768)


def test_conch_refuses_checkpoints_without_vision_weights(tmp_path):
    full = conch_like_state_dict()
    text_only = tmp_path / "text_only.bin"
    torch.save({k: v for k, v in full.items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(SlideChatError, match="no CONCH vision weights"):
        build_encoder("conch_v1", text_only)
    no_pool = tmp_path / "no_pooler.bin"
    torch.save({k: v for k, v in full.items() if "attn_pool_contrast" not in k}, no_pool)
    with pytest.raises(SlideChatError, match="refusing to run with random weights"):
        build_encoder("conch_v1", no_pool)
    with pytest.raises(SlideChatError, match="--checkpoint"):
        build_encoder("conch_v1", None)
    with pytest.raises(SlideChatError, match="not found"):
        build_encoder("conch_v1", tmp_path / "missing.bin")


def test_resnet50_trunc_and_timm(tmp_path):
    from torchvision.models import resnet50

    p = tmp_path / "resnet50.pth"
    torch.save(resnet50(weights=None).state_dict(), p)
    enc = build_encoder("resnet50_trunc", p)
    with torch.inference_mode():
        assert enc(torch.randint(0, 255, (1, 224, 224, 3), dtype=torch.uint8)).shape == (1, 1024)
    assert len(enc.checkpoint_sha256) == 64

    import timm

    p2 = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), p2)
    enc2 = build_encoder("timm:resnet18", p2)
    assert enc2.crop == 224 and enc2.embed_dim == 512
    with torch.inference_mode():
        assert enc2(torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)).shape == (2, 512)
    with pytest.raises(SlideChatError, match="unknown encoder"):
        build_encoder("nonsense")


def test_tiny_test_deterministic_and_colour_sensitive():
    a, b = build_encoder("tiny_test"), build_encoder("tiny_test")
    x = torch.randint(0, 255, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pink = torch.tensor([230, 150, 190], dtype=torch.uint8).expand(1, 224, 224, 3)
    purple = torch.tensor([90, 40, 120], dtype=torch.uint8).expand(1, 224, 224, 3)
    with torch.inference_mode():
        fa, fb = a(x), b(x)
        d = (a(pink) - a(purple)).norm()
    assert fa.shape == (3, 512) and torch.equal(fa, fb)
    assert d > 0.5


def _patches(size: int, kind: str, n: int = 1, seed: int = 0):
    """uint8 (n, size, size, 3): ``smooth`` tissue-like gradients/blobs or ``noisy`` per-pixel noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        if kind == "smooth":
            base = np.stack([200 + 40 * np.sin(6 * xx + rng.uniform(0, 6)),
                             120 + 60 * np.cos(5 * yy + rng.uniform(0, 6)),
                             180 + 50 * np.sin(4 * (xx + yy))], -1)
            base += rng.normal(0, 2, base.shape)
        else:
            base = rng.uniform(0, 255, (size, size, 3))
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return np.stack(out)


def _conch_reference_inputs(patches):
    """CONCH's own preprocessing, written from its published transform: torchvision on PIL images."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(448),
                    T.ToTensor(), T.Normalize(mean=(0.48145466, 0.4578275, 0.40821073),
                                              std=(0.26862954, 0.26130258, 0.27577711))])
    return torch.stack([tf(Image.fromarray(p).convert("RGB")) for p in patches])


def test_pil_resize_reimplementation_is_bit_exact():
    import numpy as np
    from PIL import Image

    from slidechat.features.resample import pil_resize_uint8

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
    for (h, w, oh, ow) in [(224, 224, 448, 448), (512, 512, 448, 448), (448, 448, 224, 224),
                           (373, 373, 224, 224), (300, 373, 448, 557), (97, 64, 120, 200)]:
        for name, f in filters.items():
            a = np.concatenate([_patches(max(h, w), "noisy", 1, seed=h)[:, :h, :w],
                                _patches(max(h, w), "smooth", 1, seed=w)[:, :h, :w]])
            ref = np.stack([np.asarray(Image.fromarray(x).resize((ow, oh), f)) for x in a])
            got = pil_resize_uint8(torch.from_numpy(np.ascontiguousarray(a)), (oh, ow), name).numpy()
            assert np.array_equal(got, ref), (h, w, oh, ow, name, int(np.abs(got.astype(int) - ref).max()))


@pytest.mark.parametrize("size", [224, 448, 512])
def test_conch_preprocessing_equals_conch_pil_pipeline(conch, size):
    """Target: cosine >= 0.99999, relative error <= 1e-4 on the 512-d output, smooth and noisy patches."""
    import numpy as np

    patches = np.concatenate([_patches(size, "smooth", 1, seed=size), _patches(size, "noisy", 1, seed=size)])
    ref_x = _conch_reference_inputs(patches)
    with torch.inference_mode():
        ours_x = conch.preprocess(torch.from_numpy(patches))
        assert ours_x.shape == ref_x.shape == (2, 3, 448, 448)
        # the same uint8 pixels, normalised into |x| <= 2.2 by the same ops up to fusing: a few ulps (2.4e-7) at most
        assert (ours_x - ref_x).abs().max() <= 1e-6
        ours = conch(torch.from_numpy(patches)).double()
        ref = conch.encode(ref_x).double()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    rel = (ours - ref).norm(dim=1) / ref.norm(dim=1)
    assert (cos >= 0.99999).all() and (rel <= 1e-4).all(), (cos.tolist(), rel.tolist())
