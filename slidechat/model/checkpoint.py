"""The one home of checkpoint handling: find, read safely, and load with a key check.

Every entry point (``slidechat test``/``chat``/``export``, training's ``pretrained_pth``, resume, the patch
encoders, ``xtuner test`` through our configs) goes through these functions, so a checkpoint is read the
same way and its keys are reported in one format everywhere:

* :func:`resolve_checkpoint` — a file, a DeepSpeed folder, a work dir (mmengine's ``last_checkpoint``
  marker -> the latest checkpoint), an exported model folder or a Hugging Face folder, resolved ONCE at a
  command's entry into a :class:`ResolvedCheckpoint` (path + :class:`CheckpointKind`) that is passed down.
* :func:`read_checkpoint` (and :func:`load_state_dict_file` / :func:`load_weights` for plain paths) —
  ``.safetensors``, torch ``.pth/.pt/.bin`` (plain
  dicts, mmengine ``{"state_dict", "meta", "message_hub"}`` wrappers), DeepSpeed folders
  (``iter_N.pth/mp_rank_00_model_states.pt``, weights under ``module``), exported SlideChat folders (their
  ``slide_modules.safetensors``) and Hugging Face folders (``model.safetensors``, sharded or not).
  Pickled metadata may reference arbitrary classes; those are never imported or called: the weights-only
  unpickler is tried first, then a restricted unpickler that rebuilds tensors and plain containers only and
  turns every other class into an inert placeholder.
* :func:`load_checked` — loads a state dict into any ``nn.Module`` after comparing keys with what the module
  must receive. Strict by default: a shape mismatch is always a one-line :class:`SlideChatError`; missing
  required keys and unexpected keys are one too unless ``allow_partial`` (then a warning). The result is a
  :class:`KeyReport` whose :meth:`KeyReport.summary` is the one report line used everywhere.

Framework-free on purpose (torch, safetensors and the standard library only): the cytology model family,
the encoders and plain-PyTorch users load through it without mmengine/xtuner.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

_DS_MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_WRAPPER_KEYS = ("state_dict", "module", "model")
#: files of a ``SlideChatModel.save_pretrained`` folder (``slidechat export``)
EXPORTED_CONFIG_FILE = "slidechat_config.json"
EXPORTED_WEIGHTS_FILE = "slide_modules.safetensors"
#: weight files of a Hugging Face ``save_pretrained`` folder, in the order they are looked for
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
#: mmengine's marker naming a work dir's latest checkpoint
LAST_CHECKPOINT_FILE = "last_checkpoint"


class _Inert:
    """Stands in for any non-allow-listed class in a pickle: absorbs its arguments and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()


# torch/builtin names the restricted unpickler may resolve for real (tensor rebuilding and plain containers)
_ALLOWED: Dict[str, set] = {
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray", "list", "dict", "tuple", "int",
                 "float", "str", "bool", "bytes"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state"},
    "torch": {"Size", "device", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
              "int8", "uint8", "bool"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage", "_load_from_bytes"):
            if name == "_load_from_bytes":  # legacy path that calls torch.load recursively: refuse
                return _Inert
            return super().find_class(module, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        return type(f"Inert<{module}.{name}>", (_Inert,), {})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


class _RestrictedPickleModule:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler never resolves arbitrary globals."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(_restricted_load)
    __name__ = "slidechat_restricted_pickle"


#: what torch's weights-only unpickler names when it refuses a file: a global it may not import ("Unsupported
#: global: GLOBAL os.system", "unsupported GLOBAL posix.system whose module posix is blocked"), or a class it
#: may not build ("but got <class 'x.Y'>")
_REFUSED_NAME = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def pickle_refusal(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, in a few words (``global posix.system``).

    torch's message is a page of advice whose first step is to reload with ``weights_only=False``, i.e. to
    run whatever the file holds; no slidechat command does that, so only the refused name is kept.
    """
    text = str(exc)
    m = _REFUSED_NAME.search(text)
    if m:
        return f"global {m.group(1) or m.group(2)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    own = [ln for ln in lines if "weights_only" not in ln and not ln.startswith(("Weights only load failed",
                                                                                "Check the documentation"))]
    first = own[0].replace("WeightsUnpickler error:", "").strip() if own else ""
    return (first[:200] or type(exc).__name__).rstrip(".")


UNSAFE_PICKLE_HINT = ("re-save its tensors as .safetensors (safetensors.torch.save_file) in a Python session "
                      "that trusts the file, and pass that file")


def _torch_load(path: Path, allow_unsafe_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first_error = exc
    except RuntimeError as exc:  # some torch versions wrap the unpickling error
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise SlideChatError(f"cannot read checkpoint: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                                 path=path) from exc
        first_error = exc
    logger.info("%s holds non-tensor metadata; extracting tensors with a restricted unpickler", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except Exception:  # noqa: BLE001 - any failure here means "not loadable safely"
        if allow_unsafe_pickle:  # Python-only escape hatch (load_state_dict_file); no command offers it
            logger.warning("loading %s with full unpickling (allow_unsafe_pickle=True)", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise SlideChatError(
            f"holds non-tensor Python objects ({pickle_refusal(first_error)}) that are never unpickled, and its "
            f"tensors cannot be read without them; nothing in it was run", path=path,
            hint=UNSAFE_PICKLE_HINT) from None


def _tensors_only(d: Dict[Any, Any]) -> Dict[str, Tensor]:
    return {str(k): v for k, v in d.items() if isinstance(v, Tensor)}


def _unwrap(obj: Any, path: Path) -> Dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise SlideChatError(f"checkpoint holds a {type(obj).__name__}, not a dict of weights", path=path)
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and any(isinstance(v, Tensor) for v in inner.values()):
            return _tensors_only(inner)
    if any(isinstance(v, Tensor) for v in obj.values()):
        return _tensors_only(obj)
    if "module" in obj and obj["module"] is None:
        raise SlideChatError("DeepSpeed checkpoint has no consolidated weights (ZeRO-3 shards?)", path=path,
                             hint="consolidate with DeepSpeed's zero_to_fp32.py first")
    raise SlideChatError(f"no tensors found (top-level keys: {sorted(map(str, obj))[:10]})", path=path)


def _strip_module_prefix(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------- resolve

class CheckpointKind(enum.Enum):
    """The layouts a checkpoint path can have; each is read its own way (see :func:`read_checkpoint`)."""

    FILE = "state-dict file"  # .safetensors / .pth / .pt / .bin / .ckpt
    DEEPSPEED = "DeepSpeed folder"  # iter_N.pth/ with mp_rank_00_model_states.pt (ZeRO-3: zero_pp_rank_...)
    EXPORTED = "exported folder"  # slidechat export (SlideChatModel.save_pretrained)
    HF = "Hugging Face folder"  # save_pretrained: model.safetensors, sharded or not


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint path resolved once at a command's entry, with its layout, and passed down typed.

    ``work_dir``: the training work dir it was found through (``last_checkpoint``), if any.
    """

    path: Path
    kind: CheckpointKind
    work_dir: Optional[Path] = None


def is_exported_folder(path: PathLike) -> bool:
    """A ``SlideChatModel.save_pretrained`` folder (``slidechat export``)."""
    return Path(path).is_dir() and (Path(path) / EXPORTED_CONFIG_FILE).is_file()


def _deepspeed_model_file(folder: Path) -> Optional[Path]:
    return next((folder / name for name in _DS_MODEL_FILES if (folder / name).is_file()), None)


def _hf_weight_file(folder: Path) -> Optional[Path]:
    return next((folder / name for name in _HF_WEIGHT_FILES if (folder / name).is_file()), None)


def checkpoint_at(path: PathLike) -> ResolvedCheckpoint:
    """The layout of the checkpoint at ``path`` itself (a work dir's marker is not followed: see
    :func:`resolve_checkpoint`). A missing path or a folder of no known layout is a one-line error."""
    p = Path(path)
    if not p.exists():
        raise SlideChatError("checkpoint not found", path=p)
    if not p.is_dir():
        return ResolvedCheckpoint(p, CheckpointKind.FILE)
    if is_exported_folder(p):
        return ResolvedCheckpoint(p, CheckpointKind.EXPORTED)
    if _deepspeed_model_file(p) is not None:
        return ResolvedCheckpoint(p, CheckpointKind.DEEPSPEED)
    if _hf_weight_file(p) is not None:
        return ResolvedCheckpoint(p, CheckpointKind.HF)
    found = sorted(x.name for x in p.iterdir())[:10]
    raise SlideChatError(
        f"folder is not a checkpoint: no DeepSpeed {_DS_MODEL_FILES[0]}, no "
        f"{LAST_CHECKPOINT_FILE} (work dir), no {EXPORTED_CONFIG_FILE} (exported model), no "
        f"{_HF_WEIGHT_FILES[0]}; has {found}", path=path)


def resolve_checkpoint(path: PathLike) -> ResolvedCheckpoint:
    """The checkpoint ``path`` stands for, resolved once: a work dir -> the checkpoint its
    ``last_checkpoint`` marker names (looked up beside the marker when the work dir was moved); anything
    else (a file, a DeepSpeed folder, an exported or Hugging Face folder) as is, with its layout.
    Missing paths and folders of no known layout are one-line errors."""
    p = Path(path)
    if not p.exists():
        raise SlideChatError("checkpoint not found", path=p)
    marker = p / LAST_CHECKPOINT_FILE
    if not (p.is_dir() and marker.is_file()):
        return checkpoint_at(p)
    named = marker.read_text(encoding="utf-8").strip()
    target = Path(named)
    if not target.exists():  # the work dir moved since: look beside the marker
        target = p / Path(named.rstrip("/")).name
    if not named or not target.exists():
        raise SlideChatError(f"work dir's {LAST_CHECKPOINT_FILE} names {named!r}, which does not exist",
                             path=marker)
    logger.info("%s is a work dir: using its last checkpoint %s", p, target)
    return dataclasses.replace(checkpoint_at(target), work_dir=p)


# --------------------------------------------------------------------------------------------- load

def _load_safetensors(p: Path) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SlideChatError(f"cannot read safetensors file: {exc}", path=p) from exc


def _load_hf_folder(folder: Path, allow_unsafe_pickle: bool) -> Dict[str, Tensor]:
    """Weights of a Hugging Face ``save_pretrained`` folder (sharded or not)."""
    f = _hf_weight_file(folder)
    assert f is not None, "checkpoint_at found a weight file"
    if not f.name.endswith(".index.json"):
        return _load_file(f, allow_unsafe_pickle)
    try:
        shards = sorted(set(json.loads(f.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise SlideChatError(f"invalid shard index: {exc}", path=f) from exc
    sd: Dict[str, Tensor] = {}
    for shard in shards:
        sp = folder / shard
        if not sp.is_file():
            raise SlideChatError(f"shard {shard} named by the index is missing", path=f)
        sd.update(_load_file(sp, allow_unsafe_pickle))
    return sd


def _load_file(p: Path, allow_unsafe_pickle: bool) -> Dict[str, Tensor]:
    """One weights file, by its suffix: safetensors, or a torch pickle read safely and unwrapped."""
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _unwrap(_torch_load(p, allow_unsafe_pickle), p)
    raise SlideChatError(f"unknown checkpoint type {p.suffix!r}", path=p,
                         hint="expected .safetensors, .pth, .pt, .bin or a checkpoint folder")


def read_checkpoint(checkpoint: ResolvedCheckpoint, allow_unsafe_pickle: bool = False) -> Dict[str, Tensor]:
    """Weights of a resolved checkpoint as a flat ``{name: tensor}`` dict on CPU, read safely by its layout.

    An exported SlideChat folder gives its slide modules (the LLM is read by ``from_pretrained``).
    ``allow_unsafe_pickle`` is a Python-only escape hatch for trusted legacy files; no command exposes it.
    """
    p, kind = checkpoint.path, checkpoint.kind
    if kind is CheckpointKind.HF:
        return _checked_nonempty(_strip_module_prefix(dict(_load_hf_folder(p, allow_unsafe_pickle))), p)
    if kind is CheckpointKind.EXPORTED:
        p = p / EXPORTED_WEIGHTS_FILE
        if not p.is_file():
            raise SlideChatError(f"exported model folder has no {EXPORTED_WEIGHTS_FILE}", path=checkpoint.path)
    elif kind is CheckpointKind.DEEPSPEED:
        p = _deepspeed_model_file(p) or p / _DS_MODEL_FILES[0]
    return _checked_nonempty(_strip_module_prefix(dict(_load_file(p, allow_unsafe_pickle))), p)


def load_state_dict_file(path: PathLike, allow_unsafe_pickle: bool = False) -> Dict[str, Tensor]:
    """Weights of the checkpoint file or folder at ``path`` (:func:`checkpoint_at` + :func:`read_checkpoint`):
    for weight files named directly (a patch encoder's), where no work dir is followed."""
    return read_checkpoint(checkpoint_at(path), allow_unsafe_pickle=allow_unsafe_pickle)


def _checked_nonempty(sd: Dict[str, Tensor], p: Path) -> Dict[str, Tensor]:
    if not isinstance(sd, (dict, collections.OrderedDict)) or not sd:
        raise SlideChatError("checkpoint holds no weights", path=p)
    return sd


def load_weights(path: PathLike, allow_unsafe_pickle: bool = False) -> Dict[str, Tensor]:
    """:func:`resolve_checkpoint` + :func:`read_checkpoint`, for Python callers holding a plain path
    (commands resolve once at their entry and call :func:`read_checkpoint`)."""
    return read_checkpoint(resolve_checkpoint(path), allow_unsafe_pickle=allow_unsafe_pickle)


# --------------------------------------------------------------------------------------------- key check

def summarize_keys(keys: Iterable[str], limit: int = 6) -> str:
    """Short, readable key list: grouped by the first two name parts, with counts."""
    keys = list(keys)
    if not keys:
        return "none"
    groups: "collections.OrderedDict[str, int]" = collections.OrderedDict()
    for k in keys:
        g = ".".join(k.split(".")[:2])
        groups[g] = groups.get(g, 0) + 1
    parts = [f"{g}.* ({n})" if n > 1 else g for g, n in list(groups.items())[:limit]]
    if len(groups) > limit:
        parts.append(f"... {len(groups) - limit} more groups")
    return f"{len(keys)} keys: " + ", ".join(parts)


def _shape(t: Any) -> Tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


@dataclass
class KeyReport:
    """How a state dict met a module. ``missing``: required module keys the checkpoint lacks;
    ``unexpected``: checkpoint keys the module has no place for; ``mismatched``: keys present on both sides
    with different shapes (``shapes`` holds ``(checkpoint, model)`` for each); ``kept``: module keys that
    were not required and not in the checkpoint, left as built (e.g. a frozen LLM)."""

    loaded: List[str]
    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]
    source: str = ""
    kept: List[str] = field(default_factory=list)
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def mismatch_text(self, limit: int = 5) -> str:
        parts = [f"{k}: checkpoint {self.shapes[k][0]} vs model {self.shapes[k][1]}"
                 for k in self.mismatched[:limit] if k in self.shapes]
        more = len(self.mismatched) - len(parts)
        return "; ".join(parts) + (f"; ... {more} more" if more > 0 else "")

    def summary(self) -> str:
        """One line: source, counts, and the key prefixes of every gap."""
        head = f"{self.source}: " if self.source else ""
        n_ckpt = len(self.loaded) + len(self.unexpected) + len(self.mismatched)
        line = (f"{head}loaded {len(self.loaded)} of {n_ckpt} checkpoint tensors; missing "
                f"{summarize_keys(self.missing)}; unexpected {summarize_keys(self.unexpected)}; "
                f"shape mismatch {summarize_keys(self.mismatched)}")
        if self.kept:
            line += f"; not in checkpoint, kept as built: {summarize_keys(self.kept)}"
        return line


def _required_keys(own: Sequence[str], required: Optional[Iterable[str]]) -> set:
    """``required`` entries are module keys, or prefixes ending in ``.`` standing for every key under them."""
    if required is None:
        return set(own)
    own_set = set(own)
    out: set = set()
    for r in required:
        if r in own_set:
            out.add(r)
        elif r.endswith("."):
            hits = {k for k in own if k.startswith(r)}
            if not hits:
                raise ValueError(f"required prefix {r!r} matches no key of the module")
            out |= hits
        else:
            raise ValueError(f"required key {r!r} is not a key of the module")
    return out


PARTIAL_HINT = "--allow-partial / allow_partial=True loads it anyway, leaving missing weights as initialised"


def _refusal(report: KeyReport, n_required: int) -> str:
    """Why a strict load refuses ``report``'s checkpoint (missing and/or unexpected keys)."""
    missing, unexpected = report.missing, report.unexpected
    if not report.loaded:
        return (f"checkpoint holds none of the {n_required} weights the model must receive "
                f"(missing {summarize_keys(missing)}; unexpected {summarize_keys(unexpected)})")
    if missing:
        reason = f"checkpoint lacks required weights: {summarize_keys(missing)}"
        if unexpected:
            reason += f"; and has unexpected ones: {summarize_keys(unexpected)}"
        return reason
    return f"checkpoint has weights the model does not use: {summarize_keys(unexpected)}"


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor], *,
                 required: Optional[Iterable[str]] = None, allow_partial: bool = False,
                 source: Union[str, os.PathLike] = "", allow_unexpected: bool = False,
                 hint: Optional[str] = None) -> KeyReport:
    """Load ``state_dict`` into ``module`` after checking its keys; returns the :class:`KeyReport`.

    ``required``: the module keys that must come from the checkpoint (exact keys, or prefixes ending in
    ``.``); default all of ``module.state_dict()``. Keys are compared with the plain ``nn.Module`` state
    dict (a wrapper's own ``state_dict``/``load_state_dict`` overrides are bypassed), so callers map
    foreign key names first. Nothing is loaded when the check fails:

    * a shape mismatch is always a one-line :class:`SlideChatError`;
    * missing required keys or unexpected keys are one too, naming the key prefixes, unless
      ``allow_partial`` (then one warning line and the matching keys are loaded);
    * ``allow_unexpected`` only lets unexpected keys through (a warning), for loaders that take a part of
      a larger file (a patch encoder's tower out of a whole CLIP/CoCa checkpoint).

    ``hint`` replaces the default hint of the missing/unexpected error (how the caller opts in).
    """
    src = os.fspath(source) if source else ""
    own = nn.Module.state_dict(module)
    # BatchNorm's batch counter is a statistic, not a weight; old checkpoints lack it and torch fills it
    req = {k for k in _required_keys(list(own), required) if not k.endswith(".num_batches_tracked")}
    matched: Dict[str, Tensor] = {}
    unexpected: List[str] = []
    mismatched: List[str] = []
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    for k, v in state_dict.items():
        if k not in own or not isinstance(v, Tensor):
            unexpected.append(k)
        elif _shape(v) != _shape(own[k]):
            mismatched.append(k)
            shapes[k] = (_shape(v), _shape(own[k]))
        else:
            matched[k] = v
    present = set(matched) | set(mismatched)
    missing = [k for k in own if k in req and k not in present]
    kept = [k for k in own if k not in req and k not in present]
    report = KeyReport(loaded=list(matched), missing=missing, unexpected=unexpected, mismatched=mismatched,
                       source=src, kept=kept, shapes=shapes)
    if mismatched:
        raise SlideChatError(f"{len(mismatched)} checkpoint tensor(s) do not fit the model: "
                             f"{report.mismatch_text()}", path=src or None,
                             hint=hint or "check that the config matches the checkpoint: encoder size, "
                                          "feature_dim, LLM")
    if (missing or (unexpected and not allow_unexpected)) and not allow_partial:
        raise SlideChatError(_refusal(report, len(req)), path=src or None,
                             hint=PARTIAL_HINT if hint is None else hint)
    if matched:
        nn.Module.load_state_dict(module, matched, strict=False)
    if missing or unexpected:
        logger.warning("partial load (allowed): %s" if missing else "unused checkpoint keys ignored: %s",
                       report.summary())
    else:
        logger.info("%s", report.summary())
    return report
