"""The chat engine behind ``slidechat serve``: one model loaded once, many conversations about slides.

A conversation (session) is bound to one slide, and for the cytology family to one field of it: asking
with a session id that belongs to another slide or field starts a new session (the result says which).
Model work is serialised by one lock (the routes run it on one dedicated worker thread), so tiles stay
fast while a slow answer is generated.

Slide family: the slide's patch features (its H5 from ``extract-features``, or extracted now and cached)
feed a :class:`~slidechat.apps.chat.ChatSession` (the slide prefix is kept across turns). After each
answer, :func:`slidechat.inference.evidence.answer_evidence` scores every patch; the top ``k`` come back
in level-0 pixels and the whole map is kept per turn as a PNG over the slide extent.

Cytology family: the field (level-0 rectangle; the whole image when small) is read at a level where it
is at most 1024 px a side and asked about as an image; the answer's boxes are read in the model's
convention (:mod:`slidechat.evaluation.boxes`) in pixels of that image and mapped back to level-0.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from slidechat.apps.chat import ChatSession, ImageChatSession, load_chat_model, load_image_chat_model
from slidechat.apps.serve.catalog import Catalog, SlideEntry, read_patch_grid
from slidechat.apps.serve.layers import png_bytes, render_patch_heatmap
from slidechat.evaluation.boxes import BOX_FORMATS, processor_resize_kwargs, to_pixels
from slidechat.features.extract import extract_slide_features
from slidechat.features.io import (FeatureProvenance, check_feature_provenance, load_features,
                                   read_feature_provenance, write_feature_h5)
from slidechat.inference.evidence import answer_evidence, scored_answer_ids, top_patches
from slidechat.model.checkpoint import is_exported_folder
from slidechat.model.qwen2vl import read_family
from slidechat.utils.errors import SlideChatError, exception_text, one_line
from slidechat.wsi.slide import Slide

logger = logging.getLogger(__name__)

#: largest field side (level-0 px) a cytology question may cover, and the side it is read at
FIELD_MAX_SIDE = 4096
IMAGE_MAX_SIDE = 1024
#: sessions kept (least recently used dropped first)
MAX_SESSIONS = 32
EVIDENCE_TOP_K = 10
#: below this many parameters a model is a test model: no pathology VLM is this small
TINY_PARAMS = 10_000_000
DEFAULT_FEATURE_CACHE = Path("work_dirs") / "serve_features"
#: seconds between progress lines while a slide's features are extracted
PROGRESS_EVERY_S = 2.0

ProgressCallback = Callable[[str], None]


class ChatRequestError(SlideChatError):
    """A question the engine refuses as asked (HTTP ``status``, default 422), with a one-line reason."""

    def __init__(self, reason: str, path: Any = None, hint: Optional[str] = None, status: int = 422) -> None:
        super().__init__(reason, path, hint)
        self.status = status


class UnknownSession(SlideChatError):
    """A session id (or turn) the engine does not hold (HTTP 404)."""


class GenerationCancelled(Exception):
    """Raised from a token callback to stop an answer whose reader went away."""


@dataclass
class Evidence:
    """One patch that drove an answer, in level-0 pixels of the slide."""
    x: int
    y: int
    w: int
    h: int
    score: float


@dataclass
class ChatResult:
    """What one question returns (the JSON of ``POST /api/chat``)."""
    answer: str
    session: str
    turn: int
    evidence: List[Evidence] = dc_field(default_factory=list)
    regions: List[dict] = dc_field(default_factory=list)
    evidence_url: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"answer": self.answer, "session": self.session, "turn": self.turn,
                "evidence": [vars(e).copy() for e in self.evidence], "regions": [dict(r) for r in self.regions],
                "evidence_url": self.evidence_url}


@dataclass
class Turn:
    """One answered question of a session, with what the report and the evidence route need."""
    question: str
    answer: str
    evidence: List[Evidence]
    regions: List[dict]
    heatmap_png: Optional[bytes]
    time: float


@dataclass
class ServeSession:
    """A conversation about one slide (cytology: one field of it)."""
    id: str
    entry: SlideEntry
    level0_size: Tuple[int, int]
    chat: Any  # ChatSession | ImageChatSession
    field: Optional[Dict[str, int]] = None  # cytology: the level-0 rectangle asked about
    image: Optional[Image.Image] = None  # cytology: the field as given to the model
    patch_size_level0: Optional[int] = None  # slide family
    coords: Optional[np.ndarray] = None  # slide family: patch top-left corners of the rows the model sees
    turns: List[Turn] = dc_field(default_factory=list)
    lock: threading.Lock = dc_field(default_factory=threading.Lock)


def _count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _params_text(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit} params"
    return f"{n} params"


def _llm_class(llm: Any) -> str:
    base = getattr(llm, "get_base_model", None)
    return type(base() if callable(base) else llm).__name__


class ChatEngine:
    """One loaded model (slide or cytology family) and the sessions asked of it; :meth:`ask` is thread-safe."""

    def __init__(self, family: str, model: Any, tokenizer: Any, name: str, *, processor: Any = None,
                 max_new_tokens: int = 256, partial: bool = False, box_format: Optional[str] = None,
                 encoder: Optional[str] = None, feature_cache: Optional[Path] = None,
                 evidence_k: int = EVIDENCE_TOP_K, image_max_pixels: int = 768 * 768,
                 image_min_pixels: int = 32 * 32, extract_options: Optional[Dict[str, Any]] = None) -> None:
        if family not in ("slide", "cytology"):
            raise SlideChatError(f"unknown model family {family!r} (slide or cytology)")
        self.family = family
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.max_new_tokens = int(max_new_tokens)
        self.partial = bool(partial)
        self.box_format = box_format or "region"
        if self.box_format not in BOX_FORMATS:
            raise SlideChatError(f"unknown box format {self.box_format!r}", hint=f"one of {list(BOX_FORMATS)}")
        self.encoder = encoder
        self.feature_cache = Path(feature_cache) if feature_cache is not None else None
        self.evidence_k = int(evidence_k)
        self.image_max_pixels, self.image_min_pixels = int(image_max_pixels), int(image_min_pixels)
        self.extract_options = dict(extract_options or {})
        self.n_params = _count_params(model)
        self.catalog: Optional[Catalog] = None
        # one model at a time; the routes run model work on this one thread
        self.model_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidechat-model")
        self._sessions: "OrderedDict[str, ServeSession]" = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._features_note: Optional[Tuple[Tuple[str, ...], str]] = None

    # -- the model line ------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> Optional[int]:
        dim = getattr(getattr(self.model, "config", None), "feature_dim", None)
        return int(dim) if isinstance(dim, int) else None

    def model_part(self) -> str:
        """``<name> (<family>, <LLM class>, <params>[, TINY TEST MODEL][, PARTIAL ...])``."""
        if self.family == "slide":
            parts = ["SlideChat slide model", _llm_class(self.model.llm)]
        else:
            parts = ["cytology image model", type(self.model).__name__]
        parts.append(_params_text(self.n_params))
        if self.n_params < TINY_PARAMS:
            parts.append("TINY TEST MODEL: for tests and demos, not a pathology model")
        if self.partial:
            parts.append("PARTIAL CHECKPOINT ALLOWED: missing weights are random")
        return f"model: {self.name} ({', '.join(parts)})"

    def attach_catalog(self, catalog: Catalog) -> None:
        """The slides this engine answers about (their feature files name the encoder in the model line)."""
        self.catalog = catalog

    def features_part(self) -> str:
        """``features: <encoder> <dim>-d`` from the feature files' provenance (cytology: the image)."""
        if self.family == "cytology":
            return f"input: the viewed field as an image (<= {IMAGE_MAX_SIDE} px a side), boxes: {self.box_format}"
        files = tuple(sorted(str(e.features) for e in self.catalog.entries() if e.features)) \
            if self.catalog is not None else ()
        if self._features_note is not None and self._features_note[0] == files:
            return self._features_note[1]
        encoders: Dict[str, FeatureProvenance] = {}
        unknown = 0
        for f in files:
            try:
                prov = read_feature_provenance(f)
            except SlideChatError as e:
                logger.warning("%s", e)
                continue
            if prov.known:
                encoders.setdefault(prov.encoder, prov)
            else:
                unknown += 1
        words = []
        for enc, prov in encoders.items():
            dim = f" {prov.embed_dim}-d" if prov.embed_dim else ""
            test = " (TEST ENCODER, not a pathology model)" if "tiny" in enc or "test" in enc else ""
            words.append(f"{enc}{dim}{test}")
        if unknown:
            words.append(f"{unknown} file(s) without a recorded encoder")
        if not words:
            words.append("none found" + (f"; extracted on demand with {self.encoder}" if self.encoder else ""))
        text = "features: " + ", ".join(words)
        self._features_note = (files, text)
        return text

    @property
    def model_line(self) -> str:
        """One line that says what answers: nobody should take a tiny or partial model for a real one."""
        return f"{self.model_part()}, {self.features_part()}"

    # -- sessions ------------------------------------------------------------------------------------
    def session(self, session_id: str) -> ServeSession:
        """The live session ``session_id``; :class:`UnknownSession` when it is not (or no longer) held."""
        with self._sessions_lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(f"unknown session {session_id!r} (sessions are kept in memory, at most "
                                     f"{MAX_SESSIONS})")
            self._sessions.move_to_end(session_id)
            return s

    def turn(self, session_id: str, turn: int) -> Turn:
        s = self.session(session_id)
        if not 1 <= int(turn) <= len(s.turns):
            raise UnknownSession(f"session {session_id!r} has no turn {turn}")
        return s.turns[int(turn) - 1]

    def _existing(self, session_id: Optional[str], entry: SlideEntry,
                  field: Optional[Dict[str, int]]) -> Optional[ServeSession]:
        if not session_id:
            return None
        with self._sessions_lock:
            s = self._sessions.get(session_id)
            if s is None or s.entry.id != entry.id or s.entry.path != entry.path or s.field != field:
                if s is not None:
                    logger.info("session %s belongs to another slide/field: a new session starts", session_id)
                return None
            self._sessions.move_to_end(session_id)
            return s

    def _keep(self, s: ServeSession) -> None:
        with self._sessions_lock:
            self._sessions[s.id] = s
            self._sessions.move_to_end(s.id)
            while len(self._sessions) > MAX_SESSIONS:
                old, _ = self._sessions.popitem(last=False)
                logger.info("session %s dropped (more than %d sessions)", old, MAX_SESSIONS)

    # -- asking --------------------------------------------------------------------------------------
    def ask(self, entry: SlideEntry, question: str, session: Optional[str], field: Optional[dict] = None,
            on_token: Optional[Callable[[str], None]] = None,
            on_progress: Optional[ProgressCallback] = None) -> ChatResult:
        """Answer ``question`` about ``entry`` in ``session`` (a new one when None, unknown, or bound to
        another slide/field). Raises :class:`ChatRequestError` for a question that cannot be asked as is."""
        question = (question or "").strip()
        if not question:
            raise ChatRequestError("question is empty")
        with self.model_lock:
            if self.family == "slide":
                return self._ask_slide(entry, question, session, on_token, on_progress)
            return self._ask_cytology(entry, question, session, field, on_token)

    def _run_turn(self, s: ServeSession, question: str, on_token: Optional[Callable[[str], None]]) -> str:
        try:
            return s.chat.ask(question, on_token=on_token)
        except GenerationCancelled:
            s.chat.drop_kept_cache()  # the cache may hold part of an answer no history has
            raise
        except SlideChatError as e:  # e.g. the prompt over the model's limit (InputRefused)
            raise ChatRequestError(one_line(str(e), 400)) from e

    def _ask_slide(self, entry: SlideEntry, question: str, session: Optional[str],
                   on_token: Optional[Callable[[str], None]], on_progress: Optional[ProgressCallback]
                   ) -> ChatResult:
        s = self._existing(session, entry, None)
        if s is None:
            s = self._new_slide_session(entry, on_progress)
        answer = self._run_turn(s, question, on_token)
        evidence, heatmap = self._evidence(s)
        t = Turn(question, answer, evidence, [], heatmap, time.time())
        s.turns.append(t)
        self._keep(s)
        n = len(s.turns)
        url = f"/api/sessions/{s.id}/turns/{n}/evidence.png" if heatmap is not None else None
        return ChatResult(answer, s.id, n, evidence, [], url)

    def _feature_file(self, entry: SlideEntry, on_progress: Optional[ProgressCallback]) -> Path:
        """The slide's H5: the catalog's, one extracted earlier, or extracted now (and cached)."""
        if entry.features is not None:
            return entry.features
        cache = (self.feature_cache or DEFAULT_FEATURE_CACHE) / f"{entry.id}.h5"
        if cache.is_file() and cache.stat().st_mtime >= entry.path.stat().st_mtime:
            return cache
        encoder = self.encoder or self._catalog_encoder()
        if encoder is None:
            raise ChatRequestError(f"slide {entry.name} has no feature file and no encoder is known to extract "
                                   "one", hint="pass --features with extract-features' output, or --encoder")
        if on_progress is not None:
            on_progress(f"extracting features of {entry.name} with {encoder} (once; cached in {cache.parent})")
        t0 = time.time()
        done = threading.Event()

        def heartbeat() -> None:  # the extractor has no progress hook: say it is still working
            while not done.wait(PROGRESS_EVERY_S):
                if on_progress is not None:
                    on_progress(f"extracting features of {entry.name}: {time.time() - t0:.0f} s")

        beat = threading.Thread(target=heartbeat, name="slidechat-extract-progress", daemon=True)
        beat.start()
        try:
            feats, coords, info = extract_slide_features(entry.path, encoder=encoder, **self.extract_options)
        except SlideChatError as e:
            raise ChatRequestError(f"feature extraction failed: {one_line(str(e), 300)}") from e
        finally:
            done.set()
            beat.join()
        prov = {k: v for k, v in info.items() if k.startswith("encoder")}
        write_feature_h5(cache, feats, coords, coords_attrs=info.get("coords_attrs"), file_attrs=prov)
        logger.info("%s: %d patches extracted with %s in %.1f s -> %s", entry.path, len(feats), encoder,
                    time.time() - t0, cache)
        if on_progress is not None:
            on_progress(f"{len(feats)} patches encoded in {time.time() - t0:.1f} s")
        return cache

    def _catalog_encoder(self) -> Optional[str]:
        """The encoder the other slides' feature files record (the model was trained on its features)."""
        if self.catalog is None:
            return None
        for e in self.catalog.entries():
            if e.features is not None:
                try:
                    prov = read_feature_provenance(e.features)
                except SlideChatError:
                    continue
                if prov.known:
                    return prov.encoder
        return None

    def _new_slide_session(self, entry: SlideEntry, on_progress: Optional[ProgressCallback]) -> ServeSession:
        path = self._feature_file(entry, on_progress)
        try:
            check_feature_provenance([path], self.feature_dim)
            feats, coords = load_features(path, num_columns=self.feature_dim, require_finite=True)
        except SlideChatError as e:
            raise ChatRequestError(one_line(str(e), 400)) from e
        patch = None
        if coords is not None:
            try:
                patch = read_patch_grid(path).patch_size_level0
            except SlideChatError as e:
                logger.warning("%s: no patch size, no evidence map (%s)", path, e)
        size = _level0_size(entry)
        chat = ChatSession(self.model, self.tokenizer, feats, coords, max_new_tokens=self.max_new_tokens)
        kept = None if chat.coords is None else chat.coords.numpy()
        return ServeSession(uuid.uuid4().hex, entry, size, chat, patch_size_level0=patch, coords=kept)

    def _evidence(self, s: ServeSession) -> Tuple[List[Evidence], Optional[bytes]]:
        """Top-k patches and the heatmap PNG of the last answer (none without coordinates or tokens)."""
        chat: ChatSession = s.chat
        if s.coords is None or s.patch_size_level0 is None or not chat.last_answer_ids:
            return [], None
        truncated = len(chat.last_answer_ids) >= chat.max_new_tokens
        try:
            answer_ids = scored_answer_ids(self.model, chat.last_answer_ids, truncated=truncated,
                                           tokenizer=self.tokenizer, template=chat.template)
            ev = answer_evidence(self.model, chat.last_prompt_ids, answer_ids, chat.features, chat.coords)
        except SlideChatError as e:  # the answer stands; say why it has no map
            logger.warning("no evidence for session %s: %s", s.id, e)
            return [], None
        except Exception as e:  # a bug in the map must not cost the answer already in the history
            logger.error("evidence failed for session %s: %s", s.id, exception_text(e), exc_info=e)
            return [], None
        scores = np.asarray(ev.scores, dtype=np.float64)
        top = top_patches(scores, s.coords, s.patch_size_level0, k=self.evidence_k)
        evidence = [Evidence(int(x), int(y), int(w), int(h), float(sc)) for x, y, w, h, sc in top]
        heat = render_patch_heatmap(scores, s.coords, s.patch_size_level0, s.level0_size)
        return evidence, png_bytes(heat)

    def _ask_cytology(self, entry: SlideEntry, question: str, session: Optional[str], field: Optional[dict],
                      on_token: Optional[Callable[[str], None]]) -> ChatResult:
        size = _level0_size(entry)
        rect = field_rect(field, size)
        s = self._existing(session, entry, rect)
        if s is None:
            image = read_field(entry, rect)
            chat = ImageChatSession(self.model, self.processor, image, max_new_tokens=self.max_new_tokens,
                                    image_max_pixels=self.image_max_pixels, image_min_pixels=self.image_min_pixels)
            s = ServeSession(uuid.uuid4().hex, entry, size, chat, field=rect, image=image)
        answer = self._run_turn(s, question, on_token)
        regions = self._regions(answer, s)
        s.turns.append(Turn(question, answer, [], regions, None, time.time()))
        self._keep(s)
        return ChatResult(answer, s.id, len(s.turns), [], regions, None)

    def _regions(self, answer: str, s: ServeSession) -> List[dict]:
        """The answer's boxes in level-0 px: read in the model's convention on the image given, then
        ``x0 + bx * field_w / image_w`` (and the same for y)."""
        assert s.image is not None and s.field is not None
        iw, ih = s.image.size
        resize: Dict[str, Optional[int]] = {}
        if self.box_format == "qwen2_5_vl":  # absolute px of the model input: its resize rule is needed
            resize = dict(image_max_pixels=self.image_max_pixels, image_min_pixels=self.image_min_pixels,
                          **processor_resize_kwargs(self.processor))
        try:
            parsed = to_pixels(answer, self.box_format, image_size=(iw, ih), source="answer", **resize)
        except SlideChatError as e:
            logger.warning("boxes of an answer not read: %s", e)
            return []
        for bad in parsed.malformed:
            logger.info("answer box not read: %s", bad)
        fx, fy, fw, fh = s.field["x"], s.field["y"], s.field["w"], s.field["h"]
        sx, sy = fw / iw, fh / ih
        out = []
        for r in parsed.boxes:
            x1, y1 = fx + r.x1 * sx, fy + r.y1 * sy
            x2, y2 = fx + r.x2 * sx, fy + r.y2 * sy
            out.append({"label": r.label, "x": int(round(x1)), "y": int(round(y1)),
                        "w": int(round(x2 - x1)), "h": int(round(y2 - y1))})
        return out


def _level0_size(entry: SlideEntry) -> Tuple[int, int]:
    try:
        with Slide(entry.path) as sl:
            w, h = sl.dimensions
    except SlideChatError as e:
        raise ChatRequestError(f"slide cannot be read: {one_line(str(e), 300)}") from e
    except Exception as e:  # a broken file: say which and why, not a traceback
        raise ChatRequestError(f"slide {entry.name} cannot be read: {exception_text(e)}") from e
    return int(w), int(h)


def field_rect(field: Optional[dict], level0_size: Tuple[int, int]) -> Dict[str, int]:
    """The level-0 rectangle a cytology question is about: ``field`` clamped to the slide, or the whole
    image when it is at most :data:`FIELD_MAX_SIDE` a side; larger is refused (the model sees one field)."""
    W, H = level0_size
    if field is None:
        if max(W, H) > FIELD_MAX_SIDE:
            raise ChatRequestError(f"the slide is {W}x{H} level-0 px: ask about a field (the view) of at most "
                                   f"{FIELD_MAX_SIDE} px a side")
        return {"x": 0, "y": 0, "w": W, "h": H}
    try:
        x, y, w, h = (float(field[k]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        raise ChatRequestError('field must be {"x","y","w","h"} numbers in level-0 px') from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ChatRequestError("field must have finite numbers and a positive width and height")
    x1, y1 = max(0, int(math.floor(x))), max(0, int(math.floor(y)))
    x2, y2 = min(W, int(math.ceil(x + w))), min(H, int(math.ceil(y + h)))
    if x2 <= x1 or y2 <= y1:
        raise ChatRequestError(f"field lies outside the slide ({W}x{H} level-0 px)")
    if max(x2 - x1, y2 - y1) > FIELD_MAX_SIDE:
        raise ChatRequestError(f"field is {x2 - x1}x{y2 - y1} level-0 px; at most {FIELD_MAX_SIDE} a side "
                               "(zoom in)")
    return {"x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1}


def read_field(entry: SlideEntry, rect: Dict[str, int]) -> Image.Image:
    """The field as an RGB image at most :data:`IMAGE_MAX_SIDE` a side, read at the pyramid level closest
    above that size (cheap on a large slide) and then resized."""
    fw, fh = rect["w"], rect["h"]
    ds = max(1.0, max(fw, fh) / IMAGE_MAX_SIDE)
    out_w, out_h = max(1, int(round(fw / ds))), max(1, int(round(fh / ds)))
    try:
        with Slide(entry.path) as sl:
            level = sl.best_level_for_downsample(ds)
            lds = float(sl.level_downsamples[level])
            lw, lh = max(1, int(math.ceil(fw / lds))), max(1, int(math.ceil(fh / lds)))
            img = sl.read_region_image((rect["x"], rect["y"]), level, (lw, lh))
    except SlideChatError as e:
        raise ChatRequestError(f"field cannot be read: {one_line(str(e), 300)}") from e
    if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), Image.BILINEAR)
    return img.convert("RGB")


def load_engine(*, config: Optional[str] = None, checkpoint: Optional[str] = None,
                cfg_options: Optional[dict] = None, model_name_or_path: Optional[str] = None,
                adapter_name_or_path: Optional[str] = None, device: str = "auto", dtype: str = "auto",
                trust_remote_code: bool = False, allow_partial: bool = False, max_new_tokens: int = 256,
                encoder: Optional[str] = None, feature_cache: Optional[Path] = None,
                box_format: Optional[str] = None, evidence_k: int = EVIDENCE_TOP_K,
                extract_options: Optional[Dict[str, Any]] = None, image_max_pixels: int = 768 * 768,
                image_min_pixels: int = 32 * 32) -> ChatEngine:
    """The engine for ``slidechat serve``'s model arguments: a slide model from ``checkpoint`` (an exported
    folder, or a training checkpoint with ``config``), or from ``model_name_or_path`` when that is an
    exported SlideChat folder; a cytology model from a Qwen VL folder in ``model_name_or_path``.

    As in ``slidechat chat``, a slide model runs on the CPU and ``device`` is the patch encoder's (features
    extracted on demand with ``encoder``, cached in ``feature_cache``); a cytology model runs on ``device``."""
    if checkpoint is None and model_name_or_path is None:
        raise SlideChatError("no model given", hint="pass --config + --checkpoint, or --model_name_or_path")
    common = dict(max_new_tokens=max_new_tokens, partial=allow_partial, evidence_k=evidence_k)
    slide_source = checkpoint
    if slide_source is None and model_name_or_path is not None and is_exported_folder(model_name_or_path):
        slide_source = model_name_or_path
    if slide_source is not None:
        model, tok = load_chat_model(slide_source, config, cfg_options, allow_partial=allow_partial,
                                     trust_remote_code=trust_remote_code)
        name = Path(slide_source).name
        logger.info("slide model %s loaded", slide_source)
        # readers in this process: forking worker processes from a threaded server is not worth the risk
        extract = {"device": device, "progress": False, "num_workers": 0, **(extract_options or {})}
        return ChatEngine("slide", model, tok, name, encoder=encoder, feature_cache=feature_cache,
                          extract_options=extract, **common)
    folder, fam = read_family(model_name_or_path)
    model, processor = load_image_chat_model(folder, adapter_name_or_path, device=device, dtype=dtype,
                                             trust_remote_code=trust_remote_code, allow_partial=allow_partial)
    name = folder.name + (f" + {Path(adapter_name_or_path).name}" if adapter_name_or_path else "")
    logger.info("cytology model %s (%s) loaded", folder, fam.label)
    return ChatEngine("cytology", model, getattr(processor, "tokenizer", processor), name, processor=processor,
                      box_format=box_format or fam.box_format, image_max_pixels=image_max_pixels,
                      image_min_pixels=image_min_pixels, **common)
