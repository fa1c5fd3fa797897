"""Virchow and Virchow2 (Paige): timm ViT-H/14 with SwiGLU MLPs and LayerScale; the feature is the class
token concatenated with the mean of the patch tokens (2 x 1280 = 2560-d).

Facts, each read from the source named:
* architecture: the hub ``config.json`` of hf.co/paige-ai/Virchow and hf.co/paige-ai/Virchow2
  (``architecture: vit_huge_patch14_224``, ``model_args``: img_size 224, init_values 1e-5, num_classes 0,
  mlp_ratio 5.3375, global_pool "", dynamic_img_size true, and for Virchow2 reg_tokens 4) plus the cards'
  ``timm.create_model(..., mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)``;
* preprocessing: the cards' ``create_transform(**resolve_data_config(model.pretrained_cfg))`` with the hub
  ``pretrained_cfg`` (input_size 224, interpolation bicubic, crop_pct 1.0, crop_mode center, ImageNet
  mean/std), i.e. ``Resize(floor(224 / 1.0) = 224, bicubic)`` + ``CenterCrop(224)``;
* output: Virchow's card ``torch.cat([output[:, 0], output[:, 1:].mean(1)], -1)``, Virchow2's card
  ``output[:, 5:]`` ("tokens 1-4 are register tokens"): the patch tokens after timm's
  ``num_prefix_tokens`` (1, resp. 1 + 4), which is what the ``cls_mean_patch`` rule takes;
* 224 px tiles at 20x (0.5 um/px; Virchow2 was trained on mixed 5-40x, 20x is the cards' default);
* licences: Virchow Apache-2.0 (gated, with additional terms), Virchow2 CC-BY-NC-ND-4.0 (gated);
* TRIDENT's names ``virchow`` / ``virchow2`` (github.com/mahmoodlab/TRIDENT
  trident/patch_encoder_models/load.py: same arguments, same 2560-d class + mean-patch feature).
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from slidechat.features.encoders.registry import EncoderPreset, Preprocessing, register_encoder
from slidechat.features.encoders.vit import timm_vit

#: timm's eval transform for the hub pretrained_cfg (bicubic, crop_pct 1.0): Resize(224) + CenterCrop(224)
_CARD_TRANSFORM = Preprocessing(resize_to=224, crop=224, interpolation="bicubic")
_ARGS = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
             dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
_OUTPUT = "concat(class token, mean of the patch tokens after the class/register tokens), final norm"


@register_encoder
def virchow() -> EncoderPreset:
    return EncoderPreset(
        name="virchow", dim=2560, trident_name="virchow", preprocessing=_CARD_TRANSFORM, output=_OUTPUT,
        factory=timm_vit("vit_huge_patch14_224", "cls_mean_patch", **_ARGS),
        magnification=20, patch_px=224, licence="Apache-2.0 (gated, additional terms)",
        source="hf.co/paige-ai/Virchow model card + hub config.json (vit_huge_patch14_224, pretrained_cfg)")


@register_encoder
def virchow2() -> EncoderPreset:
    return EncoderPreset(
        name="virchow2", dim=2560, trident_name="virchow2", preprocessing=_CARD_TRANSFORM,
        output=_OUTPUT + " (4 register tokens skipped)",
        factory=timm_vit("vit_huge_patch14_224", "cls_mean_patch", reg_tokens=4, **_ARGS),
        magnification=20, patch_px=224, licence="CC-BY-NC-ND-4.0 (gated)",
        source="hf.co/paige-ai/Virchow2 model card + hub config.json (vit_huge_patch14_224, reg_tokens 4)")
