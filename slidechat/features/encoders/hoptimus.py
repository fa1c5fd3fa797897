"""H-optimus-0, H-optimus-1 and H0-mini (Bioptimus): timm DINOv2-style ViTs with 4 register tokens and
Bioptimus' own normalisation (mean 0.707223, 0.578729, 0.703617; std 0.211883, 0.230117, 0.177517).

Facts, each read from the source named:
* H-optimus-0/-1 architecture: hub ``config.json`` ``vit_giant_patch14_reg4_dinov2`` (img_size 224,
  global_pool "token", num_classes 0) and the cards' ``timm.create_model(..., init_values=1e-5,
  dynamic_img_size=False)``; written out in full in github.com/bioptimus/releases
  (models/h-optimus/v0/README.md: ViT-g/14, embed 1536, depth 40, heads 24, mlp_ratio 5.33334 with
  SwiGLU (``GluMlp(gate_last=False)`` + SiLU), LayerScale 1e-5, reg_tokens 4, no_embed_class): 1536-d
  class token after the final norm;
* H-optimus preprocessing: the cards' ``ToTensor`` + ``Normalize`` on "images of size 224x224 extracted at
  0.5 microns per pixel" (no resize). Other patch sizes are resized as TRIDENT does
  (``Resize(224)``, torchvision's default bilinear; a no-op on 224 px patches, so the card's features
  are unchanged);
* H0-mini (hf.co/bioptimus/H0-mini, a ViT-B/14 distilled from H-optimus-0): the card's
  ``timm.create_model("hf-hub:bioptimus/H0-mini", mlp_layer=SwiGLUPacked, act_layer=SiLU)`` on the hub
  ``vit_base_patch14_reg4_dinov2`` with model_args img_size 224, mlp_ratio 5.33334, reg_tokens 4,
  init_values 1e-5, global_pool "", dynamic_img_size (as copied by loaders that load the real weights
  strictly, e.g. TRIDENT load.py); preprocessing ``create_transform(resolve_data_config(pretrained_cfg))``
  = bicubic at 224 with crop_pct 1.0 (Bioptimus' SDK ModelSpec for h0-mini: 224 px tiles at 0.5 um/px,
  same mean/std). The card computes the class token (768-d) and "the CLS token features concatenated
  with the mean of the patch token features (1536-d)"; ``h0_mini`` is the latter (Bioptimus' SDK
  output_type "cls+patch_mean", 1536), ``h0_mini_cls`` the former, which is what TRIDENT's ``h0-mini``
  writes by default;
* licences: H-optimus-0 Apache-2.0; H-optimus-1 and H0-mini gated, non-commercial (CC-BY-NC-ND-4.0);
* TRIDENT names ``hoptimus0``, ``hoptimus1``, ``h0-mini`` (github.com/mahmoodlab/TRIDENT
  trident/patch_encoder_models/load.py).
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from slidechat.features.encoders.registry import EncoderPreset, Preprocessing, register_encoder
from slidechat.features.encoders.vit import timm_vit

BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: the card's ToTensor + Normalize on 224 px tiles; TRIDENT's Resize(224) (bilinear) for other sizes
_HOPTIMUS_TRANSFORM = Preprocessing(resize_to=224, crop=None, interpolation="bilinear", mean=BIOPTIMUS_MEAN,
                                    std=BIOPTIMUS_STD)
_HOPTIMUS_ARGS = dict(img_size=224, global_pool="token", num_classes=0, init_values=1e-5, dynamic_img_size=False)
_HOPTIMUS_OUTPUT = "class token after the final norm (timm global_pool='token'; 4 register tokens)"

#: timm's eval transform for H0-mini's pretrained_cfg (bicubic, crop_pct 1.0): Resize(224) + CenterCrop(224)
_H0_MINI_TRANSFORM = Preprocessing(resize_to=224, crop=224, interpolation="bicubic", mean=BIOPTIMUS_MEAN,
                                   std=BIOPTIMUS_STD)
_H0_MINI_FACTORY_ARGS = dict(img_size=224, num_classes=0, mlp_ratio=5.33334, reg_tokens=4, init_values=1e-5,
                             global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                             act_layer=torch.nn.SiLU)
_H0_MINI_SOURCE = "hf.co/bioptimus/H0-mini model card + hub config (vit_base_patch14_reg4_dinov2)"


@register_encoder
def h_optimus_0() -> EncoderPreset:
    return EncoderPreset(
        name="h_optimus_0", dim=1536, trident_name="hoptimus0", preprocessing=_HOPTIMUS_TRANSFORM,
        output=_HOPTIMUS_OUTPUT,
        factory=timm_vit("vit_giant_patch14_reg4_dinov2", "pooled", **_HOPTIMUS_ARGS),
        magnification=20, patch_px=224, licence="Apache-2.0",
        source="hf.co/bioptimus/H-optimus-0 model card; github.com/bioptimus/releases models/h-optimus/v0")


@register_encoder
def h_optimus_1() -> EncoderPreset:
    return EncoderPreset(
        name="h_optimus_1", dim=1536, trident_name="hoptimus1", preprocessing=_HOPTIMUS_TRANSFORM,
        output=_HOPTIMUS_OUTPUT,
        factory=timm_vit("vit_giant_patch14_reg4_dinov2", "pooled", **_HOPTIMUS_ARGS),
        magnification=20, patch_px=224, licence="CC-BY-NC-ND-4.0 (gated, academic research)",
        source="hf.co/bioptimus/H-optimus-1 model card (same architecture and transform as H-optimus-0)")


@register_encoder
def h0_mini() -> EncoderPreset:
    return EncoderPreset(
        name="h0_mini", dim=1536, preprocessing=_H0_MINI_TRANSFORM,
        output="concat(class token, mean of the patch tokens after the class + 4 register tokens), final norm",
        factory=timm_vit("vit_base_patch14_reg4_dinov2", "cls_mean_patch", **_H0_MINI_FACTORY_ARGS),
        magnification=20, patch_px=224, licence="CC-BY-NC-ND-4.0 (gated)", source=_H0_MINI_SOURCE)


@register_encoder
def h0_mini_cls() -> EncoderPreset:
    return EncoderPreset(
        name="h0_mini_cls", dim=768, trident_name="h0-mini", preprocessing=_H0_MINI_TRANSFORM,
        output="class token after the final norm (out[:, 0] of all tokens)",
        factory=timm_vit("vit_base_patch14_reg4_dinov2", "cls", **_H0_MINI_FACTORY_ARGS),
        magnification=20, patch_px=224, licence="CC-BY-NC-ND-4.0 (gated)",
        source=_H0_MINI_SOURCE + "; TRIDENT load.py h0-mini (return_type cls_token)")
