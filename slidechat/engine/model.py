"""mmengine wrapper around :class:`SlideChatModel` so stock ``xtuner train`` can run both stages.

The core's three children are registered directly on this module (``llm``, ``LongNet_encoder``,
``projector``), so ``state_dict()`` keys are the released checkpoint's names and a file saved here
loads into ``SlideChatModel.load_slidechat_state_dict`` unchanged. ``state_dict()`` keeps what is
trained: encoder + projector always, ``llm.*`` only when the LLM is trained (only the LoRA tensors
when LoRA is used).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from mmengine.model import BaseModel

logger = logging.getLogger(__name__)

CORE_CHILDREN = ("llm", "LongNet_encoder", "projector")


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr`` inside weights-only ``torch.load``, for one use only.

    mmengine pickles the statistics methods of its ``HistoryBuffer`` (``min``, ``max``, ``mean``,
    ``current`` ...) as ``getattr(HistoryBuffer, name)``. Allow-listing the real ``getattr`` would let
    any checkpoint loaded in this process walk from an allowed class to ``eval``; this resolves those
    registered method names on ``HistoryBuffer`` and refuses everything else.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    # the four defaults are only put in _statistics_methods when a first buffer is created
    allowed = {"min", "max", "current", "mean"} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(HistoryBuffer, name)
    import pickle

    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) in a weights-only checkpoint")


def allow_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load``'s weights-only default read mmengine checkpoints (needed for resume).

    torch >= 2.6 loads with ``weights_only=True`` by default; xtuner 0.2.0 (``--resume`` seed lookup)
    and mmengine 0.10 (``runner.resume``) call ``torch.load`` without ``weights_only``, and an
    mmengine checkpoint's message hub holds ``HistoryBuffer`` objects and numpy arrays. These are the
    only extra globals such a file needs; ``builtins.getattr`` is mapped to
    :func:`history_buffer_getattr`, never to the real ``getattr``. Runs when a config imports this
    module, i.e. only in processes that train or load our checkpoints.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore
    import numpy.dtypes as np_dtypes

    dtype_classes = [getattr(np_dtypes, n) for n in dir(np_dtypes) if n.endswith("DType")]
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([HistoryBuffer, np.ndarray, np.dtype, _reconstruct, scalar,
             (history_buffer_getattr, "builtins.getattr")] + dtype_classes)


allow_mmengine_checkpoint_globals()


def to_plain(obj: Any) -> Any:
    """ConfigDict/tuple trees -> plain dicts/lists (dataclass ``from_dict`` methods expect those)."""
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if isinstance(obj, tuple) else [to_plain(v) for v in obj]
    return obj


def build_cfg(obj: Any) -> Any:
    """Build an xtuner-style ``dict(type=..., ...)``; modules/objects pass through."""
    if isinstance(obj, Mapping) and "type" in obj:
        from xtuner.registry import BUILDER

        return BUILDER.build(obj)
    return obj


def summarize_keys(keys: List[str], limit: int = 6) -> str:
    """Short, readable key list: group by the first two name parts, show counts."""
    if not keys:
        return "none"
    groups: "OrderedDict[str, int]" = OrderedDict()
    for k in keys:
        g = ".".join(k.split(".")[:2])
        groups[g] = groups.get(g, 0) + 1
    parts = [f"{g}.* ({n})" if n > 1 else g for g, n in list(groups.items())[:limit]]
    if len(groups) > limit:
        parts.append(f"... {len(groups) - limit} more groups")
    return f"{len(keys)} keys: " + ", ".join(parts)


def resolve_checkpoint(path: str) -> str:
    """A work dir (with mmengine's ``last_checkpoint`` file) -> its latest checkpoint; else ``path``."""
    import os

    marker = os.path.join(path, "last_checkpoint")
    if os.path.isdir(path) and os.path.isfile(marker):
        with open(marker) as f:
            target = f.read().strip()
        if not os.path.exists(target):  # work dir moved since: look beside the marker
            target = os.path.join(path, os.path.basename(target.rstrip("/")))
        logger.info("%s is a work dir: using its last checkpoint %s", path, target)
        return target
    return path


class SlideChatTrainModel(BaseModel):
    """Stage 1 (``freeze_llm=True``): slide encoder + projector trained, LLM frozen in eval mode.
    Stage 2: everything trained, or LoRA adapters on the LLM (``llm_lora``, a peft ``LoraConfig``
    dict). ``pretrained_pth`` (stage-1 weights) is loaded before LoRA is applied and the loaded,
    missing and unexpected keys are logged.
    """

    def __init__(self, llm: Any, slidechat_config: Optional[Mapping] = None, freeze_llm: bool = False,
                 llm_lora: Any = None, pretrained_pth: Optional[str] = None, train_stage: str = "2",
                 compat: Optional[str] = None, use_activation_checkpointing: bool = False,
                 tokenizer: Any = None) -> None:
        super().__init__()
        from slidechat.model.slidechat_model import SlideChatConfig, SlideChatModel

        self.freeze_llm = bool(freeze_llm)
        self.train_stage = str(train_stage)
        self.use_activation_checkpointing = bool(use_activation_checkpointing)
        if self.train_stage == "1" and not self.freeze_llm:
            logger.warning("train_stage='1' with freeze_llm=False: the LLM will be trained")
        cfg_dict = to_plain(slidechat_config or {})
        if compat is not None:
            cfg_dict.setdefault("encoder", {})
            cfg_dict["encoder"] = dict(cfg_dict["encoder"], compat=compat)
        config = SlideChatConfig.from_dict(cfg_dict)
        llm_module = build_cfg(llm)
        if hasattr(llm_module, "config"):
            llm_module.config.use_cache = False
        core = SlideChatModel(llm_module, config)
        self._attach_core(core)

        self.pretrained_report = None
        if pretrained_pth:
            self.pretrained_report = self.load_pretrained(pretrained_pth)

        if self.freeze_llm:
            self.llm.requires_grad_(False)
        self.use_lora = llm_lora is not None
        if self.use_lora:
            self._apply_lora(llm_lora)
        if self.use_activation_checkpointing:
            self._enable_checkpointing()
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.parameters())
        logger.info("SlideChat stage %s: %d of %d parameters trainable (llm %s)", self.train_stage,
                    n_train, n_all, "LoRA" if self.use_lora else ("frozen" if self.freeze_llm else "trained"))

    # ------------------------------------------------------------------ structure
    def _attach_core(self, core: nn.Module) -> None:
        own = set(core.state_dict().keys())
        covered = {k for k in own if k.split(".", 1)[0] in CORE_CHILDREN}
        if own != covered:
            raise RuntimeError(f"SlideChatModel has state outside {CORE_CHILDREN}: "
                               f"{sorted(own - covered)[:5]}")
        object.__setattr__(self, "_core", core)  # not registered: its children are, at top level
        for name in CORE_CHILDREN:
            setattr(self, name, getattr(core, name))

    @property
    def core(self) -> nn.Module:
        """The plain :class:`SlideChatModel` (shares every parameter with this module)."""
        return self._core

    def _set_llm(self, llm: nn.Module) -> None:
        self._core.llm = llm
        self.llm = llm

    def _apply_lora(self, lora_cfg: Any) -> None:
        from slidechat.model.lora import apply_lora

        self._set_llm(apply_lora(self.llm, build_cfg(lora_cfg)))

    def _enable_checkpointing(self) -> None:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        base = self.llm
        base.gradient_checkpointing_enable(**kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LLM weights (for export / inference)."""
        if self.use_lora:
            self._set_llm(self.llm.merge_and_unload())
            self.use_lora = False

    def train(self, mode: bool = True) -> "SlideChatTrainModel":
        super().train(mode)
        self._core.train(mode)
        if mode and self.freeze_llm and not self.use_lora:
            if self.use_activation_checkpointing:
                # HF only checkpoints in train mode: keep it, but switch every dropout off
                for m in self.llm.modules():
                    if isinstance(m, nn.Dropout):
                        m.eval()
                if hasattr(self.llm.config, "attention_dropout"):
                    self.llm.config.attention_dropout = 0.0
            else:
                self.llm.eval()
        return self

    def init_weights(self) -> None:
        """Weights come from the LLM folder, the core's own init and ``pretrained_pth``."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        sd = super().state_dict(*args, **kwargs)
        out = OrderedDict()
        for k, v in sd.items():
            name = k[len(prefix):] if prefix and k.startswith(prefix) else k
            if name.startswith(("LongNet_encoder.", "projector.")):
                out[k] = v
            elif name.startswith("llm."):
                if self.use_lora:
                    if "lora_" in name or "modules_to_save" in name:
                        out[k] = v
                elif not self.freeze_llm:
                    out[k] = v
        return out

    def load_pretrained(self, path: str):
        """Load released-style / our weights into the core and log what matched."""
        from slidechat.engine.builder import load_checkpoint_weights

        path = resolve_checkpoint(path)
        sd = load_checkpoint_weights(path)
        report = self._core.load_slidechat_state_dict(sd)
        missing = list(report.missing) + list(getattr(report, "missing_llm", []))
        unexpected = list(report.unexpected)
        loaded = len(sd) - len(unexpected)
        logger.info("pretrained_pth %s: loaded %d keys; missing %s; unexpected %s", path, loaded,
                    summarize_keys(missing), summarize_keys(unexpected))
        try:
            from mmengine.logging import print_log

            print_log(f"Loaded pretrained_pth {path}: {loaded} keys loaded; missing "
                      f"{summarize_keys(missing)}; unexpected {summarize_keys(unexpected)}", "current")
        except Exception:  # logging only
            pass
        non_llm_missing = [k for k in missing if not k.startswith("llm.")]
        if non_llm_missing:
            logger.warning("pretrained_pth %s lacks slide encoder/projector weights: %s", path,
                           summarize_keys(non_llm_missing))
        return report

    def load_trained_state_dict(self, sd: Mapping[str, torch.Tensor]) -> Dict[str, List[str]]:
        """Load a checkpoint saved by this class (incl. LoRA keys) into it; returns the key report."""
        own = super().state_dict()
        expected = set(self.state_dict().keys())
        unexpected = [k for k in sd if k not in own]
        for k, v in sd.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise RuntimeError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model "
                                   f"{tuple(own[k].shape)}")
        result = super().load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        missing = sorted(k for k in expected if k not in sd)
        del result
        return {"missing": missing, "unexpected": unexpected}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):
        """What ``xtuner test`` (``strict=False``) and DeepSpeed resume call: never silent.

        Accepts our checkpoints (LoRA keys included) and released-style dicts (plain ``llm.model.*``
        names are mapped onto a peft-wrapped LLM). A shape mismatch raises; missing and unexpected
        keys are logged. "Missing" means keys of this module's ``state_dict()`` (the trained ones)
        absent from the checkpoint; with ``strict=True`` any such key or any unexpected key raises.
        """
        from torch.nn.modules.module import _IncompatibleKeys

        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        own = super().state_dict()
        direct = {k: v for k, v in sd.items() if k in own}
        bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
               for k, v in direct.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise RuntimeError("checkpoint shapes do not match the model: " + "; ".join(bad[:20]))
        # released-style names (llm.model.* onto a LoRA-wrapped LLM, ...) go through the core's mapper,
        # which also raises on shape mismatch
        rest = {k: v for k, v in sd.items() if k not in own}
        unexpected: List[str] = []
        if rest:
            rep = self._core.load_slidechat_state_dict(rest, strict_slide=False)
            unexpected = list(rep.unexpected)
        super().load_state_dict(direct, strict=False, assign=assign)
        loaded = len(sd) - len(unexpected)
        from slidechat.model.slidechat_model import _canonical_llm_key

        canon = {_canonical_llm_key(k) for k in sd}
        missing = sorted(k for k in self.state_dict() if k not in sd and _canonical_llm_key(k) not in canon)
        msg = (f"load_state_dict: {loaded} of {len(sd)} checkpoint tensors loaded; missing "
               f"{summarize_keys(missing)}; unexpected {summarize_keys(unexpected)}")
        level = logging.WARNING if (missing or unexpected) else logging.INFO
        logger.log(level, msg)
        try:
            from mmengine.logging import print_log

            print_log(msg, "current", level=level)
        except Exception:  # logging only
            pass
        if not any(k.startswith(("LongNet_encoder.", "projector.")) for k in sd):
            logger.warning("the checkpoint holds no slide encoder/projector weights: they stay as "
                           "initialised (random unless pretrained_pth loaded them)")
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing "
                               f"{summarize_keys(missing)}; unexpected {summarize_keys(unexpected)}")
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ forward
    def forward(self, data: Dict[str, Any], data_samples: Any = None, mode: str = "loss") -> Any:
        if mode == "loss":
            out = self._core(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                             features=data["features"], coords=data.get("coords"),
                             labels=data["labels"])
            return {"loss": out.loss}
        if mode == "tensor":
            out = self._core(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                             features=data["features"], coords=data.get("coords"))
            return out.logits
        if mode == "predict":
            return self.predict(data, data_samples)
        raise NotImplementedError(f"unknown mode '{mode}'")

    @torch.no_grad()
    def predict(self, data: Dict[str, Any], data_samples: Any = None, **gen_kwargs: Any) -> List[Any]:
        """Greedy generation per row of a collated batch (prompt rows, right-padded)."""
        rows = [ids[mask.bool()] for ids, mask in zip(data["input_ids"], data["attention_mask"])]
        return self._core.generate(rows, data["features"], coords=data.get("coords"), **gen_kwargs)
