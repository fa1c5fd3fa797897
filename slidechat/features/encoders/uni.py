"""UNI and UNI2-h (Mahmood Lab): timm ViTs whose feature is the class token.

Facts from the model cards (hf.co/MahmoodLab/UNI, hf.co/MahmoodLab/UNI2-h, "Using timm" snippets) and
FACTS.md; both cards preprocess with ``Resize(224)`` (torchvision's default, bilinear), ``ToTensor`` and
ImageNet mean/std. Checked again for issue 15 against the cards' local-weights snippets
(``timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
dynamic_img_size=True)``; UNI2-h's ``timm_kwargs`` on ``vit_giant_patch14_224``), the UNI repository's
``get_encoder`` (``Resize(224)``, default interpolation) and TRIDENT's load.py ``uni_v1`` / ``uni_v2`` (same
arguments, plus a ``CenterCrop(224)`` that is a no-op on square patches): no change. Tiles: 256 px at 20x
(Mass-100K), resized to 224.
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from slidechat.features.encoders.registry import EncoderPreset, Preprocessing, register_encoder
from slidechat.features.encoders.vit import timm_vit

_CARD_TRANSFORM = Preprocessing(resize_to=224, crop=None, interpolation="bilinear")


@register_encoder
def uni() -> EncoderPreset:
    return EncoderPreset(
        name="uni", dim=1024, trident_name="uni_v1", preprocessing=_CARD_TRANSFORM,
        output="class token after the final norm (timm global_pool='token')",
        factory=timm_vit("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                         num_classes=0, dynamic_img_size=True),
        magnification=20, patch_px=256, licence="CC-BY-NC-ND-4.0 (gated)",
        source="hf.co/MahmoodLab/UNI model card (timm.create_model('vit_large_patch16_224', ...))")


@register_encoder
def uni2_h() -> EncoderPreset:
    return EncoderPreset(
        name="uni2_h", dim=1536, trident_name="uni_v2", preprocessing=_CARD_TRANSFORM,
        output="class token after the final norm (timm global_pool='token'; 8 register tokens)",
        factory=timm_vit("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                         init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                         no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                         dynamic_img_size=True),
        magnification=20, patch_px=256, licence="CC-BY-NC-ND-4.0 (gated)",
        source="hf.co/MahmoodLab/UNI2-h model card (timm_kwargs of the 'Using timm' snippet)")
