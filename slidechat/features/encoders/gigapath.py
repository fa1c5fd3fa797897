"""Prov-GigaPath's tile encoder (Microsoft / Providence): a DINOv2 ViT-g with 16 px patches; the feature
is the 1536-d class token after the final norm.

Facts, each read from the source named:
* architecture: the hub ``config.json`` of hf.co/prov-gigapath/prov-gigapath (``architecture:
  vit_giant_patch14_dinov2``, ``global_pool: token``, ``model_args``: img_size 224, in_chans 3,
  patch_size 16, embed_dim 1536, depth 40, num_heads 24, init_values 1e-5, mlp_ratio 5.33334,
  num_classes 0). The name says patch14 but ``patch_size`` 16 overrides it; timm's
  ``vit_giant_patch14_dinov2`` keeps its SwiGLU MLP (``SwiGLUPacked`` + SiLU) since model_args do not
  change it (TRIDENT load.py builds it the same way and loads the real weights strictly);
* preprocessing: the card's ``Resize(256, interpolation=BICUBIC)`` + ``CenterCrop(224)`` + ``ToTensor`` +
  ImageNet ``Normalize``;
* 256 px tiles at 0.5 um/px (20x) (Xu et al., Nature 2024; github.com/prov-gigapath/prov-gigapath);
* licence: Apache-2.0 tag with the card's terms (research only; deployed use out of scope), gated;
* TRIDENT's name ``gigapath``.
"""

from __future__ import annotations

from slidechat.features.encoders.registry import EncoderPreset, Preprocessing, register_encoder
from slidechat.features.encoders.vit import timm_vit


@register_encoder
def gigapath() -> EncoderPreset:
    return EncoderPreset(
        name="gigapath", dim=1536, trident_name="gigapath",
        preprocessing=Preprocessing(resize_to=256, crop=224, interpolation="bicubic"),
        output="class token after the final norm (timm global_pool='token')",
        factory=timm_vit("vit_giant_patch14_dinov2", "pooled", img_size=224, in_chans=3, patch_size=16,
                         embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
                         num_classes=0, global_pool="token"),
        magnification=20, patch_px=256, licence="Apache-2.0 + card terms (research only, gated)",
        source="hf.co/prov-gigapath/prov-gigapath model card + hub config.json (tile encoder)")
