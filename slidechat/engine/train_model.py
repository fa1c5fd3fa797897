"""mmengine wrapper around :class:`SlideChatModel` so stock ``xtuner train`` can run both stages.

The core's children are registered directly on this module (``llm``, ``input_proj``,
``LongNet_encoder``, ``projector``), so ``state_dict()`` keys are the released checkpoint's names and a
file saved here loads into ``SlideChatModel.load_slidechat_state_dict`` unchanged. ``state_dict()`` keeps
what is trained: the slide modules always (input projection when the features are wider or narrower than
the encoder, encoder, projector), ``llm.*`` only when the LLM is trained (only the LoRA tensors when LoRA
is used).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from mmengine.model import BaseModel

from slidechat.data.template import config_template
from slidechat.model.checkpoint import (CheckpointKind, KeyReport, ResolvedCheckpoint, pickle_refusal,
                                        read_checkpoint, resolve_checkpoint)
from slidechat.model.lora import apply_lora
from slidechat.model.recompute import enable_activation_checkpointing
from slidechat.model.slidechat_model import (CORE_CHILDREN, OPTIONAL_SLIDE_KEYS, SLIDE_PREFIXES, SlideChatConfig,
                                             SlideChatModel)
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)


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


def mmengine_checkpoint_globals() -> List[Any]:
    """The non-tensor globals a genuine mmengine/xtuner training checkpoint holds, and nothing more.

    Read off the weights-only unpickler's refusals on checkpoints our own training writes: the message
    hub's ``HistoryBuffer`` (its statistics methods pickled as ``getattr(HistoryBuffer, name)``, mapped
    to :func:`history_buffer_getattr`, never to the real ``getattr``), the numpy arrays and scalars it
    and ``runtime_info`` keep (``ndarray``, ``_reconstruct``, ``scalar``, ``dtype``) and the dtype
    classes of numbers (bool, integers, floats, complex; not object, string or structured dtypes).
    ``collections.OrderedDict``, tensors and plain containers are allowed by torch already.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore

    numeric_dtypes = list(dict.fromkeys(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"))
    return [HistoryBuffer, np.ndarray, np.dtype, _reconstruct, scalar,
            (history_buffer_getattr, "builtins.getattr"), *numeric_dtypes]


def allow_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load``'s weights-only default read genuine mmengine checkpoints (needed for resume).

    torch >= 2.6 loads with ``weights_only=True`` by default; xtuner 0.2.0 (``--resume`` seed lookup)
    and mmengine 0.10 (``runner.resume``) call ``torch.load`` without ``weights_only``. Those two are
    replaced by :func:`load_training_checkpoint` / :func:`safe_seed_from_checkpoint` when
    :func:`install_safe_xtuner_loader` runs; the process-wide allow-list
    (:func:`mmengine_checkpoint_globals`, classes that cannot run code) covers any module that bound
    the originals before that. Runs when a config is parsed (see ``configs/tiny/stage_1.py``) or this
    module is imported, i.e. only in processes that train or load our checkpoints.
    """
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(mmengine_checkpoint_globals())


allow_mmengine_checkpoint_globals()


RESUME_HINT = ("resume only from a checkpoint this training wrote (WORK_DIR/epoch_N.pth or iter_N.pth); to start "
               "from other weights use model.pretrained_pth, which reads tensors only")


def _scoped_safe_globals(extra_globals: Sequence[Any]) -> Any:
    """``torch.serialization.safe_globals`` for the entries of ``extra_globals`` not already allowed.

    safe_globals' exit removes what it was given, even entries allowed process-wide before it
    (:func:`allow_mmengine_checkpoint_globals`): passing those too would make the first load silently
    take the process-wide allow-list away from every later ``torch.load``.
    """
    already = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals([g for g in extra_globals if g not in already])


def _weights_only_load(path: str, map_location: Any, extra_globals: Sequence[Any], what: str) -> Any:
    """``torch.load(weights_only=True)`` with ``extra_globals`` allowed for this call; a refusal or an
    unreadable file is a one-line :class:`SlideChatError` (nothing in the file has run)."""
    import pickle

    try:
        with _scoped_safe_globals(extra_globals):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SlideChatError(f"{what} holds a non-tensor Python object outside the allow-list of the "
                             f"framework's own classes ({pickle_refusal(exc)}); refused, nothing in it was run",
                             path=path, hint=RESUME_HINT) from None
    except (RuntimeError, EOFError, ValueError) as exc:  # truncated / not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlideChatError(f"cannot read {what}: {first}", path=path) from None


def load_training_checkpoint(filename: Union[str, os.PathLike], map_location: Any = None) -> Any:
    """mmengine's loader for local checkpoint files (``runner.resume``, ``load_from``), weights-only.

    Replaces ``mmengine.runner.checkpoint.load_from_local`` (``torch.load`` with torch's default): the
    framework's own classes (:func:`mmengine_checkpoint_globals`) are allowed, everything else is a
    one-line error. A missing file stays mmengine's ``FileNotFoundError``.
    """
    path = os.path.expanduser(os.fspath(filename))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} can not be found.")
    return _weights_only_load(path, map_location, mmengine_checkpoint_globals(), "training checkpoint")


def safe_seed_from_checkpoint(pth_model: Union[str, os.PathLike]) -> Any:
    """Drop-in for ``xtuner.tools.utils.get_seed_from_checkpoint`` (``xtuner train --resume``): the seed
    of a checkpoint file or DeepSpeed folder, read weights-only with the framework's classes allowed."""
    path = os.fspath(pth_model)
    if os.path.isdir(path):
        states = sorted(glob.glob(os.path.join(path, "*_model_states.pt")))  # what DeepSpeed looks for
        if not states:
            raise SlideChatError("resume folder holds no DeepSpeed *_model_states.pt", path=path,
                                 hint=RESUME_HINT)
        ckpt = _weights_only_load(states[0], "cpu", mmengine_checkpoint_globals()
                                  + _deepspeed_checkpoint_globals(), "DeepSpeed checkpoint")
    elif os.path.isfile(path):
        ckpt = load_training_checkpoint(path, "cpu")
    else:
        raise SlideChatError("resume checkpoint not found", path=path)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "seed" not in meta:
        raise SlideChatError("not an mmengine training checkpoint (no meta.seed)", path=path, hint=RESUME_HINT)
    return meta["seed"]


# ------------------------------------------------------------------------------------ xtuner's loader

#: the key under which :class:`CheckpointWeights` hands its source to ``_load_from_state_dict``
SOURCE_METADATA_KEY = "slidechat_source"


class _SourceMetadata(dict):
    """torch's per-prefix load metadata (``state_dict._metadata``), the same for every prefix: the
    checkpoint's path, so it reaches our ``_load_from_state_dict`` below any wrapper's prefix."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def get(self, key: Any, default: Any = None) -> Dict[str, str]:  # noqa: ARG002 - any prefix
        return {SOURCE_METADATA_KEY: self.source}


class CheckpointWeights(dict):
    """Weights read by :func:`safe_guess_load_checkpoint`, carrying the checkpoint they came from to the
    model's ``load_state_dict`` (``xtuner test`` passes nothing else), which names it in its report.

    torch's and mmengine's ``load_state_dict`` copy the dict but keep its ``_metadata``; the source rides
    there too, for loads through a wrapper (``DistributedDataParallel``)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], source: ResolvedCheckpoint) -> None:
        super().__init__(weights)
        self.source = source
        self._metadata = _SourceMetadata(os.fspath(source.path))


def safe_guess_load_checkpoint(pth_model: PathLike) -> CheckpointWeights:
    """Drop-in for ``xtuner.model.utils.guess_load_checkpoint`` that never unpickles code.

    xtuner's own reads ``.pth`` files with ``torch.load(weights_only=False)`` (and DeepSpeed folders
    likewise), so a crafted checkpoint given to ``xtuner test CONFIG --checkpoint X`` would run code.
    This is that command's entry: the path is resolved once and read through
    :func:`load_checkpoint_weights` (safetensors / weights-only / restricted unpickler; files, DeepSpeed
    folders, work dirs, exported folders).
    """
    checkpoint = resolve_checkpoint(pth_model)
    return CheckpointWeights(load_checkpoint_weights(checkpoint), checkpoint)


_DS_ENGINE_MODULE = "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine"
#: the non-tensor classes DeepSpeed (ZeRO 1-3, bf16/fp16) pickles into its checkpoints under mmengine
_DS_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
               ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
               ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
               # the engine's config, saved as ``ds_config`` in every model-states file: mmengine's
               # DeepSpeedStrategy hands DeepSpeed its JSON as a ConfigDict (a dict of plain values)
               ("mmengine.config.config", ("ConfigDict",)))


def _deepspeed_checkpoint_globals() -> List[Any]:
    import importlib

    out: List[Any] = []
    for module, names in _DS_GLOBALS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


@contextlib.contextmanager
def _reading_deepspeed_files(path: Union[str, os.PathLike]) -> Iterator[None]:
    """Weights-only ``torch.load`` inside allows the few DeepSpeed classes DeepSpeed's files hold and
    mmengine's message-hub classes (:func:`mmengine_checkpoint_globals`); any other object in a file is a
    one-line error naming ``path``, never executed."""
    import pickle

    try:
        with _scoped_safe_globals(_deepspeed_checkpoint_globals() + mmengine_checkpoint_globals()):
            yield
    except pickle.UnpicklingError as exc:
        raise SlideChatError(f"refusing to load a DeepSpeed checkpoint file with objects outside the "
                             f"allow-list ({pickle_refusal(exc)}); nothing in it was run", path=path,
                             hint="only DeepSpeed's and mmengine's own checkpoint classes are read") from None


def safe_deepspeed_load(self: Any, path: str, map_location: Any = None) -> Any:
    """Drop-in for DeepSpeed's ``TorchCheckpointEngine.load`` (``torch.load(weights_only=False)``), which
    ``--deepspeed ... --resume`` uses for the model and optimizer-state files (see
    :func:`_reading_deepspeed_files`)."""
    with _reading_deepspeed_files(path):
        return torch.load(path, map_location=map_location, weights_only=True)


#: DeepSpeed's name for a ZeRO-3 model-states file (``DeepSpeedEngine._get_ckpt_name``: partitioned weights
#: -> ``zero_pp_rank_{dp}_mp_rank_{mp}_model_states.pt``); such a file holds 0-element placeholders only
_ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_*_model_states.pt"


class _WeightsOnlyTorch:
    """``torch`` as DeepSpeed's ``zero_to_fp32`` sees it while we consolidate: its ``torch.load`` calls
    (``weights_only=False``) become weights-only loads; every other name is torch's own."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return torch.load(f, *args, **kwargs)


def is_zero3_folder(path: Union[str, os.PathLike]) -> bool:
    """A DeepSpeed ZeRO-3 checkpoint folder (``WORK_DIR/epoch_N.pth/`` written under ZeRO stage 3)."""
    return os.path.isdir(path) and bool(glob.glob(os.path.join(os.fspath(path), _ZERO3_MODEL_STATES)))


def consolidate_zero3(folder: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The trained weights of a ZeRO-3 folder, gathered from its optimizer-state partitions in float32.

    Under ZeRO-3 the model-states file keeps 0-element placeholders; the weights live in the fp32 flat
    partitions of ``*_optim_states.pt``. DeepSpeed's own ``zero_to_fp32`` (the script it also copies into
    the work dir) gathers them; it is run here with every file read weights-only (DeepSpeed's and
    mmengine's checkpoint classes allowed, nothing else), and frozen parameters excluded, as saved.
    """
    import io
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    folder = os.path.abspath(os.fspath(folder))
    chatter = io.StringIO()  # zero_to_fp32 prints its progress
    try:
        with _reading_deepspeed_files(folder), mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()), \
                contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                os.path.dirname(folder), tag=os.path.basename(folder), exclude_frozen_parameters=True)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlideChatError(f"cannot consolidate ZeRO-3 checkpoint: {first}", path=folder,
                             hint="it needs every rank's *_optim_states.pt of that step") from None
    logger.info("consolidated ZeRO-3 checkpoint %s: %d tensors", folder, len(sd))
    return {k: v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_checkpoint_weights(checkpoint: ResolvedCheckpoint) -> Dict[str, torch.Tensor]:
    """:func:`slidechat.model.checkpoint.read_checkpoint`, plus ZeRO-3 folders
    (:func:`consolidate_zero3`), whose model-states file alone holds no weights."""
    if checkpoint.kind is CheckpointKind.DEEPSPEED and is_zero3_folder(checkpoint.path):
        return consolidate_zero3(checkpoint.path)
    return read_checkpoint(checkpoint)


def zero3_gathered(module: nn.Module) -> Any:
    """A context in which ``module``'s ZeRO-3-partitioned parameters are whole and writable.

    Under ``--deepspeed`` ZeRO-3, xtuner's strategy registers transformers' ``HfDeepSpeedConfig``, so the
    LLM is built partitioned (``deepspeed.zero.Init``: each parameter a 0-element placeholder with a
    ``ds_id``) before ``pretrained_pth`` is read. Full weights (e.g. ``llm.*`` of a stage-2 checkpoint)
    are copied in while DeepSpeed's ``GatheredParameters`` holds them gathered; rank 0's values are
    partitioned again on exit. Without partitioned parameters this is a no-op.
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def _one_line_slidechat_errors(exc_type: Any, exc: BaseException, tb: Any) -> None:
    if isinstance(exc, SlideChatError):
        print(f"slidechat: error: {exc}", file=sys.stderr)
        return
    _previous_excepthook(exc_type, exc, tb)


_previous_excepthook = sys.excepthook


def _replace_everywhere(module_name: str, name: str, replacement: Any) -> None:
    """``module_name.name`` -> ``replacement``, also in every loaded module that bound the original with
    ``from module_name import name``. Module dicts are edited directly (no ``getattr`` on lazy modules)."""
    home = sys.modules.get(module_name)
    original = vars(home).get(name) if home is not None else None
    if original is None or original is replacement:
        return
    setattr(home, name, replacement)
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if isinstance(d, dict) and d.get(name) is original:
            d[name] = replacement


def install_safe_xtuner_loader() -> None:
    """Make stock xtuner tools (``xtuner test``, ``xtuner train --resume``) read checkpoints safely.

    xtuner tools run as ``__main__`` and bind their loaders at import, then parse the config; parsing
    one of our configs imports this module (see ``configs/tiny/stage_1.py``), which runs this function:

    * ``guess_load_checkpoint`` (``xtuner test --checkpoint``) -> :func:`safe_guess_load_checkpoint`;
    * ``get_seed_from_checkpoint`` (``xtuner train --resume``, read before the model is built) ->
      :func:`safe_seed_from_checkpoint`;
    * mmengine's loader for local files (``runner.resume``, ``load_from``) ->
      :func:`load_training_checkpoint`;
    * DeepSpeed's ``TorchCheckpointEngine.load`` (``--deepspeed ... --resume``) ->
      :func:`safe_deepspeed_load`.

    Each module already holding an original gets the replacement too. It runs again when
    :class:`SlideChatTrainModel` is built, i.e. before the model's checkpoint is read. Under an xtuner
    tool a :class:`SlideChatError` escaping to the top is printed as one line (exit status 1, as
    Python's default hook), without the traceback.
    """
    ds_engine = sys.modules.get(_DS_ENGINE_MODULE)  # mmengine.runner imports DeepSpeed when installed
    if ds_engine is not None and getattr(ds_engine, "TorchCheckpointEngine", None) is not None:
        ds_engine.TorchCheckpointEngine.load = safe_deepspeed_load
    mm_ckpt = sys.modules.get("mmengine.runner.checkpoint")
    if mm_ckpt is not None and vars(mm_ckpt).get("CheckpointLoader") is not None:
        mm_ckpt.CheckpointLoader.register_scheme(prefixes="", loader=load_training_checkpoint, force=True)
    _replace_everywhere("xtuner.model.utils", "guess_load_checkpoint", safe_guess_load_checkpoint)
    _replace_everywhere("xtuner.tools.utils", "get_seed_from_checkpoint", safe_seed_from_checkpoint)
    main_file = os.fspath(getattr(sys.modules.get("__main__"), "__file__", "") or "")
    if os.path.join("xtuner", "tools") in main_file and sys.excepthook is _previous_excepthook:
        sys.excepthook = _one_line_slidechat_errors


install_safe_xtuner_loader()


def _print_log(msg: str, level: int = logging.INFO) -> None:
    """To the mmengine run log (file + console) when a runner exists, else to ``logging``."""
    try:
        from mmengine.logging import MMLogger, print_log

        if MMLogger._instance_dict:  # a runner (or mmengine code) set up its logger: use it
            print_log(msg, "current", level=level)
            return
    except Exception:  # noqa: BLE001 - logging only
        pass
    logger.log(level, msg)


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


class SlideChatTrainModel(BaseModel):
    """Stage 1 (``freeze_llm=True``): slide encoder + projector trained, LLM frozen in eval mode.
    Stage 2: everything trained, or LoRA adapters on the LLM (``llm_lora``, a peft ``LoraConfig``
    dict). ``pretrained_pth`` (stage-1 weights) is loaded before LoRA is applied, through the strict
    key check of :mod:`slidechat.model.checkpoint`: it must hold the slide encoder and projector.

    ``allow_partial`` (config key ``model.allow_partial``) accepts checkpoints lacking required weights
    or holding unexpected ones, with a warning, for ``pretrained_pth`` and for
    :meth:`load_state_dict` (what ``xtuner test`` calls); shape mismatches stay errors.
    """

    def __init__(self, llm: Any, slidechat_config: Optional[Mapping] = None, freeze_llm: bool = False,
                 llm_lora: Any = None, pretrained_pth: Optional[str] = None, train_stage: str = "2",
                 compat: Optional[str] = None, use_activation_checkpointing: bool = False,
                 tokenizer: Any = None, allow_partial: bool = False) -> None:
        super().__init__()
        install_safe_xtuner_loader()  # before any checkpoint is read in this process (see there)
        self.allow_partial = bool(allow_partial)
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
        config_template(config.prompt_template, config.chat_template_kwargs)  # refused before the LLM loads
        llm_module = build_cfg(llm)
        if hasattr(llm_module, "config"):
            llm_module.config.use_cache = False
        core = SlideChatModel(llm_module, config)
        self._attach_core(core)

        self.pretrained_report = None
        self.use_lora = False  # LoRA is applied after pretrained_pth (state_dict() reads this)
        if pretrained_pth:
            self.pretrained_report = self.load_pretrained(pretrained_pth, allow_partial=allow_partial)

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
        self._set_llm(apply_lora(self.llm, build_cfg(lora_cfg)))

    def _enable_checkpointing(self) -> None:
        enable_activation_checkpointing(self.llm)

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
            if name.startswith(SLIDE_PREFIXES):
                out[k] = v
            elif name.startswith("llm."):
                if self.use_lora:
                    if "lora_" in name or "modules_to_save" in name:
                        out[k] = v
                elif not self.freeze_llm:
                    out[k] = v
        return out

    def required_keys(self, llm: bool = True) -> List[str]:
        """What a checkpoint of this model must hold: the trained keys of :meth:`state_dict` (encoder,
        projector, and the LLM's trained tensors when ``llm``), less the parameters our encoder adds on top
        of the released layout."""
        return [k for k in self.state_dict() if not k.startswith(OPTIONAL_SLIDE_KEYS)
                and (llm or not k.startswith("llm."))]

    def load_weights_checked(self, state_dict: Mapping[str, torch.Tensor], *, llm: bool = True,
                             allow_partial: Optional[bool] = None,
                             source: Union[str, os.PathLike] = "") -> KeyReport:
        """The one way weights enter this model: names mapped by the core (released / peft / ours), then
        ``checkpoint.load_checked`` against :meth:`required_keys` (``llm=False``: the LLM comes from
        elsewhere, e.g. an exported folder's own LLM or the config's LLM folder for ``pretrained_pth``)."""
        allow = self.allow_partial if allow_partial is None else bool(allow_partial)
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        return self._core.load_slidechat_state_dict(sd, required=self.required_keys(llm=llm),
                                                    allow_partial=allow, source=source)

    def _load_from_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str,
                              local_metadata: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        """Module walkers that do not call :meth:`load_state_dict` arrive here first with every key under
        ``prefix``: mmengine's resume (``mmengine.runner.checkpoint.load_state_dict``, which with
        ``strict=False`` only warned about a shape mismatch and kept the random tensor) and torch's
        ``load_state_dict`` on a wrapper (``DistributedDataParallel`` under ``xtuner test --launcher
        pytorch`` receives un-prefixed keys and loaded nothing). The same key check runs here, so such a
        load either fits or is a one-line error. (Our own loads go through the core, never through here.)
        The checkpoint's path comes in ``local_metadata`` when ``xtuner test`` read it
        (:class:`CheckpointWeights`)."""
        own = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix) and isinstance(v, torch.Tensor)}
        source = local_metadata.get(SOURCE_METADATA_KEY) or "state dict"
        report = self.load_weights_checked(own, source=source)
        _print_log(f"load_state_dict: {report.summary()}",
                   logging.WARNING if not report.ok else logging.INFO)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def load_checkpoint(self, checkpoint: ResolvedCheckpoint,
                        allow_partial: Optional[bool] = None) -> KeyReport:
        """Read safely and load a checkpoint resolved at the command's entry (file, DeepSpeed folder,
        exported folder, released-style dict). An exported folder carries its own LLM (the caller builds
        the model on it), so only its slide modules are required from it."""
        report = self.load_weights_checked(load_checkpoint_weights(checkpoint),
                                           llm=checkpoint.kind is not CheckpointKind.EXPORTED,
                                           allow_partial=allow_partial, source=checkpoint.path)
        _print_log(f"Loaded checkpoint {report.summary()}",
                   logging.WARNING if not report.ok else logging.INFO)
        return report

    def load_pretrained(self, path: PathLike, allow_partial: Optional[bool] = None) -> KeyReport:
        """Stage-1 weights (``pretrained_pth``, the config's path: resolved here, its one entry) into the
        core: the slide modules are required, ``llm.*`` keys load when present (else the config's LLM
        folder stays)."""
        checkpoint = resolve_checkpoint(path)
        weights = load_checkpoint_weights(checkpoint)
        with zero3_gathered(self):
            report = self.load_weights_checked(weights, llm=False, allow_partial=allow_partial,
                                               source=checkpoint.path)
        _print_log(f"Loaded pretrained_pth {report.summary()}",
                   logging.WARNING if not report.ok else logging.INFO)
        return report

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):
        """What ``xtuner test`` (``strict=False``) and DeepSpeed resume call: the strict key check of
        :meth:`load_weights_checked`, whatever ``strict`` says — ``xtuner test`` passes ``strict=False``,
        which must not let a checkpoint without the trained modules score a random model. Relax it with
        the model's ``allow_partial`` (``--cfg-options model.allow_partial=True``). The report names the
        checkpoint when the weights carry it (:class:`CheckpointWeights`, what ``xtuner test`` reads)."""
        from torch.nn.modules.module import _IncompatibleKeys

        del strict, assign  # see docstring
        source = state_dict.source.path if isinstance(state_dict, CheckpointWeights) else ""
        report = self.load_weights_checked(state_dict, source=source)
        _print_log(f"load_state_dict: {report.summary()}",
                   logging.WARNING if not report.ok else logging.INFO)
        return _IncompatibleKeys(report.missing, report.unexpected)

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
