"""The one shim between stock xtuner 0.2.0 / mmengine 0.10.6 and today's transformers, DeepSpeed and torch.

Why it exists and why it is a top-level module: ``xtuner train`` re-executes ``python
xtuner/tools/train.py``, and that file imports xtuner modules that need the names below *before* any
config (and so before any slidechat code) is read. The only hook that runs that early in every
interpreter is a ``.pth`` file in site-packages; ``pip install`` of slidechat puts
``slidechat-stack-compat.pth`` there (see ``setup.py``), whose single line imports this module and
calls :func:`install`. Being top-level keeps that start-up cost to this file alone: the ``slidechat``
package (and torch) are not imported by it.

Each patch is applied lazily, right after the module it concerns is first imported, and only when
the name is really missing, so on the versions that still have it nothing changes:

* ``transformers.utils.is_safetensors_available`` (removed in transformers 5, where safetensors is a
  required dependency; xtuner's ``utils/handle_moe_load_and_save.py`` imports it): returns True.
* ``deepspeed.runtime.fp16.onebit`` (removed in DeepSpeed 0.19; mmengine 0.10.6's DeepSpeed strategy
  imports ``OnebitAdam``, ``OnebitLamb`` and ``ZeroOneAdam`` from it only to register them): a module
  whose three classes refuse to be built, with a message naming the removal. Every other optimizer
  works as before.
* ``torch.cpu.is_bf16_supported`` (absent on torch 2.15; xtuner resolves a DeepSpeed JSON's
  ``"bf16": {"enabled": "auto"}`` through it when no GPU is present): returns False, so "auto" means
  float32 on a CPU, as our CPU training runs are.

``SLIDECHAT_NO_STACK_COMPAT=1`` turns the shim off (to see the stock behaviour).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Callable, Dict, Optional, Sequence

__all__ = ["install", "PATCHES"]


def _patch_transformers_utils(module: types.ModuleType) -> None:
    if not hasattr(module, "is_safetensors_available"):
        def is_safetensors_available() -> bool:
            """safetensors is a hard dependency of transformers >= 5 (shim for xtuner 0.2.0)."""
            return True
        module.is_safetensors_available = is_safetensors_available


def _patch_torch(module: types.ModuleType) -> None:
    cpu = getattr(module, "cpu", None)
    if cpu is not None and not hasattr(cpu, "is_bf16_supported"):
        def is_bf16_supported() -> bool:
            """'auto' bf16 resolves to float32 on a CPU (shim for xtuner 0.2.0's DeepSpeed set-up)."""
            return False
        cpu.is_bf16_supported = is_bf16_supported


class _RemovedOptimizer:
    """Stands for a DeepSpeed optimizer that DeepSpeed itself no longer ships."""

    removed_in = "DeepSpeed 0.19"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{type(self).__name__} was removed in {self.removed_in}; choose another "
                           f"optimizer (e.g. AdamW) in the config")


def _onebit_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "Stand-in for DeepSpeed's removed 1-bit optimizers (slidechat_compat).")
    for cls_name in ("OnebitAdam", "OnebitLamb", "ZeroOneAdam"):
        setattr(module, cls_name, type(cls_name, (_RemovedOptimizer,), {"__module__": name}))
    return module


#: module name -> function applied to the module right after it is imported.
PATCHES: Dict[str, Callable[[types.ModuleType], None]] = {
    "transformers.utils": _patch_transformers_utils,
    "torch": _patch_torch,
}

#: module names that may be missing; when no other finder has them they are created by the factory.
STAND_INS: Dict[str, Callable[[str], types.ModuleType]] = {
    "deepspeed.runtime.fp16.onebit": _onebit_module,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch for that module."""

    def __init__(self, real: importlib.abc.Loader, patch: Callable[[types.ModuleType], None]) -> None:
        self.real = real
        self.patch = patch

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.real.exec_module(module)
        self.patch(module)


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, factory: Callable[[str], types.ModuleType]) -> None:
        self.factory = factory

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.factory(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _CompatFinder(importlib.abc.MetaPathFinder):
    """Asks the other finders first; wraps or stands in only for the names listed above."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target=None):  # type: ignore[no-untyped-def]
        if fullname not in PATCHES and fullname not in STAND_INS:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is not None:
            if fullname in PATCHES and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, PATCHES[fullname])
            return spec
        if fullname in STAND_INS:
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(STAND_INS[fullname]))
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent); patch modules already imported."""
    if os.environ.get("SLIDECHAT_NO_STACK_COMPAT") == "1":
        return
    if any(isinstance(f, _CompatFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CompatFinder())
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
