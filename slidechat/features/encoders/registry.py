"""The patch-encoder registry: one :class:`EncoderPreset` per name, registered by a decorator.

A preset is everything that makes a feature what it is: architecture (inside its ``factory``),
preprocessing, output rule and dimension, the magnification and patch size its authors used, the
licence, and the source the facts were read from. A family file registers its presets with
``@register_encoder`` (as timm registers models); ``build_encoder`` looks a name up and calls the
preset's factory, so adding an encoder is a new preset, never a new branch.

``version`` is bumped whenever a preset change would change the features (architecture, weights
mapping, preprocessing, output rule); it is written to every H5 so old and new features never mix
unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from slidechat.utils.errors import SlideChatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """torchvision's ``Resize(resize_to, interpolation)`` (shorter side, on a PIL uint8 image) →
    ``CenterCrop(crop)`` → ``ToTensor`` → ``Normalize(mean, std)``; ``None`` skips a step.

    Patches are square, so a processor that resizes to an exact ``(s, s)`` (Hugging Face image
    processors) is ``resize_to=s`` here.
    """

    resize_to: Optional[int]
    crop: Optional[int]
    interpolation: str = "bicubic"  # a PIL filter name: "bicubic", "bilinear", "lanczos", ...
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    @property
    def input_size(self) -> Optional[int]:
        """The side of the square tensor the network sees (None: the patch's own size)."""
        return self.crop if self.crop is not None else self.resize_to

    def describe(self) -> str:
        """One line, for ``--list-encoders`` and the H5 provenance."""
        steps = []
        if self.resize_to is not None:
            steps.append(f"Resize({self.resize_to}, {self.interpolation})")
        if self.crop is not None:
            steps.append(f"CenterCrop({self.crop})")
        steps.append("ToTensor")
        steps.append(f"Normalize(mean={list(self.mean)}, std={list(self.std)})")
        return " -> ".join(steps)


@dataclass(frozen=True)
class BuildRequest:
    """What a caller asks of a factory.

    ``depth`` builds the preset with fewer transformer blocks through the very same code path (every
    other argument as the card says): the test suite's way to check fidelity cheaply.
    ``argument`` is the part after the colon of a parametric name (``timm:<model_name>``).
    """

    checkpoint: Optional[Path] = None
    load_weights: bool = True
    depth: Optional[int] = None
    argument: Optional[str] = None


#: ``factory(preset, request) -> PatchEncoder`` (typed ``Any`` here: the base class imports this module)
Factory = Callable[["EncoderPreset", BuildRequest], Any]


@dataclass(frozen=True)
class EncoderPreset:
    name: str
    dim: int  # 0: known only once built (``timm:<model_name>``)
    preprocessing: Preprocessing
    output: str  # the output rule in words, e.g. "CLS token after the final norm"
    factory: Factory = field(repr=False, compare=False)
    magnification: Optional[float] = None  # what the authors trained at (None: not applicable)
    patch_px: Optional[int] = None  # patch side at that magnification, before the preprocessing
    licence: str = ""
    source: str = ""  # where the facts come from (model card, reference code)
    version: int = 1
    trident_name: Optional[str] = None  # TRIDENT's name for the same encoder, for its folder layout
    needs_checkpoint: bool = True
    aliases: Tuple[str, ...] = ()
    parametric: bool = False  # the name is a prefix ("timm:"); the rest is passed as ``argument``

    @property
    def folder_name(self) -> str:
        """The name in ``--layout trident`` folders (``features_<folder_name>``): TRIDENT's, else our own."""
        return self.trident_name or self.name

    @property
    def display_name(self) -> str:
        """The name as a user types it (``timm:<model_name>`` for the parametric entry)."""
        return self.name + ("<model_name>" if self.parametric else "")

    def provenance(self) -> Dict[str, str]:
        """What the H5 root attributes record about the preset (on top of the checkpoint's hash)."""
        return {"encoder_preset": self.name, "encoder_preset_version": str(self.version),
                "encoder_preprocessing": self.preprocessing.describe(),
                "encoder_output": self.output}

    def table_row(self) -> Dict[str, str]:
        """The row of ``slidechat extract-features --list-encoders``."""
        size = self.preprocessing.input_size
        mag = f"{self.magnification:g}x" if self.magnification else "-"
        return {"name": self.display_name,
                "dim": str(self.dim) if self.dim else "model's", "input": f"{size}px" if size else "patch",
                "magnification": mag if self.patch_px is None else f"{mag}, {self.patch_px}px",
                "licence": self.licence or "-"}


_PRESETS: Dict[str, EncoderPreset] = {}
_ALIASES: Dict[str, str] = {}


def register_encoder(fn: Callable[[], EncoderPreset]) -> Callable[[], EncoderPreset]:
    """Decorator: register the preset ``fn()`` returns under its name (and aliases).

    Names, aliases and output folder names (``--layout trident``: the TRIDENT name, else the name) must all
    be unique, so two different features never land in one folder."""
    preset = fn()
    for key in (preset.name, *preset.aliases):
        if key in _PRESETS or key in _ALIASES:
            raise ValueError(f"encoder name '{key}' registered twice")
    for other in _PRESETS.values():
        if preset.folder_name == other.folder_name:
            raise ValueError(f"encoders '{preset.name}' and '{other.name}' would share the folder "
                             f"features_{preset.folder_name}")
    _PRESETS[preset.name] = preset
    for alias in preset.aliases:
        _ALIASES[alias] = preset.name
    return fn


def registered_presets() -> List[EncoderPreset]:
    return list(_PRESETS.values())


def get_preset(name: str) -> Tuple[EncoderPreset, Optional[str]]:
    """``(preset, argument)`` for a name, an alias or a parametric ``prefix:argument``."""
    key = _ALIASES.get(name, name)
    if key in _PRESETS and not _PRESETS[key].parametric:
        return _PRESETS[key], None
    prefix, sep, argument = name.partition(":")
    preset = _PRESETS.get(prefix + sep)
    if sep and preset is not None and preset.parametric and argument:
        return preset, argument
    raise SlideChatError(f"unknown encoder '{name}'",
                         hint="choose one of " + ", ".join(p.display_name for p in _PRESETS.values())
                         + " (slidechat extract-features --list-encoders)")


def preset_table() -> List[Dict[str, str]]:
    return [p.table_row() for p in _PRESETS.values()]


def format_preset_table(rows: Sequence[Dict[str, str]]) -> str:
    """A plain aligned text table (what ``--list-encoders`` prints)."""
    cols = ["name", "dim", "input", "magnification", "licence"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)
