"""What every patch encoder provides: its own preprocessing on uint8 batches, and ``forward``.

Extraction workers hand over raw uint8 patches (cheap to pass between processes); the encoder turns a
batch into its input tensor on the device, so resize/normalise runs batched (and on the GPU there).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from slidechat.features.encoders.registry import EncoderPreset, Preprocessing
from slidechat.features.resample import pil_resize_uint8, torchvision_resize_size
from slidechat.model import checkpoint as model_checkpoint
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

class PatchEncoder(nn.Module):
    """Base class. Subclasses pass their :class:`EncoderPreset` (which sets the attributes below) and
    implement ``encode`` on the input tensor.

    ``resize_to`` is the shorter-side resize and ``crop`` the centre crop (torchvision ``Resize`` +
    ``CenterCrop`` on a PIL image, with ``interpolation`` one of PIL's filters: "bicubic", "bilinear",
    ...); ``None`` leaves patches at their size.
    """

    name: str = "base"
    embed_dim: int = 0
    resize_to: Optional[int] = None
    crop: Optional[int] = None
    interpolation: str = "bicubic"
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    checkpoint_path: Optional[str] = None
    checkpoint_sha256: str = "none"
    preset: Optional[EncoderPreset] = None
    reduced_depth: Optional[int] = None  # set by build_encoder(depth=...): tests only, recorded in the H5

    def __init__(self, preset: Optional[EncoderPreset] = None) -> None:
        super().__init__()
        if preset is not None:
            p = preset.preprocessing
            self.preset, self.name, self.embed_dim = preset, preset.name, preset.dim
            self.resize_to, self.crop, self.interpolation = p.resize_to, p.crop, p.interpolation
            self.mean, self.std = p.mean, p.std

    def check_width(self, width: int) -> None:
        """Refuse a built model whose feature width is not its preset's (a preset typed wrong)."""
        if self.preset is not None and width != self.preset.dim:
            raise SlideChatError(f"encoder '{self.preset.name}' gives {width}-d features, its preset says "
                                 f"{self.preset.dim}")

    def record_checkpoint(self, path: Path) -> None:
        """Remember the weights file and its SHA-256 for the H5 provenance."""
        self.checkpoint_path = str(path)
        self.checkpoint_sha256 = sha256_file(path)

    def input_size(self, h: int, w: int) -> Tuple[int, int]:
        """(h, w) after ``Resize(resize_to)`` (torchvision's rule: shorter side, long side truncated)."""
        if self.resize_to is None:
            return h, w
        return torchvision_resize_size(h, w, self.resize_to)

    def host_resize_spec(self, h: int, w: int) -> Optional[Tuple[int, int, str]]:
        """``(h, w, filter)`` of the resize the reader processes may do with PIL itself, or None.

        Doing it there with PIL gives the very pixels the encoder's own torchvision pipeline makes, in
        parallel with decoding; ``preprocess`` then sees the final size and skips its resize.
        """
        oh, ow = self.input_size(h, w)
        return None if (oh, ow) == (h, w) else (oh, ow, self.interpolation)

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, S, S): torchvision ``Resize`` (PIL, exact) + ``CenterCrop`` +
        ``ToTensor`` + ``Normalize``, batched on the patches' device.

        The resize reproduces PIL's uint8 arithmetic bit for bit (``features.resample``), so features equal
        those of the encoder's reference pipeline; patches already at the resized size skip it.
        """
        if self.resize_to is not None:
            h, w = patches.shape[1:3]
            size = self.input_size(h, w)
            if size != (h, w):
                patches = pil_resize_uint8(patches, size, self.interpolation)
        if self.crop is not None:
            h, w = patches.shape[1:3]
            c = self.crop
            if h < c or w < c:
                raise SlideChatError(f"patch {h}x{w} smaller than {self.name}'s crop {c}")
            top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
            patches = patches[:, top:top + c, left:left + c]
        x = patches.permute(0, 3, 1, 2).float().div_(255.0)  # ToTensor
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> features (B, embed_dim)."""
        return self.encode(self.preprocess(patches))

    def provenance(self) -> Dict[str, str]:
        """The H5 root attributes that say which features these are (checked before features mix)."""
        out = {"encoder": self.name, "encoder_checkpoint": self.checkpoint_path or "none",
               "encoder_checkpoint_sha256": self.checkpoint_sha256,
               "encoder_embed_dim": str(self.embed_dim)}
        if self.preset is not None:
            out.update(self.preset.provenance())
        if self.reduced_depth is not None:  # such features must never pass for the real encoder's
            out["encoder_depth"] = str(self.reduced_depth)
            out["encoder"] = f"{self.name}@depth{self.reduced_depth}"
        # what this instance really does (a parametric preset takes it from the model)
        out["encoder_preprocessing"] = Preprocessing(self.resize_to, self.crop, self.interpolation,
                                                     tuple(self.mean), tuple(self.std)).describe()
        return out


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def require_checkpoint(path: Optional[PathLike], encoder: str) -> Path:
    """The checkpoint path, or a one-line error saying which flag to pass. Never downloads."""
    if path is None or str(path) == "":
        raise SlideChatError(f"encoder '{encoder}' needs local weights and none were given",
                             hint="pass --checkpoint /path/to/weights (nothing is downloaded)")
    p = Path(path)
    if not p.is_file():
        raise SlideChatError(f"checkpoint for encoder '{encoder}' not found", p,
                             hint="pass --checkpoint with an existing local file")
    return p


def load_checked(module: nn.Module, sd: Dict[str, torch.Tensor], path: PathLike, encoder: str,
                 ignore_missing: Tuple[str, ...] = (), allow_unexpected: bool = True) -> None:
    """The encoders' use of :func:`slidechat.model.checkpoint.load_checked` (the one key check).

    A model with silently-random weights produces plausible-looking garbage, so every parameter
    (except ``ignore_missing`` prefixes) is required and shapes must match. ``allow_unexpected=False``
    (the named presets: the file must be exactly the reference's weights) also refuses keys the model
    does not have; otherwise they are logged and ignored (a tower taken out of a larger checkpoint).
    """
    own = nn.Module.state_dict(module)
    required = [k for k in own if not (ignore_missing and k.startswith(tuple(ignore_missing)))]
    model_checkpoint.load_checked(
        module, sd, required=required, allow_unexpected=allow_unexpected, source=path,
        hint=f"refusing to run with random weights: is this the right --checkpoint for --encoder {encoder}?")
