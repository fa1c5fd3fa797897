"""MUSK (lilab-stanford, Nature 2025): the image side of its BEiT-3 multiway transformer, rebuilt so the
released checkpoint loads by its own key names.

Facts, each read from the source named:
* architecture: github.com/lilab-stanford/MUSK ``musk/modeling.py`` ``musk_large_patch16_384`` =
  torchscale's ``BEiT3`` on ``EncoderConfig(img_size=384, patch_size=16, multiway=True,
  encoder_embed_dim=1024, encoder_attention_heads=16, encoder_ffn_embed_dim=4096, encoder_layers=24,
  layernorm_embedding=False, normalize_output=True, no_output_layer=True, vocab_size=64010)``; the repo's
  ``musk/torchscale`` is torchscale's code with relative imports. torchscale's defaults then give a pre-LN
  layer with sub-LN (``inner_attn_ln`` on the attention output before ``out_proj``, ``ffn_layernorm``
  between the activation and ``fc2``), exact GELU (``F.gelu``), LayerNorm eps 1e-5, queries scaled by
  head_dim^-0.5, no embedding scale, no relative position bias, and a final ``encoder.layer_norm``
  (torchscale ``architecture/encoder.py``, ``component/multihead_attention.py``,
  ``component/feedforward_network.py``, ``architecture/config.py``);
* multiway: an image alone runs with split position -1, so every multiway module uses its branch ``A``
  (``component/multiway_network.py``); branch ``B`` and ``text_embed`` are the text side;
* positions: ``VisionEmbedding`` prepends a class token to the 24 x 24 patch tokens; the learned position
  table has ``num_patches + 1 + 2`` rows and is read from row 2 on, "consistent with fairseq"
  (``model/BEiT3.py``, ``component/embedding.py`` ``PositionalEmbedding``);
* output: the README's image encoding for "linear probe classification, MIL" is ``model(image,
  with_head=False, out_norm=False, ms_aug=True, return_global=True)[0]``; ``ms_aug`` is ``MultiScaleForward``
  (``musk/utils.py``) with scales [1, 2]: the class token (after the final norm) of the image, concatenated
  with the mean class token of the four 384 px quarters of the image upsampled to 768 px
  (``F.interpolate(mode="bicubic")``, align_corners False, no antialias) = 2048-d: ``musk_ms``.
  The class token alone, 1024-d, is ``musk``: TRIDENT's ``musk`` (``load.py`` ``MuskInferenceEncoder``,
  ``inference_aug=False``), same name and features, so TRIDENT-layout folders mean the same in both tools;
* preprocessing (README): ``Resize(384, bicubic, antialias)``, ``CenterCrop(384)``, ``ToTensor``,
  ``Normalize(IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)`` = 0.5 / 0.5;
* weights: hf.co/xiangjx/musk ``model.safetensors``, the whole vision-language model by ``MUSK``'s names;
* licence (README): CC-BY-NC-ND 4.0, non-commercial academic research only. Neither the README nor the
  code states a magnification or tile size for patch features, so the preset names none.
"""

from __future__ import annotations

import logging
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from slidechat.features.encoders.base import PatchEncoder, load_checked, require_checkpoint
from slidechat.features.encoders.registry import (BuildRequest, EncoderPreset, Factory, Preprocessing,
                                                  register_encoder)
from slidechat.model.checkpoint import load_state_dict_file

logger = logging.getLogger(__name__)

EMBED_DIM, HEADS, FFN_DIM, LAYERS, IMG_SIZE, PATCH = 1024, 16, 4096, 24, 384, 16  # mlp_ratio 4
LN_EPS = 1e-5
#: the upsampling factors of MultiScaleForward (musk/utils.py default ``scales=[1, 2]``)
SCALES = (1, 2)
#: keys of the released model that images never use: the text side (multiway branch B, the text
#: embedding), the zero-shot heads, the contrastive temperature and the masked-modelling token
TEXT_SIDE = ("beit3.text_embed.", "language_head.", "vision_head.", "logit_scale", "beit3.vision_embed.mask_token")


def _image_branch(module: nn.Module) -> nn.ModuleDict:
    """A BEiT-3 multiway module reduced to its image branch, under the name ``A`` the checkpoint uses."""
    return nn.ModuleDict({"A": module})


def _is_text_side(key: str) -> bool:
    return key.startswith(TEXT_SIDE) or ".B." in key


class MultiwayAttention(nn.Module):
    """torchscale ``MultiheadAttention`` (self-attention, sub-LN) on the image branch."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scaling = heads, (dim // heads) ** -0.5
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, _image_branch(nn.Linear(dim, dim)))
        self.inner_attn_ln = _image_branch(nn.LayerNorm(dim, eps=LN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q_proj["A"](x) * self.scaling
        k, v = self.k_proj["A"](x), self.v_proj["A"](x)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        # torchscale's softmax(q k^T) v with q already scaled, through PyTorch's fused kernels (on a GPU
        # the 577 x 577 weights of every head are then never held in memory)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(b, n, d)
        return self.out_proj["A"](self.inner_attn_ln["A"](out))


class FeedForward(nn.Module):
    """torchscale ``FeedForwardNetwork`` with sub-LN: fc1, GELU (in float32), ffn_layernorm, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.ffn_layernorm(F.gelu(h.float()).type_as(h)))


class EncoderLayer(nn.Module):
    """torchscale ``EncoderLayer`` with ``encoder_normalize_before`` (pre-LN), no deepnorm scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = MultiwayAttention(EMBED_DIM, HEADS)
        self.self_attn_layer_norm = _image_branch(nn.LayerNorm(EMBED_DIM, eps=LN_EPS))
        self.ffn = _image_branch(FeedForward(EMBED_DIM, FFN_DIM))
        self.final_layer_norm = _image_branch(nn.LayerNorm(EMBED_DIM, eps=LN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm["A"](x))
        return x + self.ffn["A"](self.final_layer_norm["A"](x))


class VisionEmbedding(nn.Module):
    """Patch projection with a class token in front (torchscale ``VisionEmbedding``, no mask token used)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, EMBED_DIM, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.num_patches = (IMG_SIZE // PATCH) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)


class BEiT3Encoder(nn.Module):
    """The ``beit3.encoder`` of an image-only input: positions, layers, final norm."""

    def __init__(self, num_tokens: int, layers: int) -> None:
        super().__init__()
        # row 0 and 1 are never read (positions start at 2, as in fairseq)
        self.embed_positions = _image_branch(nn.Embedding(num_tokens + 2, EMBED_DIM))
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(layers))
        self.layer_norm = _image_branch(nn.LayerNorm(EMBED_DIM, eps=LN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.embed_positions["A"].weight[2:2 + x.shape[1]].unsqueeze(0)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm["A"](x)


class BEiT3Vision(nn.Module):
    """``beit3.vision_embed`` + ``beit3.encoder``, named as in the released checkpoint."""

    def __init__(self, layers: int = LAYERS) -> None:
        super().__init__()
        self.vision_embed = VisionEmbedding()
        self.encoder = BEiT3Encoder(self.vision_embed.num_patches + 1, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 384, 384) -> the class token after the final norm, (B, 1024)."""
        if tuple(x.shape[-2:]) != (IMG_SIZE, IMG_SIZE):
            raise ValueError(f"MUSK takes {IMG_SIZE} x {IMG_SIZE} inputs, got {tuple(x.shape[-2:])}")
        return self.encoder(self.vision_embed(x))[:, 0]


def multiscale_class_tokens(tower: nn.Module, x: torch.Tensor, scales: Tuple[int, ...] = SCALES) -> torch.Tensor:
    """MUSK's ``ms_aug``: per scale s, the image upsampled s-fold (bicubic), cut into s x s tiles of the input
    size, each encoded; the class token at scale 1 next to the mean over the tiles of each larger scale."""
    b, _, size, _ = x.shape
    outs = []
    for s in scales:
        up = F.interpolate(x.float(), size=size * s, mode="bicubic").to(x.dtype)
        # tiles in (row, column) order, each a batch of b images
        tiles = [up[..., r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(s) for c in range(s)]
        outs.append(torch.stack([tower(t) for t in tiles]).mean(0))
    return torch.cat(outs, dim=-1)


class MuskEncoder(PatchEncoder):
    """MUSK's image features: the class token (``musk``) or its multi-scale form (``musk_ms``)."""

    def __init__(self, preset: EncoderPreset, request: BuildRequest, multiscale: bool) -> None:
        super().__init__(preset)
        self.multiscale = multiscale
        path = require_checkpoint(request.checkpoint, preset.name) if request.load_weights else None
        self.beit3 = BEiT3Vision(layers=request.depth or LAYERS)
        if path is not None:
            load_checked(self.beit3, self._image_weights(load_state_dict_file(path), str(path)), str(path),
                         preset.name, allow_unexpected=False)
            self.record_checkpoint(path)
        self.check_width(EMBED_DIM * (len(SCALES) if multiscale else 1))
        self.requires_grad_(False)

    @staticmethod
    def _image_weights(sd: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
        """The checkpoint's ``beit3.*`` image-side weights, without the prefix; the text side is dropped by
        name (logged), and anything else stays in for the strict check to refuse."""
        kept, dropped = {}, 0
        for key, value in sd.items():
            if _is_text_side(key):
                dropped += 1
            else:
                kept[key[len("beit3."):] if key.startswith("beit3.") else key] = value
        logger.info("MUSK: %d image-side tensors from %s, %d text-side ones left unused", len(kept), source, dropped)
        return kept

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return multiscale_class_tokens(self.beit3, x) if self.multiscale else self.beit3(x)


_MUSK_TRANSFORM = Preprocessing(resize_to=IMG_SIZE, crop=IMG_SIZE, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                                std=(0.5, 0.5, 0.5))
_SOURCE = ("github.com/lilab-stanford/MUSK (musk/modeling.py, musk/utils.py, README); torchscale 0.3.0 BEiT3; "
           "TRIDENT load.py MuskInferenceEncoder (musk)")
_LICENCE = "CC-BY-NC-ND-4.0 (gated, non-commercial)"


def _factory(multiscale: bool) -> Factory:
    def build(preset: EncoderPreset, request: BuildRequest) -> PatchEncoder:
        return MuskEncoder(preset, request, multiscale)
    return build


@register_encoder
def musk() -> EncoderPreset:
    return EncoderPreset(
        name="musk", dim=EMBED_DIM, trident_name="musk", preprocessing=_MUSK_TRANSFORM,
        output="class token after the final norm, no head (ms_aug=False, TRIDENT's default)",
        factory=_factory(False), licence=_LICENCE, source=_SOURCE)


@register_encoder
def musk_ms() -> EncoderPreset:
    return EncoderPreset(
        name="musk_ms", dim=EMBED_DIM * len(SCALES), preprocessing=_MUSK_TRANSFORM,
        output="concat(class token at 384 px, mean class token of the 4 quarters of the 2x bicubic upsampling), "
               "final norm, no head: the README's ms_aug=True for linear probes and MIL",
        factory=_factory(True), licence=_LICENCE, source=_SOURCE)
