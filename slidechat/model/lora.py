"""LoRA on the LLM through peft, robust to a bitsandbytes that is installed but cannot import.

xtuner 0.2.0 pins bitsandbytes 0.45.0, which fails to import next to the triton that current torch
ships (``No module named 'triton.ops'``). peft only checks that the package is *installed* and then
imports it while wrapping layers, so ``get_peft_model`` crashes even for plain fp32/bf16 LoRA.
When bitsandbytes cannot be imported we tell peft it is absent; quantized (4/8-bit) LLMs still need
a working bitsandbytes and fail with its own error. The import's CPU-only notice is one of the
known-noise messages silenced in :mod:`slidechat.utils.quiet`.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Iterable, Optional

from torch import nn

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def bitsandbytes_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or errors raised by its own import-time checks
        # debug, not warning: plain LoRA does not need bitsandbytes, and a 4/8-bit LLM fails with
        # bitsandbytes' own import error; a warning here was printed by every LoRA run (issue 16)
        logger.debug("bitsandbytes is installed but cannot be imported (%s: %s); LoRA runs "
                     "without it (no 4/8-bit layers)", type(e).__name__, e)
        return False
    return True


def _hide_broken_bitsandbytes_from_peft() -> None:
    if bitsandbytes_importable():
        return
    import peft.import_utils  # noqa: F401  (load the module tree before patching its names)
    import peft.tuners.lora.model  # noqa: F401

    def unavailable() -> bool:
        return False

    for name, mod in list(sys.modules.items()):
        if name == "peft" or name.startswith("peft."):
            for fn in ("is_bnb_available", "is_bnb_4bit_available"):
                if hasattr(mod, fn):
                    setattr(mod, fn, unavailable)


def default_lora_targets(llm: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list:
    """Every Linear layer's short name except the output head (what QLoRA-style recipes target)."""
    excluded = tuple(exclude)
    return sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules()
                   if isinstance(m, nn.Linear) and not any(x in n for x in excluded)})


def apply_lora(llm: nn.Module, lora_config: Any, target_modules: Optional[Iterable[str]] = None) -> nn.Module:
    """Wrap ``llm`` with peft LoRA (``lora_config``: a ``peft.LoraConfig``)."""
    from peft import get_peft_model

    _hide_broken_bitsandbytes_from_peft()
    if target_modules is not None:
        lora_config.target_modules = list(target_modules)
    elif getattr(lora_config, "target_modules", None) is None:
        lora_config.target_modules = default_lora_targets(llm)
    return get_peft_model(llm, lora_config)
