"""Every Hugging Face ``from_pretrained`` of the project goes through here: one rule for untrusted folders.

A model folder is data, not code. Two rules, the same for every entry point (``chat``, ``infer``,
``screen``, ``test``, ``export``, training configs):

- **No folder code unless the user asks.** ``trust_remote_code`` is passed explicitly -- ``False`` unless
  the user gave ``--trust-remote-code`` -- never ``None``: with ``None`` transformers asks on stdin
  whether to run a folder's ``auto_map`` code, and ``slidechat chat`` would feed it the user's first
  question. A folder that cannot load without its own code is a one-line error naming the flag.
- **A model folder must hold the model's weights.** Models load with ``output_loading_info=True``;
  weights missing from the folder's files (they would stay random), unexpected or of the wrong shape
  are a one-line error naming the folder and a few key names, unless the command's partial-load opt-in
  (``--allow-partial``, :data:`~slidechat.model.checkpoint.PARTIAL_HINT`) is given (then one warning).
  Weights tied by the model's config (``lm_head`` to the embeddings) count as present.

Configs use :class:`CheckedCausalLM` / :class:`CheckedTokenizer` / :class:`CheckedProcessor` (their
``from_pretrained`` is a drop-in for ``AutoModelForCausalLM.from_pretrained`` & co. in xtuner-style
``dict(type=..., ...)``); :func:`harden_config` rewrites a config that still names the transformers
classes, so older configs get the same rules under ``slidechat`` commands.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any, Iterator, Optional, Tuple

from slidechat.model.checkpoint import PARTIAL_HINT, summarize_keys
from slidechat.utils.errors import SlideChatError, exception_text, one_line
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

#: the command-line opt-in (every command that loads a Hugging Face folder has it)
TRUST_FLAG = "--trust-remote-code"
TRUST_HINT = (f"{TRUST_FLAG} runs it; give it only for a folder whose Python files you have read; "
              "in a config: --cfg-options ...trust_remote_code=True")
_TRANSFORMERS_LOGGERS = ("transformers.modeling_utils",)


def _is_trust_refusal(exc: BaseException) -> bool:
    """transformers' refusal to load a folder that needs its own code (``trust_remote_code`` False)."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def _where(name_or_path: PathLike) -> str:
    return os.fspath(name_or_path)


@contextlib.contextmanager
def _quiet_load_warnings() -> Iterator[None]:
    """transformers' multi-line "Some weights ... were not initialized" warnings: this module reports
    missing/unexpected weights itself (one line, refused or warned), so they are held back meanwhile."""
    saved = []
    for name in _TRANSFORMERS_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _call(what: str, name_or_path: PathLike, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with transformers' errors turned into one SlideChatError line."""
    try:
        return fn(*args, **kwargs)
    except SlideChatError:
        raise
    except Exception as e:  # noqa: BLE001 - untrusted folder: any failure is the folder's, told in one line
        if _is_trust_refusal(e):
            raise SlideChatError(f"the {what} asks to run its own Python code (auto_map), which is off by "
                                 "default", _where(name_or_path), hint=TRUST_HINT) from None
        raise SlideChatError(f"cannot load the {what}: {one_line(exception_text(e), limit=300)}",
                             _where(name_or_path)) from None


def check_loading_info(info: Mapping[str, Any], name_or_path: PathLike, n_model_keys: int,
                       allow_partial: bool = False) -> None:
    """Refuse (or, with ``allow_partial``, warn about) weights the folder lacks, has extra, or has in
    the wrong shape -- transformers would leave missing ones random and only log a warning."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m[0]) for m in (info.get("mismatched_keys") or []))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"its weights files lack {len(missing)} of the model's {n_model_keys} weights, which "
                     f"would stay random ({summarize_keys(missing, limit=3)})")
    if unexpected:
        parts.append(f"they hold weights the model has no place for ({summarize_keys(unexpected, limit=3)})")
    if mismatched:
        parts.append(f"weights of the wrong shape ({summarize_keys(mismatched, limit=3)})")
    reason = "; ".join(parts)
    if allow_partial and not mismatched:
        logger.warning("%s: %s; loaded anyway (--allow-partial)", _where(name_or_path), reason)
        return
    raise SlideChatError(f"not a complete model folder: {reason}", _where(name_or_path),
                         hint=None if mismatched else PARTIAL_HINT)


def load_model(model_class: Any, pretrained_model_name_or_path: PathLike, *,
               trust_remote_code: Optional[bool] = False, allow_partial: bool = False,
               **kwargs: Any) -> Any:
    """``model_class.from_pretrained(folder, **kwargs)`` under this module's two rules.

    ``model_class``: a transformers model or Auto class (``AutoModelForCausalLM``,
    ``Qwen2VLForConditionalGeneration``, ...). ``trust_remote_code``: the user's opt-in (``None`` is
    taken as ``False``). ``allow_partial``: the command's partial-load opt-in.
    """
    kwargs.pop("output_loading_info", None)
    with _quiet_load_warnings():
        model, info = _call("model", pretrained_model_name_or_path, model_class.from_pretrained,
                            os.fspath(pretrained_model_name_or_path),
                            trust_remote_code=bool(trust_remote_code), output_loading_info=True, **kwargs)
    check_loading_info(info, pretrained_model_name_or_path, len(model.state_dict()), allow_partial)
    return model


def load_tokenizer(pretrained_model_name_or_path: PathLike, *, trust_remote_code: Optional[bool] = False,
                   **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` that never runs or asks about folder code unless opted in."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is loaded

    return _call("tokenizer", pretrained_model_name_or_path, AutoTokenizer.from_pretrained,
                 os.fspath(pretrained_model_name_or_path), trust_remote_code=bool(trust_remote_code),
                 **kwargs)


def load_processor(pretrained_model_name_or_path: PathLike, *, trust_remote_code: Optional[bool] = False,
                   **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained`` that never runs or asks about folder code unless opted in."""
    from transformers import AutoProcessor  # heavy import, only when a processor is loaded

    return _call("processor", pretrained_model_name_or_path, AutoProcessor.from_pretrained,
                 os.fspath(pretrained_model_name_or_path), trust_remote_code=bool(trust_remote_code),
                 **kwargs)


# ------------------------------------------------------------------------------------- config entry points
# Bound classmethods, like the transformers ``from_pretrained`` they replace: ``xtuner test`` turns plain
# functions of a config into registry names (``register_function``) but leaves bound methods as they are.

class CheckedCausalLM:
    """Config drop-in for ``AutoModelForCausalLM``: ``dict(type=CheckedCausalLM.from_pretrained, ...)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *,
                        trust_remote_code: Optional[bool] = False, allow_partial: bool = False,
                        **kwargs: Any) -> Any:
        """A causal LM under this module's rules (refuses folder code and missing weights)."""
        from transformers import AutoModelForCausalLM  # heavy import, only when a model is built

        return load_model(AutoModelForCausalLM, pretrained_model_name_or_path,
                          trust_remote_code=trust_remote_code, allow_partial=allow_partial, **kwargs)


class CheckedTokenizer:
    """Config drop-in for ``AutoTokenizer``: ``dict(type=CheckedTokenizer.from_pretrained, ...)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *,
                        trust_remote_code: Optional[bool] = False, **kwargs: Any) -> Any:
        """A tokenizer that never runs folder code unless opted in."""
        return load_tokenizer(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)


class CheckedProcessor:
    """Config drop-in for ``AutoProcessor``: ``dict(type=CheckedProcessor.from_pretrained, ...)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *,
                        trust_remote_code: Optional[bool] = False, **kwargs: Any) -> Any:
        """A processor that never runs folder code unless opted in."""
        return load_processor(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)


_CHECKED = (CheckedCausalLM.from_pretrained, CheckedTokenizer.from_pretrained,
            CheckedProcessor.from_pretrained)
_REPLACEMENTS = {"AutoModelForCausalLM": CheckedCausalLM.from_pretrained,
                 "AutoTokenizer": CheckedTokenizer.from_pretrained,
                 "AutoProcessor": CheckedProcessor.from_pretrained}


def _hf_loader(fn: Any) -> Tuple[bool, Optional[Any]]:
    """``(is a Hugging Face / checked loader, its checked replacement or None)`` for a config ``type``."""
    if any(fn == c for c in _CHECKED):
        return True, None
    owner = getattr(fn, "__self__", None)
    if getattr(fn, "__name__", None) != "from_pretrained" or not isinstance(owner, type):
        return False, None
    if not (owner.__module__ or "").startswith("transformers"):
        return False, None
    return True, _REPLACEMENTS.get(owner.__name__)


def _as_config_value(fn: Any, original: Any) -> Any:
    """``fn`` in the form of the value it replaces: a lazy import when the config was read in mmengine's
    lazy-import mode (its text dump needs one), the bound method itself otherwise."""
    if type(original).__module__ == "mmengine.config.lazy":
        from mmengine.config.lazy import LazyObject  # only reached for configs mmengine has read

        return getattr(LazyObject(__name__, fn.__self__.__name__), fn.__name__)
    return fn


def harden_config(node: Any, trust_remote_code: bool = False, allow_partial: bool = False) -> int:
    """Walk a config (``mmengine`` Config / dicts / lists) and put every Hugging Face loader dict under
    this module's rules: ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``AutoProcessor`` become their
    checked drop-ins, and ``trust_remote_code`` is set explicitly on every loader -- ``True`` with the
    user's flag or where the config itself says ``True`` (a config is Python the user chose to run),
    ``False`` otherwise (never left ``None``, which would ask on stdin). ``allow_partial`` (the
    command's ``--allow-partial``) is passed on to the checked model loaders. Returns the number of
    loaders."""
    count = 0
    if isinstance(node, MutableMapping):
        if "type" in node:
            is_hf, replacement = _hf_loader(node["type"])
            if is_hf:
                count += 1
                if replacement is not None:
                    raw = dict.get(node, "type") if isinstance(node, dict) else node["type"]  # lazy or not
                    node["type"] = _as_config_value(replacement, raw)
                node["trust_remote_code"] = bool(trust_remote_code) or node.get("trust_remote_code") is True
                if allow_partial and node["type"] == CheckedCausalLM.from_pretrained:
                    node["allow_partial"] = True
        for value in list(node.values()):
            count += harden_config(value, trust_remote_code, allow_partial)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += harden_config(value, trust_remote_code, allow_partial)
    return count
