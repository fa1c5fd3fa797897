"""Read model weights from the checkpoint layouts SlideChat runs produce, without unsafe unpickling.

Handles ``.safetensors``, torch ``.pth/.pt/.bin`` (plain dicts, mmengine ``{"state_dict", "meta",
"message_hub"}`` wrappers) and DeepSpeed checkpoint folders (``iter_N.pth/mp_rank_00_model_states.pt`` with
the weights under ``module``). Pickled metadata may reference arbitrary classes; those are never imported or
called: the weights-only unpickler is tried first, then a restricted unpickler that rebuilds tensors and
plain containers only and turns every other class into an inert placeholder.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import Tensor

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_DS_MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_WRAPPER_KEYS = ("state_dict", "module", "model")


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


def _torch_load(path: Path, allow_unsafe_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first_error = exc
    except RuntimeError as exc:  # some torch versions wrap the unpickling error
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise SlideChatError(f"cannot read checkpoint: {exc}", path=path) from exc
        first_error = exc
    logger.info("%s holds non-tensor metadata; extracting tensors with a restricted unpickler", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not loadable safely"
        if allow_unsafe_pickle:
            logger.warning("loading %s with full unpickling (allow_unsafe_pickle=True)", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise SlideChatError(
            f"cannot load checkpoint safely (weights-only: {first_error}; restricted: {exc})", path=path,
            hint="re-save it as safetensors, or pass allow_unsafe_pickle=True if you trust the file") from exc


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


def load_state_dict_file(path: PathLike, allow_unsafe_pickle: bool = False) -> Dict[str, Tensor]:
    """Weights of a checkpoint file or DeepSpeed folder as a flat ``{name: tensor}`` dict on CPU."""
    p = Path(path)
    if not p.exists():
        raise SlideChatError("checkpoint not found", path=p)
    if p.is_dir():
        for name in _DS_MODEL_FILES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            found = sorted(x.name for x in p.iterdir())[:10]
            raise SlideChatError(f"folder is not a DeepSpeed checkpoint (no {_DS_MODEL_FILES[0]}; has {found})",
                                 path=path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise SlideChatError(f"cannot read safetensors file: {exc}", path=p) from exc
    elif p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = _unwrap(_torch_load(p, allow_unsafe_pickle), p)
    else:
        raise SlideChatError(f"unknown checkpoint type {p.suffix!r}", path=p,
                             hint="expected .safetensors, .pth, .pt, .bin or a DeepSpeed folder")
    sd = _strip_module_prefix(dict(sd))
    if not isinstance(sd, (dict, collections.OrderedDict)) or not sd:
        raise SlideChatError("checkpoint holds no weights", path=p)
    return sd
