"""Phikon and Phikon-v2 (Owkin): transformers ViTs whose feature is the class token of ``last_hidden_state``.

Facts, per preset:

* ``phikon`` — hf.co/owkin/phikon: ``config.json`` (architectures ``ViTModel``, hidden 768, 12 layers, 12
  heads, intermediate 3072, patch 16, image 224, ``layer_norm_eps`` 1e-12, ``qkv_bias``, GELU); the card
  loads ``ViTModel.from_pretrained("owkin/phikon", add_pooling_layer=False)`` and takes
  ``last_hidden_state[:, 0, :]`` (768-d). ``preprocessor_config.json``: ``{"do_normalize": true,
  "do_resize": true, "image_mean": ImageNet, "image_std": ImageNet, "size": 224}`` with no processor type,
  so ``AutoImageProcessor`` gives ``ViTImageProcessor`` with its defaults: resize to exactly 224 x 224,
  bilinear, rescale 1/255, no crop. Tiles: 224 px at 20x (0.5 um/px; TRIDENT README ``--patch_size 224
  --mag 20``).
* ``phikon_v2`` — hf.co/owkin/phikon-v2 (arXiv 2409.09173): ``Dinov2Model`` ViT-L/16, hidden 1024, 24
  layers, 16 heads, MLP ratio 4 (GELU, no SwiGLU), no registers, LayerScale, ``layer_norm_eps`` 1e-6;
  ``model.safetensors`` is 1.21 GB (float32, ~303 M parameters); card: ``AutoModel`` +
  ``AutoImageProcessor`` (``BitImageProcessor``), feature ``last_hidden_state[:, 0, :]`` (1024-d).
  The hub's ``config.json`` / ``preprocessor_config.json`` themselves could not be read offline here:
  the architecture is the paper's ViT-L/16 (and the weights file must match it key for key and shape
  for shape); ``image_size`` is taken from the file's position-embedding grid; the preprocessing
  ``Resize(224)`` (shorter side) + ``CenterCrop(224)`` + ImageNet mean/std is what TRIDENT
  (``trident/patch_encoder_models/load.py``, ``PhikonV2InferenceEncoder``) and PathoROB
  (``Phikonv2ModelWrapper.get_preprocess``) both use for it; the resampling filter is
  ``BitImageProcessor``'s (bicubic) and only matters for patches that are not already 224 px, Phikon-v2's
  own tile size (224 px at 20x, the paper's PANCAN-XL tiles).

Both weight files were written by transformers 4.x from the base model (no ``vit.``/``dinov2.``
prefix; one is stripped if every key carries it, as transformers does) and are renamed to the installed
transformers' module names by :mod:`slidechat.features.encoders.hf_vision`.
"""

from __future__ import annotations

from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from slidechat.features.encoders.hf_vision import DINOV2_HUB_NAMES, VIT_HUB_NAMES, HFVisionSpec, hf_vision
from slidechat.features.encoders.registry import EncoderPreset, Preprocessing, register_encoder

_LICENCE = "Owkin licence (card: 'other'; read it)"

PHIKON_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-12, qkv_bias=True)

PHIKON_V2_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6, qkv_bias=True,
                        layerscale_value=1e-5, use_swiglu_ffn=False, drop_path_rate=0.0)


@register_encoder
def phikon() -> EncoderPreset:
    return EncoderPreset(
        name="phikon", dim=768, trident_name="phikon",
        preprocessing=Preprocessing(resize_to=224, crop=None, interpolation="bilinear"),
        output="class token of last_hidden_state (ViTModel, add_pooling_layer=False)",
        factory=hf_vision(HFVisionSpec(ViTConfig, ViTModel, PHIKON_CONFIG,
                                       model_kwargs={"add_pooling_layer": False}, hub_names=VIT_HUB_NAMES,
                                       unused=("pooler.",))),
        magnification=20, patch_px=224, licence=_LICENCE,
        source="hf.co/owkin/phikon config.json + preprocessor_config.json + model card; TRIDENT README")


@register_encoder
def phikon_v2() -> EncoderPreset:
    return EncoderPreset(
        name="phikon_v2", dim=1024, trident_name="phikon_v2",
        preprocessing=Preprocessing(resize_to=224, crop=224, interpolation="bicubic"),
        output="class token of last_hidden_state (Dinov2Model)",
        factory=hf_vision(HFVisionSpec(Dinov2Config, Dinov2Model, PHIKON_V2_CONFIG, hub_names=DINOV2_HUB_NAMES,
                                       grid_from_checkpoint=True)),
        magnification=20, patch_px=224, licence=_LICENCE,
        source="hf.co/owkin/phikon-v2 model card + file listing; arXiv 2409.09173; TRIDENT load.py; "
               "PathoROB Phikonv2ModelWrapper")
