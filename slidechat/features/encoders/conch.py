"""``conch_v1``: CONCH v1's vision tower, rebuilt so its parameter names match CONCH checkpoints.

Output = ``ln_contrast(attn_pool_contrast(trunk.forward_features(img))[:, 0])`` (512-d), i.e. CONCH's
``encode_image(proj_contrast=False, normalize=False)`` — the patch features SlideChat was trained on.
Only ``visual.trunk.*``, ``visual.attn_pool_contrast.*`` and ``visual.ln_contrast.*`` are loaded; the
text tower, caption pooler, ``proj_contrast`` and ``logit_scale`` are ignored.
"""

from __future__ import annotations

import logging
from typing import Dict

import torch
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


class ConchVisionTower(nn.Module):
    def __init__(self, img_size: int = 448, depth: int = 12) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4,
                                       img_size=img_size, patch_size=16, num_classes=0,
                                       dynamic_img_size=True)
        self.attn_pool_contrast = AttentionalPooler(512, 768, 8, 1)
        self.ln_contrast = nn.LayerNorm(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


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
            from timm.layers import resample_abs_pos_embed

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
        source="github.com/mahmoodlab/CONCH conch/open_clip_custom (coca_model.py, transform.py); "
               "hf.co/MahmoodLab/CONCH; SlideChat's features: 224 px at 20x")
