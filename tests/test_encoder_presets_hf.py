"""Fidelity of the transformers and CONCH-v1.5 presets (``phikon``, ``phikon_v2``, ``conch_v1_5``).

Each reference is built here from the model card's own definition, independently of the preset code:

* Phikon / Phikon-v2: transformers' ``ViTModel`` / ``Dinov2Model`` from the hub ``config.json`` values typed
  below (fewer layers), random weights written to a file **in the hub's layout** (transformers 4.x key names,
  the names the published files carry) and read back by transformers' own ``from_pretrained`` (the cards'
  loading path), fed by the cards' image processors on PIL images, feature = ``last_hidden_state[:, 0]``;
* CONCH v1.5: TITAN's ``conch_v1_5.py`` forward written out below in plain torch over a state dict with
  TITAN's key names (iBOT ViT-L/16 with LayerScale, the ``+ 0.1`` bicubic position interpolation, the
  bias-free attentional pooler, ``ln_contrast``), fed by TITAN's torchvision transform on PIL images.

Then ``build_encoder(name, file, depth=same)`` runs on the same patches as uint8. Target: cosine >= 0.99999
on every patch and the same width. Patches are synthetic H&E tissue (``slidechat.wsi.synthetic``) at the
model's input size and at sizes that need the resize.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from slidechat.features.encoders import build_encoder, get_preset
from slidechat.utils.errors import SlideChatError

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}

# hf.co/owkin/phikon config.json (transformers 4.34; architectures ViTModel)
PHIKON_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                 "image_size": 224, "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-12, "qkv_bias": True,
                 "encoder_stride": 16}
# hf.co/owkin/phikon preprocessor_config.json (no processor type: AutoImageProcessor -> ViTImageProcessor)
PHIKON_PROCESSOR = {"do_normalize": True, "do_resize": True, "size": 224, **IMAGENET}
# owkin/phikon-v2: Dinov2Model ViT-L/16 (arXiv 2409.09173; see phikon.py for what could not be read offline)
PHIKON_V2_CONFIG = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
                    "hidden_act": "gelu", "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
                    "layerscale_value": 1e-5, "use_swiglu_ffn": False, "qkv_bias": True}
PHIKON_V2_PROCESSOR = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                       "do_center_crop": True, "resample": 3, **IMAGENET}

DEPTH = 1  # blocks built in CI (every other argument as the card says); the full size runs in the benchmark
MIN_COS = 0.99999


def tissue_patches(sizes: Sequence[int], seed: int = 3) -> List[np.ndarray]:
    """uint8 (s, s, 3) synthetic H&E tissue, one per size, from where the slide's tissue field is densest."""
    from slidechat.wsi.synthetic import MASK_DOWNSAMPLE, SlideSpec, render_region, tissue_field

    out = []
    for i, size in enumerate(sizes):
        spec = SlideSpec(name=f"p{i}", label=("tumor", "normal", "inflamed")[i % 3], width=2048, height=2048,
                         seed=seed + i)
        fld = tissue_field(spec)
        cy, cx = np.unravel_index(int(np.argmax(fld)), fld.shape)
        x0 = int(np.clip(cx * MASK_DOWNSAMPLE - size // 2, 0, spec.width - size))
        y0 = int(np.clip(cy * MASK_DOWNSAMPLE - size // 2, 0, spec.height - size))
        out.append(render_region(spec, fld, x0, y0, size, size, 1.0))
    return out


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (LayerNorm scales around 1, LayerScale around 0.5) so that any misplaced tensor
    moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("layernorm.weight", "layernorm_before.weight", "layernorm_after.weight",
                              "norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.1 * noise)
            elif "lambda1" in name:
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def cosines(ours: torch.Tensor, ref: torch.Tensor) -> List[float]:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return F.cosine_similarity(ours.double(), ref.double(), dim=1).tolist()


def run_ours(name: str, path: Path, patches: Sequence[np.ndarray], depth: int) -> torch.Tensor:
    enc = build_encoder(name, path, depth=depth)
    with torch.inference_mode():
        return torch.cat([enc(torch.from_numpy(np.ascontiguousarray(p))[None]) for p in patches])


# ------------------------------------------------------------------------------ transformers references

def hub_layout(sd: Dict[str, torch.Tensor], vit: bool) -> Dict[str, torch.Tensor]:
    """transformers-5 module names -> the names transformers 4.x wrote (the files on the hub), written out
    from 4.x's module tree: ``ViTLayer`` = attention.attention.{query,key,value}, attention.output.dense,
    intermediate.dense, output.dense, layernorm_before/after; ``Dinov2Layer`` = the same attention names,
    its norm1/norm2, mlp.fc1/fc2 and layer_scale1/2 unchanged."""
    attn = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
            "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    mlp = {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"} if vit else {}
    out = {}
    for key, value in sd.items():
        if vit and key.startswith("layers."):
            key = "encoder.layer." + key[len("layers."):]
        for new, old in {**attn, **mlp}.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value.contiguous()
    return out


def write_hub_checkpoint(tmp: Path, kind: str, seed: int = 0, depth: int = DEPTH, **config) -> Path:
    """A folder holding config.json + model.safetensors the way the hub repo does (random weights, ``depth``
    blocks; ``config`` overrides card values)."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    tmp.mkdir(parents=True, exist_ok=True)
    if kind == "phikon":
        # saved from a plain ViTModel: its pooler comes along (the card drops it when loading)
        model = ViTModel(ViTConfig(**{**PHIKON_CONFIG, "num_hidden_layers": depth, **config}))
    else:
        model = Dinov2Model(Dinov2Config(**{**PHIKON_V2_CONFIG, "num_hidden_layers": depth, **config}))
    randomize_(model, seed)
    model.config.save_pretrained(tmp)
    save_file(hub_layout(model.state_dict(), vit=kind == "phikon"), str(tmp / "model.safetensors"))
    return tmp / "model.safetensors"


def hf_reference(kind: str, weights: Path, patches: Sequence[np.ndarray]) -> Dict[str, torch.Tensor]:
    """The card's code: ``from_pretrained`` on the folder, its image processor on PIL images, CLS token; once
    per processor backend: ``pil`` (transformers 4.x's processors, the cards' era) and ``torchvision``
    (transformers 5's default for ``AutoImageProcessor``)."""
    from transformers import AutoModel, ViTModel
    from transformers.models.bit.image_processing_bit import BitImageProcessor
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    from transformers.models.vit.image_processing_vit import ViTImageProcessor

    if kind == "phikon":
        model, info = ViTModel.from_pretrained(weights.parent, add_pooling_layer=False, output_loading_info=True)
        procs = {"pil": ViTImageProcessorPil(**PHIKON_PROCESSOR), "torchvision": ViTImageProcessor(**PHIKON_PROCESSOR)}
    else:
        model, info = AutoModel.from_pretrained(weights.parent, output_loading_info=True)
        procs = {"pil": BitImageProcessorPil(**PHIKON_V2_PROCESSOR),
                 "torchvision": BitImageProcessor(**PHIKON_V2_PROCESSOR)}
    # transformers itself accepts the hub layout written above (only the dropped pooler is left over)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith("pooler.") for k in info["unexpected_keys"]), info
    model.eval()
    images = [Image.fromarray(p) for p in patches]
    with torch.inference_mode():
        x = torch.cat([proc(images=images, return_tensors="pt")["pixel_values"] for proc in procs.values()])
        feats = model(pixel_values=x).last_hidden_state[:, 0]
    return dict(zip(procs, feats.split(len(patches))))


@pytest.mark.parametrize("kind,dim", [("phikon", 768), ("phikon_v2", 1024)])
def test_transformers_presets_equal_card_pipeline(tmp_path, kind, dim):
    """Target: cosine >= 0.99999 per patch, same width, with either processor backend, on patches at the
    model's 224 px and at 448 / 512 px (resized)."""
    weights = write_hub_checkpoint(tmp_path / kind, kind)
    patches = tissue_patches((224, 448, 512))
    ours = run_ours(kind, weights, patches, DEPTH)
    assert ours.shape == (len(patches), dim) and get_preset(kind)[0].dim == dim
    refs = hf_reference(kind, weights, patches)
    for backend, ref in refs.items():
        # float32 through the same blocks on identical (PIL-exact) pixels: cosine 1 - O(1e-12); the torchvision
        # backend rounds a few resized pixels by one level (measured: max 1/255, mean < 1e-4)
        cos = cosines(ours, ref)
        assert min(cos) >= MIN_COS, (kind, backend, cos)
    # the bound means something: the patches' features are far from one another
    assert max(cosines(ours, torch.roll(refs["pil"], 1, 0))) < 0.99


def test_phikon_v2_position_grid_comes_from_the_file(tmp_path):
    """A file whose position embeddings hold another grid (here 448 px = 28 x 28) loads, and the model
    interpolates them to the 224-px input exactly as transformers does with that config."""
    weights = write_hub_checkpoint(tmp_path / "grid", "phikon_v2", image_size=448)
    patches = tissue_patches((224,))
    ours = run_ours("phikon_v2", weights, patches, DEPTH)
    # float32, same module and pixels: cosine 1 - O(1e-12)
    assert min(cosines(ours, hf_reference("phikon_v2", weights, patches)["pil"])) >= MIN_COS


def test_transformers_presets_accept_both_layouts_and_refuse_others(tmp_path):
    """The hub file (4.x names), the same weights under a ``vit.`` prefix or saved by transformers 5 all load
    to the same model; a missing or an extra tensor is a one-line error naming the file."""
    from safetensors.torch import load_file

    weights = write_hub_checkpoint(tmp_path / "hub", "phikon")
    hub = load_file(str(weights))
    patch = torch.from_numpy(tissue_patches((224,))[0])[None]

    def features(sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
        path = tmp_path / name
        save_file(sd, str(path))
        with torch.inference_mode():
            return build_encoder("phikon", path, depth=DEPTH)(patch)

    base = features(hub, "hub.safetensors")
    prefixed = {"vit." + k: v for k, v in hub.items()}
    assert torch.equal(features(prefixed, "prefixed.safetensors"), base)
    # transformers 5's own names for the same weights (its from_pretrained does the renaming)
    from transformers import ViTModel
    v5 = ViTModel.from_pretrained(weights.parent, add_pooling_layer=False).state_dict()
    assert torch.equal(features({k: v.contiguous() for k, v in v5.items()}, "v5.safetensors"), base)

    missing = {k: v for k, v in hub.items() if "encoder.layer.0.output.dense" not in k}
    extra = {**hub, "classifier.weight": torch.zeros(2, 768)}
    for sd, name in ((missing, "missing.safetensors"), (extra, "extra.safetensors")):
        save_file(sd, str(tmp_path / name))
        with pytest.raises(SlideChatError) as err:
            build_encoder("phikon", tmp_path / name, depth=DEPTH)
        assert name in str(err.value) and "\n" not in str(err.value), str(err.value)


# ------------------------------------------------------------------------------ CONCH v1.5 (TITAN)

def titan_conch_state_dict(depth: int, seed: int = 0, grid: int = 14) -> Dict[str, torch.Tensor]:
    """Random weights under TITAN's ``conch_v1_5`` names and shapes (``ConchConfig``: patch 16, context 1024,
    embed 768, 16 heads, MLP ratio 4, qkv bias, LayerScale; pooler with 1 query; model built at 224 px)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.02 * torch.randn(*s, generator=g)  # noqa: E731
    one = lambda n: 1 + 0.1 * torch.randn(n, generator=g)  # noqa: E731
    d, h, e = 1024, 4096, 768
    sd = {"trunk.cls_token": r(1, 1, d), "trunk.pos_embed": 50 * r(1, 1 + grid * grid, d),
          "trunk.patch_embed.proj.weight": r(d, 3, 16, 16), "trunk.patch_embed.proj.bias": r(d),
          "trunk.norm.weight": one(d), "trunk.norm.bias": r(d)}
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        sd.update({b + "norm1.weight": one(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "ls1.gamma": 0.5 * one(d), b + "norm2.weight": one(d), b + "norm2.bias": r(d),
                   b + "mlp.fc1.weight": r(h, d), b + "mlp.fc1.bias": r(h), b + "mlp.fc2.weight": r(d, h),
                   b + "mlp.fc2.bias": r(d), b + "ls2.gamma": 0.5 * one(d)})
    p = "attn_pool_contrast."
    sd.update({p + "query": torch.randn(1, e, generator=g), p + "ln_k.weight": one(d), p + "ln_k.bias": r(d),
               p + "ln_q.weight": one(e), p + "ln_q.bias": r(e), p + "to_q.weight": 5 * r(e, e),
               p + "to_kv.weight": 5 * r(2 * e, d), p + "to_out.weight": 5 * r(e, e),
               "ln_contrast.weight": one(e), "ln_contrast.bias": r(e)})
    return sd


def titan_conch_reference(sd: Dict[str, torch.Tensor], x: torch.Tensor, depth: int) -> torch.Tensor:
    """TITAN's ``EncoderWithAttentionalPooler.forward`` written out: ``trunk(x, return_all_tokens=True)`` ->
    ``attn_pool_contrast(x)[:, 0]`` -> ``ln_contrast``."""
    ln = F.layer_norm
    B, _, H, W = x.shape
    t = F.conv2d(x, sd["trunk.patch_embed.proj.weight"], sd["trunk.patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["trunk.cls_token"].expand(B, -1, -1), t], 1)
    # VisionTransformer.interpolate_pos_encoding (iBOT): bicubic by scale factor (w0 + 0.1) / sqrt(N)
    pos = sd["trunk.pos_embed"]
    n = pos.shape[1] - 1
    w0, h0 = H // 16 + 0.1, W // 16 + 0.1
    grid = pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    t = t + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        y = ln(t, (1024,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(
            B, -1, 3, 16, 64).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q * 64 ** -0.5) @ k.transpose(-2, -1), -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, 1024), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        t = t + a * sd[b + "ls1.gamma"]
        y = ln(t, (1024,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + y * sd[b + "ls2.gamma"]
    t = ln(t, (1024,), sd["trunk.norm.weight"], sd["trunk.norm.bias"], 1e-6)
    # AttentionalPooler: ln_k on tokens, ln_q on the query, to_q / to_kv, 8 heads, amax-shifted softmax
    p = "attn_pool_contrast."
    kv = ln(t, (1024,), sd[p + "ln_k.weight"], sd[p + "ln_k.bias"])
    qq = ln(sd[p + "query"], (768,), sd[p + "ln_q.weight"], sd[p + "ln_q.bias"]) @ sd[p + "to_q.weight"].T
    kk, vv = (kv @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
    qh = qq.reshape(1, 8, 96).transpose(0, 1) * 96 ** -0.5                      # (8, 1, 96)
    kh, vh = (z.reshape(B, -1, 8, 96).permute(0, 2, 1, 3) for z in (kk, vv))  # (B, 8, L, 96)
    sim = torch.einsum("hid,bhjd->bhij", qh, kh)
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, vh).permute(0, 2, 1, 3).reshape(B, 1, 768)
    pooled = (out @ sd[p + "to_out.weight"].T)[:, 0]
    return ln(pooled, (768,), sd["ln_contrast.weight"], sd["ln_contrast.bias"])


def titan_transform(patches: Sequence[np.ndarray]) -> torch.Tensor:
    """TITAN / TRIDENT's CONCH v1.5 ``eval_transform`` (torchvision on PIL images)."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(448), T.ToTensor(),
                    T.Normalize(IMAGENET["image_mean"], IMAGENET["image_std"])])
    return torch.stack([tf(Image.fromarray(p).convert("RGB")) for p in patches])


def test_conch_v1_5_equals_titan(tmp_path):
    """Target: cosine >= 0.99999 per patch on a 512-px patch (TITAN's 20x tile, resized to 448) and a 448-px
    one, 768-d; one block, every other argument TITAN's."""
    depth = 1
    sd = titan_conch_state_dict(depth)
    path = tmp_path / "conch_v1_5_pytorch_model.bin"
    torch.save(sd, path)
    patches = tissue_patches((512, 448), seed=7)
    ours = run_ours("conch_v1_5", path, patches, depth)
    with torch.inference_mode():
        ref = torch.cat([titan_conch_reference(sd, titan_transform([p]), depth) for p in patches])
    # float32, one block of 785 tokens x 1024 features, sums of <= 4096 terms: far inside 1e-5 on the cosine
    cos = cosines(ours, ref)
    assert ours.shape == (2, 768) and min(cos) >= MIN_COS, cos
    assert max(cosines(ours, torch.roll(ref, 1, 0))) < 0.99  # distinct patches give distinct features


def test_conch_v1_5_checkpoint_rules(tmp_path):
    """A grid other than 14 x 14 is resized as TRIDENT does (bilinear, no antialias, before the runtime iBOT
    interpolation); a CONCH v1 file or a missing pooler is a one-line error naming the file."""
    from timm.layers import resample_abs_pos_embed

    sd = titan_conch_state_dict(1, grid=28)
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(sd, path)
    enc = build_encoder("conch_v1_5", path, depth=1)
    expect = resample_abs_pos_embed(sd["trunk.pos_embed"], new_size=[14, 14], num_prefix_tokens=1,
                                    interpolation="bilinear", antialias=False)
    assert torch.equal(enc.visual.trunk.pos_embed.detach(), expect)

    no_pool = {k: v for k, v in titan_conch_state_dict(1).items() if not k.startswith("attn_pool_contrast.")}
    v1_layout = {"visual." + k: v for k, v in titan_conch_state_dict(1).items()}
    for bad, name in ((no_pool, "no_pool.bin"), (v1_layout, "conch_v1_layout.bin")):
        torch.save(bad, tmp_path / name)
        with pytest.raises(SlideChatError) as err:
            build_encoder("conch_v1_5", tmp_path / name, depth=1)
        assert name in str(err.value) and "\n" not in str(err.value), str(err.value)
