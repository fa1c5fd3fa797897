"""LongNet-style slide encoder: dilated attention over up to ~10^5 patch tokens in memory linear in N.

Parameter names and numerics follow the torchscale LongNet used by the released SlideChat (sub-LN, pre-LN,
float32 GELU, final LayerNorm), so released checkpoints load under the ``LongNet_encoder.`` prefix.
``compat="slidechat_v1"`` reproduces the released model's layout bug (every patch a length-1 sequence);
the default is real slide-level attention.

Sequence edge (``SlideEncoderConfig.padding``). Each dilated branch cuts the sequence into segments of
``min(segment_length, N)`` positions and keeps every ``ratio``-th one, so N is padded up to a multiple of
the segment and each segment to a multiple of the ratio:

* ``"torchscale"`` (default): q/k/v are zero-padded *after* the projections and attention runs with no
  mask, so every padded key enters the softmax with score 0 and value 0 -- exactly torchscale's
  ``dilated_attention.py`` (Prov-GigaPath's and SlideChat's copies). Weights trained there, and weights
  trained here to be used there, need this mode. Slides of different lengths in one batch are encoded
  one by one at their own length, which is what torchscale computes for each slide alone (its fused
  path ignores ``key_padding_mask``), so batching never changes a slide's tokens. Each segment length
  must be a multiple of its ratio (torchscale shifts later segments otherwise; refused, not imitated).
* ``"masked"``: padded keys are masked out of the softmax (the rule of slidechat releases before this
  option existed): outputs do not depend on how much padding a length needs. About 3-5 % different
  outputs from ``"torchscale"`` whenever N needs padding; identical when it needs none.

The two modes are different functions of the same weights: use the one the weights were trained with.
``compat="slidechat_v1"`` is unaffected (a length-1 sequence attends to its own key only, in both modes).
Exported model folders written before the option existed carry no ``padding`` key and load as
:data:`LEGACY_PADDING` (``"masked"``, what they were trained with); see :func:`saved_encoder_dict`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

COMPAT_MODES = (None, "slidechat_v1")
#: how padded positions at the sequence edge enter attention (see the module doc)
PADDING_MODES = ("torchscale", "masked")
DEFAULT_PADDING = "torchscale"
#: ``padding`` of a saved encoder config without the key (written before the option existed)
LEGACY_PADDING = "masked"

# lse given to (position, head) pairs a branch does not cover: exp() of it relative to any real lse is 0,
# and it is finite, so a pair no branch covers gives 0 instead of NaN.
_UNCOVERED_LSE = -1e30


@dataclass
class SlideEncoderConfig:
    embed_dim: int = 512
    ffn_dim: int = 1024
    num_heads: int = 8
    num_layers: int = 2
    segment_lengths: Tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    dilated_ratios: Tuple[int, ...] = (1, 2, 4, 8, 16)
    dropout: float = 0.1
    drop_path: float = 0.1
    compat: Optional[str] = None
    coord_pos_embed: bool = False
    activation_dropout: float = 0.0  # torchscale default (dropout between GELU and ffn_layernorm)
    layernorm_eps: float = 1e-5
    coord_num_freqs: int = 32
    padding: str = DEFAULT_PADDING

    def __post_init__(self) -> None:
        self.segment_lengths = tuple(int(s) for s in self.segment_lengths)
        self.dilated_ratios = tuple(int(r) for r in self.dilated_ratios)
        if len(self.segment_lengths) != len(self.dilated_ratios) or not self.segment_lengths:
            raise ValueError("segment_lengths and dilated_ratios must be non-empty and of equal length, got "
                             f"{self.segment_lengths} and {self.dilated_ratios}")
        if any(s < 1 for s in self.segment_lengths) or any(r < 1 for r in self.dilated_ratios):
            raise ValueError("segment lengths and dilated ratios must be >= 1")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"unknown compat mode {self.compat!r}; known: {COMPAT_MODES}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"unknown padding mode {self.padding!r}; known: {PADDING_MODES}")
        odd = [(s, r) for s, r in zip(self.segment_lengths, self.dilated_ratios) if s % r]
        if self.padding == "torchscale" and odd:
            # torchscale keeps a segment's ratio padding when it scatters back, which shifts every later
            # segment: its function is not the documented rule, and we do not reproduce the shift
            raise ValueError(f"padding='torchscale' needs each segment length to be a multiple of its "
                             f"dilated ratio (torchscale misplaces positions otherwise); got {odd} "
                             "(segment, ratio); use multiples or padding='masked'")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["segment_lengths"] = list(self.segment_lengths)
        d["dilated_ratios"] = list(self.dilated_ratios)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SlideEncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SlideEncoderConfig fields: {sorted(unknown)}")
        return cls(**d)


def saved_encoder_dict(d: Mapping[str, Any]) -> Dict[str, Any]:
    """An encoder config as stored in an exported folder, with ``padding`` made explicit.

    Folders written before the option existed were trained with the masked rule, so a missing key means
    :data:`LEGACY_PADDING`, not today's default (a training config without the key gets the default).
    """
    out = dict(d)
    out.setdefault("padding", LEGACY_PADDING)
    return out


# --------------------------------------------------------------------------------------------------------
# attention kernels


def _attention_manual(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                      max_elems: int = 1 << 26) -> Tuple[Tensor, Tensor]:
    """Reference softmax attention returning (out, lse), chunked over the batch so scores stay bounded."""
    bsz, heads, lq, _ = q.shape
    scale = q.shape[-1] ** -0.5
    chunk = max(1, max_elems // max(1, heads * lq * k.shape[-2]))
    outs, lses = [], []
    for s in range(0, bsz, chunk):
        scores = torch.matmul(q[s:s + chunk].float(), k[s:s + chunk].float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias[s:s + chunk].float()
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.matmul(probs, v[s:s + chunk].float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


_CUDA_CHECKED: Dict[Tuple[str, torch.dtype], bool] = {}


def _cuda_efficient_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """One-time check that the private CUDA kernel exists and agrees with plain math on a small problem."""
    key = (str(device), dtype)
    if key not in _CUDA_CHECKED:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(2, 2, 37, 16, device=device, dtype=dtype, generator=g) for _ in range(3))
            bias = torch.zeros(2, 2, 1, 37, device=device, dtype=dtype)
            bias[1, :, :, 30:] = torch.finfo(dtype).min / 2
            o1, l1 = attention_with_lse(q, k, v, bias, impl="cuda_efficient")
            o2, l2 = _attention_manual(q, k, v, bias)
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            ok = bool(torch.allclose(o1.float(), o2.float(), atol=tol, rtol=tol)
                      and torch.allclose(l1, l2, atol=tol, rtol=tol))
        except Exception as exc:  # noqa: BLE001 - any failure means: use the math path
            logger.debug("cuda efficient attention check failed: %s", exc)
        if not ok:
            logger.warning("fused CUDA attention with log-sum-exp unavailable for %s; using the math path", dtype)
        _CUDA_CHECKED[key] = ok
    return _CUDA_CHECKED[key]


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                       impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """Softmax attention [B,H,L,d] -> (out [B,H,L,d], logsumexp [B,H,L] float32).

    Uses the fused kernels behind ``F.scaled_dot_product_attention`` that also return the log-sum-exp the
    branch mixing needs (the public SDPA call does not return it); falls back to chunked plain math.
    ``bias`` is an additive float mask broadcastable to [B,H,L,L].
    """
    if impl == "auto":
        if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            impl = "cpu_flash"
        elif q.device.type == "cuda" and _cuda_efficient_ok(q.device, q.dtype):
            impl = "cuda_efficient"
        else:
            impl = "math"
    if impl == "cpu_flash":
        mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask)
        return out, lse.float()
    if impl == "cuda_efficient":
        try:
            mask = None
            if bias is not None:
                # the kernel wants the bias' last dim 16-aligned in memory; rows broadcast (stride 0)
                b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
                pad = (-lk) % 16
                full = torch.zeros(b, h, 1, lk + pad, dtype=q.dtype, device=q.device)
                full[..., :lk] = bias.to(q.dtype).expand(b, h, 1, lk)
                mask = full[..., :lk].expand(b, h, lq, lk)
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, False)
            out, lse = res[0], res[1]
            return out, lse[..., : q.shape[2]].float()
        except RuntimeError as exc:  # unsupported dtype/shape on this GPU: plain math is still exact
            logger.debug("efficient attention unavailable (%s); using math path", exc)
            impl = "math"
    if impl == "math":
        return _attention_manual(q, k, v, bias)
    raise ValueError(f"unknown attention impl {impl!r}")


# --------------------------------------------------------------------------------------------------------
# dilated attention


def _head_groups(num_heads: int, ratio: int, device: torch.device) -> Tensor:
    """Offset of each head inside a dilated block: heads are split into ``ratio`` groups (heads padded up
    to a multiple of ratio, as torchscale does), group g keeps positions p with p % ratio == g."""
    per_group = math.ceil(num_heads / ratio)
    return torch.arange(num_heads, device=device) // per_group


class _Branch:
    """Index bookkeeping of one (segment_length, ratio) branch for a sequence of length n."""

    def __init__(self, n: int, segment_length: int, ratio: int, num_heads: int, device: torch.device):
        self.n = n
        self.sl = min(segment_length, n)  # a segment longer than the sequence is the whole sequence
        self.ratio = ratio
        self.nseg = math.ceil(n / self.sl)
        self.sparse_len = math.ceil(self.sl / ratio)
        self.pad_n = self.nseg * self.sl - n
        self.pad_r = self.sparse_len * ratio - self.sl
        self.groups = _head_groups(num_heads, ratio, device)
        self.heads = torch.arange(num_heads, device=device)

    def sparse(self, t: Tensor) -> Tensor:
        """[B,N,H,*] -> [B*nseg, H, sparse_len, *] keeping for head h the positions of its group."""
        b, _, h = t.shape[:3]
        tail = t.shape[3:]
        if self.pad_n:
            t = _pad_seq(t, self.pad_n)
        t = t.reshape(b, self.nseg, self.sl, h, *tail)
        if self.pad_r:
            t = _pad_seq(t, self.pad_r, dim=2)
        t = t.reshape(b, self.nseg, self.sparse_len, self.ratio, h, *tail)
        t = t[:, :, :, self.groups, self.heads]  # [B, nseg, L, H, *]
        t = t.transpose(2, 3)  # [B, nseg, H, L, *]
        return t.reshape(b * self.nseg, h, self.sparse_len, *tail)

    def dense(self, t: Tensor, batch: int, fill: float) -> Tensor:
        """Inverse of ``sparse``: [B*nseg, H, L, *] -> [B, N, H, *], ``fill`` where a head skips a position."""
        h = t.shape[1]
        tail = t.shape[3:]
        t = t.reshape(batch, self.nseg, h, self.sparse_len, *tail).transpose(2, 3)
        full = t.new_full((batch, self.nseg, self.sparse_len, self.ratio, h, *tail), fill)
        full[:, :, :, self.groups, self.heads] = t
        full = full.reshape(batch, self.nseg, self.sparse_len * self.ratio, h, *tail)[:, :, : self.sl]
        return full.reshape(batch, self.nseg * self.sl, h, *tail)[:, : self.n]


def _pad_seq(t: Tensor, pad: int, dim: int = 1, value: float = 0.0) -> Tensor:
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                      dilated_ratios: Sequence[int], padding_mask: Optional[Tensor] = None,
                      impl: str = "auto", padding: str = DEFAULT_PADDING) -> Tensor:
    """LongNet dilated attention. q, k, v: [B, N, H, d]; padding_mask [B, N] (True = padding).

    Each branch attends inside sparse segments; branches are mixed per position and head by a softmax over
    their log-sum-exps, accumulated online so only one branch's dense output is alive at a time. As in
    torchscale, the mixing weights carry no gradient (fused kernels do not differentiate the lse), so the
    fused and the plain-math paths train identically.

    ``padding="torchscale"``: the zeros that pad a segment (or the sequence) are keys with score 0 and
    value 0, unmasked, as in torchscale; a ``padding_mask`` with padding is refused (encode such rows one
    by one, as :class:`LongNetEncoder` does). ``padding="masked"``: edge padding and ``padding_mask``
    positions are masked out of the softmax.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"unknown padding mode {padding!r}; known: {PADDING_MODES}")
    if padding == "torchscale" and padding_mask is not None and bool(padding_mask.any()):
        raise ValueError("padding='torchscale' has no key mask: encode rows of different lengths one by "
                         "one (LongNetEncoder does), or use padding='masked'")
    masked = padding == "masked"
    b, n, h, _ = q.shape
    acc: Optional[Tensor] = None
    run_max = den = None
    for sl, ratio in zip(segment_lengths, dilated_ratios):
        br = _Branch(n, sl, ratio, h, q.device)
        qs, ks, vs = br.sparse(q), br.sparse(k), br.sparse(v)
        bias = None
        if masked and (padding_mask is not None or br.pad_n or br.pad_r):
            pm = padding_mask if padding_mask is not None else torch.zeros(b, n, dtype=torch.bool, device=q.device)
            pm = pm.unsqueeze(-1).expand(b, n, h)  # [B,N,H]
            if br.pad_n:
                pm = _pad_seq(pm, br.pad_n, value=True)
            pm = pm.reshape(b, br.nseg, br.sl, h)
            if br.pad_r:
                pm = _pad_seq(pm, br.pad_r, dim=2, value=True)
            pm = pm.reshape(b, br.nseg, br.sparse_len, br.ratio, h)[:, :, :, br.groups, br.heads]
            pm = pm.transpose(2, 3).reshape(b * br.nseg, h, 1, br.sparse_len)
            neg = torch.finfo(q.dtype).min / 2
            bias = torch.zeros(pm.shape, dtype=q.dtype, device=q.device).masked_fill_(pm, neg)
        out, lse = attention_with_lse(qs, ks, vs, bias, impl=impl)
        lse = lse.detach()
        del qs, ks, vs, bias
        out_d = br.dense(out, b, 0.0).float()  # [B,N,H,d]
        lse_d = br.dense(lse.unsqueeze(-1), b, _UNCOVERED_LSE).squeeze(-1)  # [B,N,H]
        del out, lse
        if acc is None:
            acc, run_max, den = out_d, lse_d, torch.ones_like(lse_d)
        else:
            new_max = torch.maximum(run_max, lse_d)
            a = torch.exp(run_max - new_max)
            c = torch.exp(lse_d - new_max)
            acc = acc * a.unsqueeze(-1) + out_d * c.unsqueeze(-1)
            den = den * a + c
            run_max = new_max
        del out_d, lse_d
    assert acc is not None and den is not None
    return (acc / den.unsqueeze(-1)).to(q.dtype)


# --------------------------------------------------------------------------------------------------------
# modules (names = torchscale's, as stored in released checkpoints)


class DropPath(nn.Module):
    """Stochastic depth per sample (torchscale/timm semantics: kept samples rescaled by 1/keep)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DilatedMultiheadAttention(nn.Module):
    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.segment_lengths = cfg.segment_lengths
        self.dilated_ratios = cfg.dilated_ratios
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.layernorm_eps)  # sub-LN
        self.attn_impl = "auto"
        self.padding = cfg.padding
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        b, n, d = x.shape
        if n == 1:
            # a single key: softmax weight 1 in every branch, the attention output is v itself
            return self.out_proj(self.inner_attn_ln(self.v_proj(x)))
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_heads, self.head_dim)
        attn = dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios, padding_mask,
                                 impl=self.attn_impl, padding=self.padding)
        del q, k, v
        return self.out_proj(self.inner_attn_ln(attn.reshape(b, n, d)))


class FeedForwardNetwork(nn.Module):
    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)
        h = self.ffn_layernorm(self.activation_dropout(h))
        return self.dropout(self.fc2(h))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: SlideEncoderConfig, drop_path: float):
        super().__init__()
        self.self_attn = DilatedMultiheadAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.ffn = FeedForwardNetwork(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop_path(self.dropout(self.self_attn(self.self_attn_layer_norm(x), padding_mask)))
        x = x + self.drop_path(self.ffn(self.final_layer_norm(x)))
        return x


class CoordPositionalEmbedding(nn.Module):
    """2-D sin-cos of each patch's grid position (coords / patch step) through a zero-initialised Linear.

    Zero init means switching it on over a pretrained encoder starts from exactly the pretrained function.
    """

    def __init__(self, embed_dim: int, num_freqs: int = 32):
        super().__init__()
        self.num_freqs = num_freqs
        freqs = 1.0 / (10000.0 ** (torch.arange(num_freqs, dtype=torch.float32) / num_freqs))
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(4 * num_freqs, embed_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @staticmethod
    def grid_positions(coords: Tensor, valid: Tensor) -> Tensor:
        """[N,2] pixel coords -> grid indices (offset to 0, divided by the smallest positive step per axis)."""
        out = torch.zeros(coords.shape, dtype=torch.float32, device=coords.device)
        c = coords[valid].float()
        if c.numel() == 0:
            return out
        grid = []
        for axis in range(2):
            vals = torch.unique(c[:, axis])
            diffs = vals[1:] - vals[:-1]
            step = diffs[diffs > 0].min() if (diffs > 0).any() else torch.tensor(1.0, device=c.device)
            grid.append((c[:, axis] - vals[0]) / step)
        out[valid] = torch.stack(grid, dim=-1)
        return out

    def forward(self, coords: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        b, n, _ = coords.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=coords.device) if padding_mask is None else ~padding_mask
        grid = torch.stack([self.grid_positions(coords[i], valid[i]) for i in range(b)])  # [B,N,2]
        ang = grid.unsqueeze(-1) * self.freqs  # [B,N,2,F]
        feats = torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(b, n, 4 * self.num_freqs)
        return self.proj(feats.to(self.proj.weight.dtype))


class LongNetEncoder(nn.Module):
    """Slide encoder: [B,N,D] patch features -> [B,N,D] contextualised patch tokens."""

    def __init__(self, config: Optional[SlideEncoderConfig] = None):
        super().__init__()
        cfg = config or SlideEncoderConfig()
        self.config = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0, cfg.drop_path, cfg.num_layers).tolist() if cfg.num_layers > 1 else [cfg.drop_path]
        self.layers = nn.ModuleList(EncoderLayer(cfg, r) for r in rates)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        if cfg.coord_pos_embed:
            self.coord_pos_embed = CoordPositionalEmbedding(cfg.embed_dim, cfg.coord_num_freqs)
        else:
            self.coord_pos_embed = None
        # sub-LN init (torchscale, no DeepNorm): scale the residual-branch output weights
        scale = math.sqrt(math.log(cfg.num_layers * 2))
        with torch.no_grad():
            for layer in self.layers:
                for lin in (layer.ffn.fc1, layer.ffn.fc2, layer.self_attn.out_proj, layer.self_attn.v_proj):
                    lin.weight.mul_(scale)
        self._warned_no_coords = False

    def _encode(self, x: Tensor, padding_mask: Optional[Tensor], coords: Optional[Tensor]) -> Tensor:
        """Slide-level attention over [B,N,D] (with ``padding_mask`` only in the masked mode)."""
        if self.coord_pos_embed is not None:
            if coords is not None:
                x = x + self.coord_pos_embed(coords.to(x.device), padding_mask)
            elif not self._warned_no_coords:
                logger.warning("coord_pos_embed is on but no coords were given; encoding without them")
                self._warned_no_coords = True
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        y = self.dropout(x)
        for layer in self.layers:
            y = layer(y, padding_mask)
        return self.layer_norm(y)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                coords: Optional[Tensor] = None) -> Tensor:
        """[B,N,D] -> [B,N,D]; ``padding_mask`` [B,N] (True = padding) marks slots of shorter slides."""
        if x.dim() != 3 or x.shape[-1] != self.config.embed_dim:
            raise ValueError(f"expected [B, N, {self.config.embed_dim}] features, got {tuple(x.shape)}")
        b, n, d = x.shape
        if padding_mask is not None:
            padding_mask = padding_mask.to(device=x.device, dtype=torch.bool)
            if padding_mask.shape != (b, n):
                raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != {(b, n)}")
            if not padding_mask.any():
                padding_mask = None
        if self.config.compat == "slidechat_v1":
            # released layout bug: [1,N,D] was permuted to [N,1,D] for a batch-first encoder
            y = x.reshape(b * n, 1, d)
            y = self.dropout(y)
            for layer in self.layers:
                y = layer(y)
            y = self.layer_norm(y).reshape(b, n, d)
        elif padding_mask is not None and self.config.padding == "torchscale":
            # torchscale has no key mask: each slide is encoded alone, at its own length
            rows = []
            for i in range(b):
                keep = (~padding_mask[i]).nonzero(as_tuple=True)[0]
                row = x.new_zeros(n, d)
                if keep.numel():
                    ci = None if coords is None else coords[i, keep][None]
                    row = row.index_copy(0, keep, self._encode(x[i, keep][None], None, ci)[0])
                rows.append(row)
            y = torch.stack(rows)
        else:
            y = self._encode(x, padding_mask, coords)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y
