"""CONCH's vision towers, rebuilt so their parameter names match the published checkpoints.

Both versions compute ``ln_contrast(attn_pool_contrast(trunk tokens)[:, 0])``: the trunk's tokens after its
final norm, pooled by one learned query (CoCa's attentional pooler), then a LayerNorm; the contrastive
projection is never applied.

* ``conch_v1`` (512-d) = CONCH's ``encode_image(proj_contrast=False, normalize=False)``, the patch
  features SlideChat was trained on. Only ``visual.trunk.*``, ``visual.attn_pool_contrast.*`` and
  ``visual.ln_contrast.*`` are loaded; the text tower, caption pooler, ``proj_contrast`` and
  ``logit_scale`` are ignored.
* ``conch_v1_5`` (768-d) = TITAN's patch encoder (``titan.return_conch()``): an iBOT-style ViT-L/16 trunk
  with LayerScale, a bias-free pooler, loaded strictly from TITAN's ``conch_v1_5_pytorch_model.bin``.
"""

from __future__ import annotations

import logging
import math
from typing import Dict

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from slidechat.features.encoders.base import PatchEncoder, load_checked, require_checkpoint
from slidechat.features.encoders.registry import (CLIP_MEAN, CLIP_STD, BuildRequest, EncoderPreset,
                                                  Preprocessing, register_encoder)
from slidechat.model.checkpoint import load_state_dict_file
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

VISION_PREFIX = "visual."
USED_SUBMODULES = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
IGNORED_VISION = ("proj_contrast", "attn_pool_caption.", "ln_caption.", "head.")


class AttentionalPooler(nn.Module):
    """Cross-attention of learned queries over the trunk's tokens (CoCa-style).

    Parameter names follow CONCH: ``query`` (n_queries × d_model), ``attn`` (an
    ``nn.MultiheadAttention`` with kdim=vdim=context_dim, hence separate q/k/v projection weights),
    ``ln_q`` on the queries and ``ln_k`` on the tokens.
    """

    def __init__(self, d_model: int = 512, context_dim: int = 768, n_head: int = 8,
                 n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim,
                                          batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class AttentionalPoolerV15(nn.Module):
    """CONCH v1.5's pooler (TITAN ``conch_v1_5.py`` ``AttentionalPooler``): bias-free ``to_q``, ``to_kv``
    (keys and values stacked) and ``to_out``, ``ln_q`` on the queries, ``ln_k`` on the tokens, scaled
    dot-product attention over ``n_head`` heads."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.to_out(out.transpose(1, 2).reshape(b, out.shape[2], -1))


class ConchTower(nn.Module):
    """``ln_contrast(attn_pool_contrast(tokens(x))[:, 0])``: the part both CONCH versions share."""

    def __init__(self, trunk: nn.Module, pooler: nn.Module, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.tokens(x))[:, 0])


class ConchVisionTower(ConchTower):
    """CONCH v1: timm ViT-B/16 at 448 px (``pos_embed`` for the 28 x 28 grid), CoCa pooler 512 <- 768."""

    def __init__(self, img_size: int = 448, depth: int = 12) -> None:
        trunk = VisionTransformer(embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4, img_size=img_size,
                                  patch_size=16, num_classes=0, dynamic_img_size=True)
        super().__init__(trunk, AttentionalPooler(512, 768, 8, 1), 512)


def ibot_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """iBOT/DINO's ``interpolate_pos_encoding`` (TITAN ``conch_v1_5.py``): the stored square grid resized
    bicubically by the scale factor ``(grid + 0.1) / stored`` (the 0.1 guards the output size against
    float error, facebookresearch/dino#8); the class token's entry is kept. Not timm's resampling (which
    resizes to a size, with antialiasing), so the numbers differ and this one is the reference's."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):
        raise SlideChatError(f"conch_v1_5: position grid {side}x{side} interpolated to {tuple(grid.shape[-2:])}, "
                             f"not {grid_h}x{grid_w}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


class ConchV15Tower(ConchTower):
    """CONCH v1.5 (TITAN ``ConchConfig``): ViT-L/16 trunk (1024-d, 24 blocks, 16 heads, MLP ratio 4, qkv bias,
    LayerScale, LayerNorm eps 1e-6, class token, ``pos_embed`` for the 224-px 14 x 14 grid) read as
    ``forward_features`` with iBOT's position interpolation; pooler 768 <- 1024, 8 heads, 1 query."""

    def __init__(self, depth: int = 24) -> None:
        trunk = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=depth, num_heads=16,
                                  mlp_ratio=4, qkv_bias=True, init_values=1e-6, num_classes=0,
                                  dynamic_img_size=True)
        super().__init__(trunk, AttentionalPoolerV15(768, 1024, 8, 1), 768)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        p = t.patch_embed(x)  # (B, gh, gw, D): dynamic_img_size keeps the grid
        gh, gw = int(p.shape[1]), int(p.shape[2])
        p = p.flatten(1, 2)
        x = torch.cat([t.cls_token.expand(p.shape[0], -1, -1), p], dim=1)
        x = x + ibot_pos_embed(t.pos_embed, gh, gw)
        return t.norm(t.blocks(t.norm_pre(x)))


class ConchV1Encoder(PatchEncoder):
    def __init__(self, preset: EncoderPreset, request: BuildRequest) -> None:
        super().__init__(preset)
        path = require_checkpoint(request.checkpoint, self.name) if request.load_weights else None
        sd = load_state_dict_file(path) if path is not None else None
        if sd is not None and not any(k.startswith(VISION_PREFIX + "trunk.") for k in sd):
            raise SlideChatError("checkpoint has no CONCH vision weights (no 'visual.trunk.*' keys)",
                                 path, hint="pass the CONCH v1 pytorch_model.bin as --checkpoint")
        self.visual = ConchVisionTower(448, depth=request.depth or 12)
        if path is not None and sd is not None:
            self.load_conch_state_dict(sd, str(path))
            self.record_checkpoint(path)
        self.requires_grad_(False)

    def load_conch_state_dict(self, sd: Dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        """Load the vision part of a full CONCH (CoCa) state dict; refuse if it is missing."""
        vision = {}
        skipped = 0
        for k, v in sd.items():
            if not k.startswith(VISION_PREFIX):
                continue  # text.*, text_decoder.*, logit_scale
            sub = k[len(VISION_PREFIX):]
            if sub.startswith(USED_SUBMODULES):
                vision[sub] = v
            elif sub.startswith(IGNORED_VISION):
                skipped += 1
            else:
                logger.warning("conch_v1: unexpected vision key %s in %s", k, source)
        if not any(k.startswith("trunk.") for k in vision):
            raise SlideChatError("checkpoint has no CONCH vision weights (no 'visual.trunk.*' keys)",
                                 source, hint="pass the CONCH v1 pytorch_model.bin as --checkpoint")
        pe = vision.get("trunk.pos_embed")
        own = self.visual.trunk.pos_embed
        if pe is not None and pe.shape != own.shape:
            grid = self.visual.trunk.patch_embed.grid_size
            logger.info("conch_v1: resampling pos_embed %s -> %s", tuple(pe.shape), tuple(own.shape))
            vision["trunk.pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid),
                                                               num_prefix_tokens=1)
        load_checked(self.visual, vision, source, self.name)
        logger.info("conch_v1: loaded %d vision tensors from %s (%d unused vision tensors skipped)",
                    len(vision), source, skipped)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


@register_encoder
def conch_v1() -> EncoderPreset:
    return EncoderPreset(
        name="conch_v1", dim=512, aliases=("conch",), trident_name="conch_v1",
        preprocessing=Preprocessing(resize_to=448, crop=448, interpolation="bicubic", mean=CLIP_MEAN,
                                    std=CLIP_STD),
        output="ln_contrast(attn_pool_contrast(trunk.forward_features(x)))[:, 0], i.e. "
               "encode_image(proj_contrast=False, normalize=False)",
        factory=ConchV1Encoder, magnification=20, patch_px=224, licence="CC-BY-NC-ND-4.0 (gated)",
        source="github.com/mahmoodlab/CONCH conch/open_clip_custom (coca_model.py, transform.py), README "
               "(licence); hf.co/MahmoodLab/CONCH; 224 px at 20x are SlideChat's features (TRIDENT's README "
               "runs conch_v1 on 512 px at 20x, resized to 448 all the same)")


class ConchV15Encoder(PatchEncoder):
    """TITAN's CONCH v1.5, weights strictly by TITAN's names (``trunk.*``, ``attn_pool_contrast.*``,
    ``ln_contrast.*``: the file holds the vision tower alone)."""

    def __init__(self, preset: EncoderPreset, request: BuildRequest) -> None:
        super().__init__(preset)
        path = require_checkpoint(request.checkpoint, self.name) if request.load_weights else None
        self.visual = ConchV15Tower(depth=request.depth or 24)
        if path is not None:
            sd = load_state_dict_file(path)
            self._fit_pos_embed(sd, str(path))
            load_checked(self.visual, sd, str(path), self.name, allow_unexpected=False)
            self.record_checkpoint(path)
        self.requires_grad_(False)

    def _fit_pos_embed(self, sd: Dict[str, torch.Tensor], source: str) -> None:
        """TITAN's file holds the 14 x 14 grid the model is built with (its loader is strict); TRIDENT loads
        CONCH v1.5 files of another grid by resizing them to 14 x 14 first (bilinear, no antialias), and so
        do we."""
        pe, own = sd.get("trunk.pos_embed"), self.visual.trunk.pos_embed
        if pe is None or pe.ndim != 3 or pe.shape == own.shape:
            return  # absent or wrong rank: the strict key check names it
        logger.info("conch_v1_5: resizing pos_embed %s of %s to %s", tuple(pe.shape), source, tuple(own.shape))
        sd["trunk.pos_embed"] = resample_abs_pos_embed(pe, new_size=list(self.visual.trunk.patch_embed.grid_size),
                                                       num_prefix_tokens=1, interpolation="bilinear",
                                                       antialias=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


@register_encoder
def conch_v1_5() -> EncoderPreset:
    return EncoderPreset(
        name="conch_v1_5", dim=768, aliases=("conch_v15",), trident_name="conch_v15",
        preprocessing=Preprocessing(resize_to=448, crop=448, interpolation="bilinear"),
        output="ln_contrast(attn_pool_contrast(trunk tokens)[:, 0]), TITAN's conch_v1_5 forward "
               "(iBOT position interpolation, no projection)",
        factory=ConchV15Encoder, magnification=20, patch_px=512, licence="CC-BY-NC-ND-4.0 (gated)",
        source="hf.co/MahmoodLab/TITAN (conch_v1_5.py, configuration_titan.py ConchConfig, "
               "conch_v1_5_pytorch_model.bin); github.com/mahmoodlab/TITAN README (512 px at 20x, licence); "
               "TRIDENT model_zoo/conchv1_5 + load.py (Resize(448, bilinear), CenterCrop(448), ImageNet); "
               "CLAM models/builder.py")
