"""Multi-turn conversation about one slide (``slidechat chat``), on the plain :class:`SlideChatModel`.

The conversation is kept as ``[(question, answer), ...]`` and every turn's prompt is the whole
history in the training template (``encode_prompt``), so the model sees what it said before.
The slide is encoded once (slide encoder + projector) and its visual tokens are reused every turn.
With ``prefix_reuse`` (the default) the LLM's KV cache is kept across turns too: a turn's prompt starts
with the previous prompt and answer, so only the tokens after what the cache holds are prefilled
(``SlideChatModel.generate_shared``); turn N costs its own tokens, not the slide again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Collection, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from slidechat.data.dataset import uniform_indices
from slidechat.data.images import check_image_header, prepare_image
from slidechat.data.limits import InputRefused, check_prompt_length, llm_context_length, model_prompt_limit
from slidechat.data.template import config_template, encode_prompt
from slidechat.engine.builder import build_model_from_config
from slidechat.features.extract import extract_slide_features
from slidechat.features.io import load_features
from slidechat.inference.loop import CytologyItem, KeptImageCache, Qwen2VLFamily, SamplingSettings
from slidechat.model.checkpoint import is_exported_folder, resolve_checkpoint
from slidechat.model.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from slidechat.model.qwen2vl import load_qwen2vl
from slidechat.model.prefix_cache import PrefixCache
from slidechat.model.slidechat_model import CONFIG_FILE, SlideChatModel
from slidechat.utils.devices import resolve_device_dtype
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

#: what ``on_token`` of :meth:`ChatSession.ask` / :meth:`ImageChatSession.ask` receives: each new piece of text
TokenCallback = Callable[[str], None]


class TextDeltaStreamer(BaseStreamer):
    """Hands ``generate``'s new tokens to ``on_token`` as text pieces while they are made (one row only).

    The whole answer so far is decoded each step and only the new characters are sent, so tokens that
    decode together (multi-byte characters, merged spaces) arrive as readable text; a trailing U+FFFD (an
    unfinished character) waits for the next token. The first ``put`` is the prompt and is skipped, as
    ``generate`` sends it first; nothing after a stop token is sent.
    """

    def __init__(self, decode: Callable[[List[int]], str], on_token: TokenCallback,
                 stop_ids: Collection[int] = ()) -> None:
        self.decode = decode
        self.on_token = on_token
        self.stop_ids = {int(t) for t in stop_ids}
        self.ids: List[int] = []
        self.sent = ""
        self._prompt_seen = False
        self._stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self._stopped:
            return
        for t in value.reshape(-1).tolist():
            if int(t) in self.stop_ids:
                self._stopped = True
                break
            self.ids.append(int(t))
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece = text[len(self.sent):]
            self.sent = text
            self.on_token(piece)
        elif not text.startswith(self.sent):  # decoding changed earlier text (rare): send what is new
            self.sent = text


def load_chat_model(checkpoint: PathLike, config: Optional[PathLike] = None,
                    cfg_options: Optional[dict] = None, allow_partial: bool = False,
                    trust_remote_code: bool = False) -> Tuple[Any, Any]:
    """``(SlideChatModel in eval mode, tokenizer)`` from an exported folder (no config needed) or a
    config + training checkpoint (strict key check; ``allow_partial`` accepts missing weights with a
    warning). The LLM folder's own code runs only with ``trust_remote_code`` (``--trust-remote-code``)."""
    ckpt = Path(checkpoint)
    if config is None:
        if not is_exported_folder(ckpt):
            raise SlideChatError("not an exported model folder; pass --config with a training checkpoint",
                                 ckpt, hint=f"an exported folder holds {CONFIG_FILE}")
        model = SlideChatModel.from_pretrained(ckpt, trust_remote_code=trust_remote_code,
                                               allow_partial=allow_partial)
        if model.tokenizer is None:
            raise SlideChatError("exported folder has no tokenizer", ckpt / "llm")
        return model, model.tokenizer
    model, tok = build_model_from_config(config, checkpoint=resolve_checkpoint(ckpt), cfg_options=cfg_options,
                                         allow_partial=allow_partial, trust_remote_code=trust_remote_code)
    if tok is None:
        raise SlideChatError("config has no tokenizer", config)
    model.tokenizer = tok
    model.eval()
    return model, tok


class ChatSession:
    """One slide, many turns: ``ask(question) -> answer``; ``history`` grows with each turn."""

    def __init__(self, model: Any, tokenizer: Any, features: np.ndarray,
                 coords: Optional[np.ndarray] = None, max_new_tokens: int = 500,
                 max_patches: Optional[int] = None, template: Any = None, system: str = "",
                 max_prompt_tokens: Optional[int] = None, prefix_reuse: bool = True,
                 **generation_kwargs: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        feats = np.asarray(features, dtype=np.float32)
        cap = max_patches or getattr(getattr(model, "config", None), "max_patches_test", None)
        if cap is not None and len(feats) > cap:
            idx = uniform_indices(len(feats), int(cap))
            logger.info("slide has %d patches; using %d (uniform subsample)", len(feats), len(idx))
            feats = feats[idx]
            coords = None if coords is None else np.asarray(coords)[idx]
        self.features = torch.from_numpy(np.ascontiguousarray(feats))
        self.coords = None if coords is None else torch.from_numpy(np.ascontiguousarray(coords, dtype=np.int64))
        self.max_new_tokens = int(max_new_tokens)
        # text tokens of the whole conversation + question (default: context - max_new_tokens)
        self.prompt_limit = model_prompt_limit(model, self.max_new_tokens, max_prompt_tokens)
        if template is None:  # the prompt format the model was trained with (its SlideChatConfig)
            cfg = getattr(model, "config", None)
            template = (config_template(cfg.prompt_template, cfg.chat_template_kwargs)
                        if hasattr(cfg, "prompt_template") else "qwen_chat")
        self.template = template
        self.system = system
        self.generation_kwargs = dict(generation_kwargs)
        self.generation_kwargs.setdefault("use_cache", True)
        self.history: List[Tuple[str, str]] = []
        self._visual_tokens: Optional[List[torch.Tensor]] = None
        self.prefix_reuse = bool(prefix_reuse)
        self._kept: Optional[PrefixCache] = None  # the LLM cache of the last turn's prompt + answer
        # the last answered turn, token by token (for answer evidence: log p(answer | prompt, slide))
        self.last_prompt_ids: List[int] = []
        self.last_answer_ids: List[int] = []

    def prompt_ids(self, question: str) -> List[int]:
        return encode_prompt(self.tokenizer, self.history, question, self.template, self.system)

    def prompt_text(self, question: str) -> str:
        """The next turn's prompt as text (the slide shown as ``<image>``), for inspection."""
        ids = self.prompt_ids(question)
        parts, run = [], []
        for t in ids:
            if t == IMAGE_TOKEN_INDEX:
                parts.append(self.tokenizer.decode(run))
                parts.append(IMAGE_TOKEN)
                run = []
            else:
                run.append(t)
        parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    @torch.no_grad()
    def ask(self, question: str, on_token: Optional[TokenCallback] = None) -> str:
        """The answer to ``question`` given the conversation so far; ``on_token`` (optional) receives
        the answer's text piece by piece while it is generated (a browser shows it as it comes)."""
        question = question.strip()
        if not question:
            raise ValueError("empty question")
        ids = torch.tensor(self.checked_prompt_ids(question), dtype=torch.long)
        gen_kwargs = dict(self.generation_kwargs)
        if on_token is not None:
            gen_kwargs["streamer"] = TextDeltaStreamer(
                lambda t: self.tokenizer.decode(t, skip_special_tokens=True), on_token,
                self.model.default_eos_token_ids())
        if self._visual_tokens is None:
            self._visual_tokens = self.model.encode_slides(
                [self.features], None if self.coords is None else [self.coords])
        if self.prefix_reuse:
            new, self._kept = self.model.generate_shared(
                [ids], self._visual_tokens[0], state=self._kept, keep=True, max_new_tokens=self.max_new_tokens,
                **gen_kwargs)
            out = new[0]
        else:
            out = self.model.generate([ids], [self.features], visual_tokens=self._visual_tokens,
                                      max_new_tokens=self.max_new_tokens, **gen_kwargs)[0]
        answer = self.tokenizer.decode(out.tolist(), skip_special_tokens=True).strip()
        self.history.append((question, answer))
        self.last_prompt_ids, self.last_answer_ids = ids.tolist(), [int(t) for t in out.tolist()]
        return answer

    def checked_prompt_ids(self, question: str) -> List[int]:
        """``prompt_ids`` within :attr:`prompt_limit`, else :class:`~slidechat.data.limits.InputRefused`
        (the session is unchanged: the caller can go on with a shorter question or ``reset``)."""
        ids, reason = check_prompt_length(question, lambda: self.prompt_ids(question), self.prompt_limit,
                                          count=lambda t: sum(1 for x in t if x != IMAGE_TOKEN_INDEX))
        if reason is not None:
            raise InputRefused(reason + ("; 'reset' clears the conversation so far" if self.history else ""))
        assert ids is not None
        return ids

    def reset(self) -> None:
        """Forget the conversation (the kept cache stays: the next prompt still shares the slide with it)."""
        self.history.clear()

    def drop_kept_cache(self) -> None:
        """Forget the kept LLM cache (after an interrupted turn it may hold tokens no history has)."""
        self._kept = None


class ImageChatSession:
    """One field-of-view image, many turns, on a Qwen2-VL model (cytology; ``chat --image``).

    Same interface as :class:`ChatSession` (``ask``, ``reset``, ``prompt_text``, ``history``), so the
    terminal loop serves both families. Prompts follow LLaMA-Factory's ``qwen2_vl`` template with the
    image as ``<image>`` at the start of the first question (as in CytoChat's data); decoding is greedy
    and keeps special tokens other than the stop token, so boxes (``<region>...</region>`` or Qwen2-VL's
    ``<|box_start|>...<|box_end|>``) are printed exactly as generated. With ``prefix_reuse`` (default)
    the LLM cache is kept across turns (``Qwen2VLFamily.answer_kept``): the vision tower runs once.
    """

    def __init__(self, model: Any, processor: Any, image: Union[PathLike, Image.Image, np.ndarray],
                 max_new_tokens: int = 500, system: Optional[str] = None, image_max_pixels: int = 768 * 768,
                 image_min_pixels: int = 32 * 32, prefix_reuse: bool = True) -> None:
        # a file, or pixels already in memory (``slidechat serve`` asks about a field read from a slide)
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        if isinstance(image, Image.Image):
            self.image_path: Optional[Path] = None
            self.source = "<image in memory>"
        else:
            self.image_path = Path(image)
            self.source = str(self.image_path)
        self.image = prepare_image(image if self.image_path is None else self.image_path, image_max_pixels,
                                   image_min_pixels)  # read + scaled once
        limit = llm_context_length(model) or 32768
        self.family = Qwen2VLFamily(model, processor,
                                    SamplingSettings(max_new_tokens=int(max_new_tokens), temperature=0.0),
                                    cutoff_len=limit, skip_special_tokens=False, truncate=False,
                                    image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels)
        self.system = system or None
        self.history: List[Tuple[str, str]] = []
        self.prefix_reuse = bool(prefix_reuse)  # keep the cache across turns: the image is encoded once
        self._kept: Optional[KeptImageCache] = None

    def _item(self, question: str) -> CytologyItem:
        msgs = []
        for k, (q, a) in enumerate(self.history + [(question, "")]):
            msgs.append({"role": "user", "content": ("<image>" if k == 0 else "") + q})
            if k < len(self.history):
                msgs.append({"role": "assistant", "content": a})
        item = CytologyItem(position=0, key={}, images=[self.source], messages=msgs,
                            system=self.system, label_content=None, source=self.source)
        self.family.render(item)
        item.prepared_images = [self.image]
        return item

    def prompt_text(self, question: str) -> str:
        """The next turn's prompt as the model reads it (special tokens included)."""
        return self._item(question.strip()).prompt_text

    @torch.no_grad()
    def ask(self, question: str, on_token: Optional[TokenCallback] = None) -> str:
        """The answer to ``question`` about the image; ``on_token`` (optional) receives the answer's text
        piece by piece while it is generated (special tokens kept, as in the answer)."""
        question = question.strip()
        if not question:
            raise ValueError("empty question")
        item = self._item(question)
        fam = self.family
        saved = dict(fam.gen_kwargs)
        if on_token is not None:
            fam.gen_kwargs["streamer"] = TextDeltaStreamer(
                lambda t: fam.tokenizer.decode(t, skip_special_tokens=fam.skip_special_tokens), on_token,
                fam.stop_ids)
        try:
            if self.prefix_reuse:
                text, self._kept = fam.answer_kept(item, self._kept)
            else:
                text = fam.generate([item])[0]
        finally:
            fam.gen_kwargs = saved
        answer = text.strip()
        self.history.append((question, answer))
        return answer

    def reset(self) -> None:
        self.history.clear()

    def drop_kept_cache(self) -> None:
        """Forget the kept LLM cache (after an interrupted turn it may hold tokens no history has)."""
        self._kept = None


def load_image_chat_model(model_name_or_path: PathLike, adapter_name_or_path: Optional[PathLike] = None,
                          device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                          allow_partial: bool = False) -> Tuple[Any, Any]:
    """``(Qwen2-VL model in eval mode, processor)`` for ``chat --image`` (same loader as ``infer``)."""
    dev, torch_dtype = resolve_device_dtype(device, dtype)
    return load_qwen2vl(model_name_or_path, adapter_name_or_path, torch_dtype=torch_dtype, device=dev,
                        trust_remote_code=trust_remote_code, allow_partial=allow_partial)


def open_image_session(image: PathLike, model_name_or_path: Optional[PathLike],
                       adapter_name_or_path: Optional[PathLike] = None, *, device: str = "auto",
                       dtype: str = "auto", trust_remote_code: bool = False, allow_partial: bool = False,
                       **session_options: Any) -> ImageChatSession:
    """``chat --image``: the image's header is checked (readable, within the pixel limits) before the
    model loads, so a wrong file costs seconds, not a model load; ``session_options`` go to
    :class:`ImageChatSession`."""
    check_image_header(image)
    if not model_name_or_path:
        raise SlideChatError("--image needs --model_name_or_path (a Qwen2-VL folder)")
    model, processor = load_image_chat_model(model_name_or_path, adapter_name_or_path, device=device,
                                             dtype=dtype, trust_remote_code=trust_remote_code,
                                             allow_partial=allow_partial)
    return ImageChatSession(model, processor, image, **session_options)


def read_slide_features(features: Optional[PathLike], slide: Optional[PathLike] = None, *,
                        encoder: str = "conch_v1", encoder_checkpoint: Optional[PathLike] = None,
                        **extract_options: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(features, coords)`` of the slide to talk about: read from its feature file, or, for a raw
    slide, extracted now by the extraction pipeline (``extract_options`` as ``slidechat extract``)."""
    if features:
        return load_features(features, require_finite=True)
    feats, coords, _ = extract_slide_features(slide, encoder=encoder, checkpoint=encoder_checkpoint,
                                              **extract_options)
    logger.info("%s: %d patches encoded with %s", slide, len(feats), encoder)
    return feats, coords
