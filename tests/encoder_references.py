"""The named patch encoders as their model cards define them, typed out from the cards (and their hub
``config.json``), independently of ``slidechat.features.encoders``: the card's model construction, the
card's torchvision transform on a PIL image, the card's output rule on ``model(x)``.

Used by ``tests/test_encoder_presets.py`` (fewer blocks, for CI) and ``benchmarks/encoder_fidelity.py``
(full size). Nothing here imports the preset code: a wrong fact in a preset shows up as a difference.

Sources (read for facts):
* UNI: hf.co/MahmoodLab/UNI card, "load from local weights" snippet;
* UNI2-h: hf.co/MahmoodLab/UNI2-h card, ``timm_kwargs`` + the local-weights transform;
* Virchow / Virchow2: hf.co/paige-ai/Virchow(2) cards + hub config.json (model_args, pretrained_cfg);
* H-optimus-0: hf.co/bioptimus/H-optimus-0 card + github.com/bioptimus/releases
  models/h-optimus/v0/README.md (the architecture written out as ``VisionTransformer(**params)``);
* H-optimus-1: hf.co/bioptimus/H-optimus-1 card + hub config (``vit_giant_patch14_reg4_dinov2``);
* H0-mini: hf.co/bioptimus/H0-mini card + hub config (``vit_base_patch14_reg4_dinov2``);
* Prov-GigaPath: hf.co/prov-gigapath/prov-gigapath card + hub config.json;
* MUSK: github.com/lilab-stanford/MUSK ``musk/modeling.py`` (``musk_large_patch16_384``, ``MUSK.forward``),
  ``musk/utils.py`` (``MultiScaleForward``) and README (transform, feature-extraction call), on torchscale's
  own ``BEiT3`` (PyPI torchscale 0.3.0; the MUSK repo vendors the same code with relative imports).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.layers import SwiGLUPacked
from timm.layers.mlp import GluMlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision import transforms as T

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
BIOPTIMUS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))


def _with_depth(kwargs: dict, depth: Optional[int]) -> dict:
    """The card's arguments, with fewer blocks when ``depth`` is given (CI); everything else unchanged."""
    return dict(kwargs, **({} if depth is None else {"depth": depth}))


# --------------------------------------------------------------------------------- the cards' models

def uni_model(depth: Optional[int] = None) -> nn.Module:
    kw = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    return timm.create_model("vit_large_patch16_224", pretrained=False, **_with_depth(kw, depth))


def uni2_h_model(depth: Optional[int] = None) -> nn.Module:
    kw = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
          "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
          "mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "reg_tokens": 8, "dynamic_img_size": True}
    return timm.create_model("vit_giant_patch14_224", pretrained=False, **_with_depth(kw, depth))


def virchow_model(depth: Optional[int] = None, registers: int = 0) -> nn.Module:
    # hub config model_args, plus the card's mlp_layer / act_layer
    kw = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
          "dynamic_img_size": True}
    if registers:
        kw["reg_tokens"] = registers
    return timm.create_model("vit_huge_patch14_224", pretrained=False, mlp_layer=SwiGLUPacked,
                             act_layer=torch.nn.SiLU, **_with_depth(kw, depth))


def h_optimus_0_model(depth: Optional[int] = None) -> nn.Module:
    # bioptimus/releases README: the model written out as timm VisionTransformer(**params)
    params = {"patch_size": 14, "embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-05,
              "mlp_ratio": 5.33334,
              "mlp_layer": functools.partial(GluMlp, act_layer=torch.nn.SiLU, gate_last=False),
              "act_layer": torch.nn.SiLU, "reg_tokens": 4, "no_embed_class": True, "img_size": 224,
              "num_classes": 0, "in_chans": 3}
    return VisionTransformer(**_with_depth(params, depth))


def h_optimus_1_model(depth: Optional[int] = None) -> nn.Module:
    # hub config (vit_giant_patch14_reg4_dinov2, img_size 224, global_pool token) + the card's kwargs
    kw = {"img_size": 224, "global_pool": "token", "num_classes": 0}
    return timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, init_values=1e-5,
                             dynamic_img_size=False, **_with_depth(kw, depth))


def h0_mini_model(depth: Optional[int] = None) -> nn.Module:
    kw = {"img_size": 224, "mlp_ratio": 5.33334, "reg_tokens": 4, "init_values": 1e-05, "num_classes": 0,
          "global_pool": "", "dynamic_img_size": True}
    return timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, mlp_layer=SwiGLUPacked,
                             act_layer=torch.nn.SiLU, **_with_depth(kw, depth))


def gigapath_model(depth: Optional[int] = None) -> nn.Module:
    model_args = {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                  "num_heads": 24, "init_values": 1e-05, "mlp_ratio": 5.33334, "num_classes": 0}
    return timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **_with_depth(model_args, depth))


def _import_torchscale():
    """torchscale's BEiT3 and EncoderConfig. torchscale imports ``fairscale.nn`` (``checkpoint_wrapper``,
    ``wrap``) at module level but calls them only for activation checkpointing / FSDP, which MUSK's config
    leaves off; fairscale is not installed (an sdist that builds against torch), so identity stand-ins fill
    that import when it is missing."""
    import importlib.util
    import sys
    import types
    if "fairscale" not in sys.modules and importlib.util.find_spec("fairscale") is None:
        fairscale, fairscale_nn = types.ModuleType("fairscale"), types.ModuleType("fairscale.nn")
        fairscale_nn.checkpoint_wrapper = lambda module, *a, **k: module
        fairscale_nn.wrap = lambda module, *a, **k: module
        fairscale.nn = fairscale_nn
        sys.modules.update({"fairscale": fairscale, "fairscale.nn": fairscale_nn})
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3
    return BEiT3, EncoderConfig


def musk_model(depth: Optional[int] = None) -> nn.Module:
    """``musk_large_patch16_384``: ``MUSK(_get_large_config(img_size=384))`` of musk/modeling.py, typed out:
    torchscale BEiT3 plus the two zero-shot heads and the contrastive temperature."""
    BEiT3, EncoderConfig = _import_torchscale()
    args = EncoderConfig(img_size=384, patch_size=16, vocab_size=64010, multiway=True, layernorm_embedding=False,
                         normalize_output=True, no_output_layer=True, drop_path_rate=0, encoder_embed_dim=1024,
                         encoder_attention_heads=16, encoder_ffn_embed_dim=int(1024 * 4),
                         encoder_layers=24 if depth is None else depth, checkpoint_activations=None)

    class MUSK(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.beit3 = BEiT3(args)
            self.language_head = nn.Linear(1024, 1024, bias=False)
            self.vision_head = nn.Linear(1024, 1024, bias=False)
            self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

        def forward(self, image: torch.Tensor, with_head: bool = True, out_norm: bool = True,
                    ms_aug: bool = False, return_global: bool = True) -> torch.Tensor:
            # MUSK.forward's image branch (the text branch is not used by patch features)
            if ms_aug:
                vision_cls = _musk_multiscale_forward(self, image, scales=[1, 2])
                if with_head:
                    vision_cls = self.vision_head(vision_cls[:, :1024])
            else:
                x = self.beit3(visual_tokens=image)["encoder_out"]
                vision_cls = x[:, 0, :] if return_global else x
                if with_head:
                    vision_cls = self.vision_head(vision_cls)
            if out_norm:
                vision_cls = torch.nn.functional.normalize(vision_cls, dim=-1)
            return vision_cls

    return MUSK()


def _musk_multiscale_forward(model: nn.Module, image: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """musk/utils.py ``MultiScaleForward`` (max_split_size = the input size): ``split_chessboard`` lays the
    s x s sub-squares out as ``(nh nw b)``, ``batched_forward`` runs chunks of b without heads or norm."""
    from einops import rearrange
    b, _, size, _ = image.shape
    outs = []
    for s in scales:
        x = torch.nn.functional.interpolate(image.to(torch.float32), size=int(size * s), mode="bicubic")
        x = rearrange(x.to(image.dtype), "b c (nh h) (nw w) -> (nh nw b) c h w", nh=s, nw=s)
        outs.append(torch.cat([model(image=chunk, out_norm=False, with_head=False, return_global=True,
                                     ms_aug=False) for chunk in x.split(b)], dim=0))
    up_scale = rearrange(outs[1], "(n b) c -> b n c", b=outs[0].shape[0])
    return torch.cat([outs[0], up_scale.mean(1)], dim=-1)


# --------------------------------------------------------------------------------- the cards' transforms

def local_resize_transform(norm: dict, resize: Optional[int] = 224) -> Callable:
    """UNI / UNI2-h local-weights snippet (``Resize(224)``: torchvision's default bilinear); H-optimus'
    ``ToTensor`` + ``Normalize`` (``resize=None``)."""
    steps = [] if resize is None else [T.Resize(resize)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(**norm)])


def timm_pretrained_cfg_transform(pretrained_cfg: dict) -> Callable:
    """The cards' ``create_transform(**resolve_data_config(model.pretrained_cfg))`` at eval."""
    return create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg), is_training=False)


VIRCHOW_PRETRAINED_CFG = {"input_size": [3, 224, 224], "fixed_input_size": False, "interpolation": "bicubic",
                          "crop_pct": 1.0, "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225], "num_classes": 0}
H0_MINI_PRETRAINED_CFG = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 1.0,
                          "crop_mode": "center", "mean": list(BIOPTIMUS["mean"]), "std": list(BIOPTIMUS["std"]),
                          "num_classes": 0}


def gigapath_transform() -> Callable:
    return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(**IMAGENET)])


def musk_transform() -> Callable:
    """The MUSK README's transform (``interpolation=3`` is bicubic; timm's IMAGENET_INCEPTION mean/std)."""
    from timm.data.constants import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
    return T.Compose([T.Resize(384, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop((384, 384)), T.ToTensor(),
                      T.Normalize(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD)])


def hoptimus_transform(size: int) -> Callable:
    """The card's transform expects 224 px tiles (no resize); another size goes through TRIDENT's
    ``Resize(224)`` first (trident/patch_encoder_models/load.py)."""
    return local_resize_transform(BIOPTIMUS, resize=None if size == 224 else 224)


# --------------------------------------------------------------------------------- the cards' outputs

def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _virchow_v1_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    output = model(x)  # 1 x 257 x 1280
    class_token, patch_tokens = output[:, 0], output[:, 1:]
    return torch.cat([class_token, patch_tokens.mean(1)], dim=-1)


def _virchow2_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    output = model(x)  # 1 x 261 x 1280
    class_token, patch_tokens = output[:, 0], output[:, 5:]  # tokens 1-4 are register tokens
    return torch.cat([class_token, patch_tokens.mean(1)], dim=-1)


def _h0_mini_concatenated(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    output = model(x)  # 1 x 261 x 768
    cls_features, patch_token_features = output[:, 0], output[:, model.num_prefix_tokens:]
    return torch.cat([cls_features, patch_token_features.mean(1)], dim=-1)


def _h0_mini_cls(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)[:, 0]


def _musk_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # the README's image encoding for linear probes and MIL
    return model(image=x, with_head=False, out_norm=False, ms_aug=True, return_global=True)


def _musk_class_token(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # TRIDENT's MuskInferenceEncoder defaults: inference_aug=False, with_proj=False, out_norm=False
    return model(image=x, with_head=False, out_norm=False, ms_aug=False, return_global=True)


@dataclass(frozen=True)
class CardReference:
    """One preset's reference: ``model(depth)``, ``transform(patch_size)``, ``output(model, x)``."""

    preset: str
    dim: int
    model: Callable[[Optional[int]], nn.Module]
    transform: Callable[[int], Callable]
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    sizes: Sequence[int]  # patch sizes to check: the authors' tile size first, then one that is resized


REFERENCES: Dict[str, CardReference] = {r.preset: r for r in [
    CardReference("uni", 1024, uni_model, lambda s: local_resize_transform(IMAGENET), _pooled, (256, 224)),
    CardReference("uni2_h", 1536, uni2_h_model, lambda s: local_resize_transform(IMAGENET), _pooled, (256, 224)),
    CardReference("virchow", 2560, virchow_model,
                  lambda s: timm_pretrained_cfg_transform(VIRCHOW_PRETRAINED_CFG), _virchow_v1_embedding,
                  (224, 256)),
    CardReference("virchow2", 2560, functools.partial(virchow_model, registers=4),
                  lambda s: timm_pretrained_cfg_transform(VIRCHOW_PRETRAINED_CFG), _virchow2_embedding,
                  (224, 256)),
    CardReference("h_optimus_0", 1536, h_optimus_0_model, hoptimus_transform, _pooled, (224, 256)),
    CardReference("h_optimus_1", 1536, h_optimus_1_model, hoptimus_transform, _pooled, (224, 256)),
    CardReference("h0_mini", 1536, h0_mini_model,
                  lambda s: timm_pretrained_cfg_transform(H0_MINI_PRETRAINED_CFG), _h0_mini_concatenated,
                  (224, 256)),
    CardReference("h0_mini_cls", 768, h0_mini_model,
                  lambda s: timm_pretrained_cfg_transform(H0_MINI_PRETRAINED_CFG), _h0_mini_cls, (224, 256)),
    CardReference("gigapath", 1536, gigapath_model, lambda s: gigapath_transform(), _pooled, (256, 224)),
    CardReference("musk_ms", 2048, musk_model, lambda s: musk_transform(), _musk_features, (384, 256)),
    CardReference("musk", 1024, musk_model, lambda s: musk_transform(), _musk_class_token, (384, 256)),
]}


# --------------------------------------------------------------------------------- helpers

@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that make every block count: fan-in scaled matrices (attention is not uniform), LayerScale
    gammas of 0.5-1 (timm's 1e-5 would make each block nearly the identity, so a wrong block would hardly
    move the output), norms and biases away from 1 and 0, unit-scale tokens and position embeddings."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.state_dict(keep_vars=True).items()):
        if name.endswith("gamma"):
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim >= 2 and not name.endswith(("pos_embed", "cls_token", "reg_token")):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def tissue_patches(size: int, n: int, seed: int = 0, first_class: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) from the project's synthetic slides: one class per patch (the classes in
    turn from ``first_class``), centred on the tissue (nuclei, stroma texture, stain mottling), not flat
    colour or noise."""
    from slidechat.wsi.synthetic import LABELS, MASK_DOWNSAMPLE, SlideSpec, render_region, tissue_field

    out = []
    for i in range(n):
        spec = SlideSpec(name=f"ref{i}", label=LABELS[(first_class + i) % len(LABELS)], width=1536, height=1536,
                         seed=seed + i)
        fld = tissue_field(spec)
        cy, cx = np.unravel_index(int(np.argmax(fld)), fld.shape)
        x0 = max(0, (cx + 0.5) * MASK_DOWNSAMPLE - size / 2)
        y0 = max(0, (cy + 0.5) * MASK_DOWNSAMPLE - size / 2)
        out.append(render_region(spec, fld, x0, y0, size, size, 1.0))
    return np.stack(out)


@torch.inference_mode()
def reference_features(ref: CardReference, model: nn.Module, patches: np.ndarray) -> torch.Tensor:
    """The card's transform on each PIL image, then the card's output rule on the batch."""
    tf = ref.transform(patches.shape[1])
    x = torch.stack([tf(Image.fromarray(p).convert("RGB")) for p in patches])
    return ref.output(model, x)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-patch cosine similarity, computed in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())
