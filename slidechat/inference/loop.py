"""The one batched, resumable generation loop, for both model families, writing through a result writer.

Every row, slide or image, is answered by the same batch step, :func:`generate_into`::

    a batch of prepared items
      -> family.generate(runnable items)  (one batched call -> texts)
      -> on a SlideChatError: each row of the batch alone, so only the culprit gets the ``error``
      -> the writer appends the batch     (append + flush + fsync; failed items included)

Two drivers feed it batches, and they differ only in who owns the iteration:

* :func:`run_inference` (``slidechat infer``, plain PyTorch): pending items in input order (after what
  the writer already holds) -> batches of ``batch_size`` -> ``family.prepare(item)`` per item (read the
  image / features, check the prompt length; a SlideChatError becomes the item's ``error``) ->
  :func:`generate_into` -> ``writer.write(batch)``.
* mmengine's ``SlideBenchTestLoop`` (``slidechat test`` / ``xtuner test``,
  :mod:`slidechat.engine.testing`): mmengine owns the iteration because ``xtuner test`` needs its hooks,
  its evaluator (the SlideBench writer and scorer) and its sharding under a launcher; its dataloader
  prepares the rows (``SlideBenchTestDataset.prepare_item``, the same call :meth:`SlideFamily.prepare`
  makes), and each batch goes through :meth:`SlideFamily.hold` and :func:`generate_into` here.

So a SlideBench row is answered one way whichever command runs it, and the CSVs are the same bytes.

One prefill per slide or image (issue 14): a family with ``prefix_reuse`` and a ``group_key`` (the
slide's feature file, the row's images) gets the questions of one slide or image in one batch
(:func:`group_batches`, by both drivers) and answers each such group from one encode and one prefill of
the group's longest common token prefix (:mod:`slidechat.model.prefix_cache`); rows alone in their batch
take today's batched path. Greedy answers, output files, row order and resume are unchanged.

A family is anything with ``prepare(item)`` and ``generate(items) -> List[str]``
(:class:`GenerationFamily`): :class:`Qwen2VLFamily` (cytology, ``slidechat infer``, transformers
engine), :class:`VllmQwen2VLFamily` (the same with vLLM, only when vLLM is installed) and
:class:`SlideFamily` (SlideChat on SlideBench rows). Writers are in :mod:`slidechat.inference.writers`.
Items need ``position`` (0-based input order), ``error`` and ``output``; the writer decides what else
it reads from them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Protocol, Sequence

import torch
from tqdm import tqdm

from slidechat.data.images import PreparedImage, prepare_image
from slidechat.data.limits import CHARS_PER_TOKEN_BOUND
from slidechat.data.qwen2vl_batch import prepare_generation_batch
from slidechat.data.slidebench_dataset import clean_output, slidebench_collate_fn
from slidechat.data.template import (encode_qwen2vl_prompt, get_vision_template, render_qwen2vl_prompt,
                                     template_stop_token_ids)
from slidechat.inference.writers import make_id
from slidechat.model.hf_folder import load_tokenizer
from slidechat.model.prefix_cache import (PrefixCache, common_prefix_len, crop_cache, generate_from_prefix, prefill,
                                          shared_len)
from slidechat.model.qwen2vl import family_of, per_image_vision, read_family
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.utils.resumable import ResultWriter

logger = logging.getLogger(__name__)

#: templates ``slidechat infer`` knows (LLaMA-Factory names)
INFER_TEMPLATES = ("qwen2_vl", "qwen3_vl")  # LLaMA-Factory templates of the Qwen VL families


class GenerationFamily(Protocol):
    """The family-specific half of inference (see module doc)."""

    def prepare(self, item: Any) -> None: ...

    def generate(self, items: Sequence[Any]) -> List[str]: ...


def group_key(family: Any, item: Any) -> Optional[Hashable]:
    """What ``item`` shares its prompt prefix with (its slide, its images) when ``family`` reuses prefixes;
    ``None``: the row is batched as it comes."""
    if not getattr(family, "prefix_reuse", False):
        return None
    key = getattr(family, "group_key", None)
    return key(item) if key is not None else None


#: a slide's questions in one batch: at most this many batches' worth (each prepared row holds its own
#: copy of the slide's features until its batch is answered, so this bounds host memory)
GROUP_BATCHES = 4


def group_batches(keys: Sequence[Optional[Hashable]], batch_size: int) -> List[List[int]]:
    """Row indices, in order, in batches of at most ``batch_size`` rows where a run of consecutive rows
    with one key (the questions of one slide or image) is kept together: a longer run is a batch of its
    own (up to ``GROUP_BATCHES * batch_size`` rows, then split), answered ``batch_size`` questions at a
    time from one prefill. Rows with key ``None`` and single rows pack as today. The order of the rows,
    and so of the output, is unchanged."""
    cap = GROUP_BATCHES * batch_size
    runs: List[List[int]] = []
    for i, k in enumerate(keys):
        if runs and k is not None and keys[runs[-1][-1]] == k and len(runs[-1]) < cap:
            runs[-1].append(i)
        else:
            runs.append([i])
    batches: List[List[int]] = []
    for run in runs:
        if batches and len(batches[-1]) + len(run) <= batch_size:
            batches[-1].extend(run)
        else:
            batches.append(list(run))
    return batches


def split_groups(items: Sequence[Any], key: Callable[[Any], Optional[Hashable]]
                 ) -> "tuple[List[int], List[List[int]]]":
    """Positions of ``items`` answered alone (a key seen once, or ``None``) and the groups of positions
    sharing a key (two rows or more): what a family answers with and without a shared prefill."""
    by_key: Dict[Hashable, List[int]] = {}
    singles: List[int] = []
    for j, it in enumerate(items):
        k = key(it)
        if k is None:
            singles.append(j)
        else:
            by_key.setdefault(k, []).append(j)
    groups = [g for g in by_key.values() if len(g) > 1]
    singles += [g[0] for g in by_key.values() if len(g) == 1]
    return sorted(singles), groups


def answer_in_groups(items: Sequence[Any], key: Callable[[Any], Optional[Hashable]],
                     alone: Callable[[List[Any]], List[str]], shared: Callable[[List[Any]], List[str]]) -> List[str]:
    """Texts for ``items`` in their order: the rows sharing a key through ``shared`` (one call per group,
    so one slide's or image's cache at a time), the others together through ``alone`` (:func:`split_groups`)."""
    singles, groups = split_groups(items, key)
    texts: List[str] = [""] * len(items)
    for idx, answer in ([(singles, alone)] if singles else []) + [(g, shared) for g in groups]:
        for j, t in zip(idx, answer([items[j] for j in idx])):
            texts[j] = t
    return texts


@dataclass
class InferenceStats:
    """What one :func:`run_inference` call did."""

    total: int
    already_done: int
    written: int = 0
    errors: int = 0
    generated: int = 0
    generate_s: float = 0.0
    total_s: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.written / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.written} row(s) written ({self.errors} error(s)), {self.already_done} were already "
                f"done; {self.total_s:.1f} s, {self.items_per_s:.2f} rows/s")


def prepare_items(items: Iterable[Any], family: GenerationFamily) -> None:
    """Run ``family.prepare`` on each not-yet-failed item; a SlideChatError becomes its ``error``."""
    for it in items:
        if it.error is not None:
            continue
        try:
            family.prepare(it)
        except SlideChatError as e:
            it.error = str(e)
            logger.warning("row %s: %s", getattr(it, "position", "?"), e)


def generate_into(items: Sequence[Any], generate: Callable[[List[Any]], List[str]]) -> int:
    """Fill ``output`` of every item without an error from one batched ``generate`` call.

    If the batch call raises :class:`SlideChatError` for a batch of several items, each item is
    retried alone, so only the culprit gets the error. Returns how many items were generated.
    """
    runnable = [it for it in items if it.error is None]
    if not runnable:
        return 0
    try:
        texts = generate(runnable)
    except SlideChatError as e:
        if len(runnable) == 1:
            runnable[0].error = str(e)
            return 0
        logger.warning("batch failed (%s); retrying its %d rows one by one", e, len(runnable))
        return sum(generate_into([it], generate) for it in runnable)
    if len(texts) != len(runnable):
        raise RuntimeError(f"generate returned {len(texts)} texts for {len(runnable)} items")
    for it, text in zip(runnable, texts):
        it.output = text
    return len(runnable)


def run_inference(items: Sequence[Any], writer: ResultWriter, family: GenerationFamily, *,
                  batch_size: int = 8, progress: bool = True, desc: str = "infer") -> InferenceStats:
    """Answer every item the writer does not hold yet, in input order, ``batch_size`` at a time.

    ``items`` is the WHOLE input (``items[i].position == i``); the first ``writer.done`` are skipped.
    Each batch is written before the next starts, so a killed run loses at most the batch in flight.
    A family that reuses prefixes gets the questions of one image or slide in one batch
    (:func:`group_batches`).
    """
    if batch_size < 1:
        raise SlideChatError(f"batch_size must be >= 1 (got {batch_size})")
    total = len(items)
    if writer.done > total:
        raise SlideChatError(f"output holds {writer.done} rows, the input only {total}", writer.path)
    stats = InferenceStats(total=total, already_done=writer.done)
    pending = list(items[writer.done:])
    t_start = time.perf_counter()
    bar = None
    if progress and pending:
        bar = tqdm(total=total, initial=writer.done, desc=desc, unit="row", dynamic_ncols=True)
    try:
        for rows in group_batches([group_key(family, it) for it in pending], batch_size):
            batch = [pending[j] for j in rows]
            prepare_items(batch, family)
            t0 = time.perf_counter()
            stats.generated += generate_into(batch, family.generate)
            stats.generate_s += time.perf_counter() - t0
            writer.write(batch)
            stats.written += len(batch)
            stats.errors += sum(it.error is not None for it in batch)
            for it in batch:  # free decoded images / features of written rows
                release = getattr(it, "release", None)
                if release is not None:
                    release()
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        stats.total_s = time.perf_counter() - t_start
    return stats


# ================================================================================ cytology (Qwen2-VL)

@dataclass
class CytologyItem:
    """One LLaMA-Factory example to answer (``slidechat infer``)."""

    position: int
    key: Dict[str, Any]  # the line's ``id`` object (writers.make_id)
    images: List[str]  # resolved image paths, as written
    messages: List[Dict[str, str]]  # the conversation up to the final user turn
    system: Optional[str]
    label_content: Optional[str]  # the final assistant turn (None: the row has no answer)
    source: str = ""  # "<file> row <index>" for messages
    prompt_text: str = ""  # the prompt ids decoded with special tokens (what the model reads, for display)
    prompt_ids: List[int] = field(default_factory=list)  # slot-by-slot ids, one pad per image, truncated
    prompt: str = ""  # written: prompt_ids decoded like vllm_infer
    label: str = ""  # written: the assistant slot decoded like vllm_infer, truncated ("" when none)
    truncated: bool = False  # cutoff_len cut the prompt or the label (LLaMA-Factory's infer_seqlen)
    prepared_images: List[PreparedImage] = field(default_factory=list)  # read and scaled once (prepare)
    error: Optional[str] = None
    output: Optional[str] = None

    def release(self) -> None:
        self.prepared_images = []


def cytology_items(examples: Sequence[Any], default_system: Optional[str] = None) -> List[CytologyItem]:
    """:class:`CytologyItem` per ``slidechat.data.llamafactory.Example`` (prompts rendered later):
    the final assistant turn is the label, as in vllm_infer. A row's tools join its system prompt
    (``default_system`` is the one a row without a system prompt gets, as the family renders it)."""
    return [CytologyItem(position=pos, key=make_id(ex.dataset, ex.index, ex.id),
                         images=[os.fspath(p) for p in ex.images], messages=list(ex.prompt_messages),
                         system=ex.system_prompt(default_system), label_content=ex.label, source=ex.name)
            for pos, ex in enumerate(examples)]


@dataclass
class SamplingSettings:
    """vllm_infer's sampling flags; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 1024
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def hf_kwargs(self) -> Dict[str, Any]:
        """``model.generate`` keyword arguments (transformers)."""
        kw: Dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                              "repetition_penalty": self.repetition_penalty}
        if self.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p or 1.0,
                      top_k=self.top_k if self.top_k and self.top_k > 0 else None)
        return kw


class _Qwen2VLText:
    """Prompt/label encoding and decoding shared by both Qwen2-VL engines (needs only a tokenizer).

    ``truncate`` (``slidechat infer``): prompt and label are cut to ``cutoff_len`` as vllm_infer does;
    without it (``chat --image``) a prompt that would be cut is refused instead.
    """

    def __init__(self, tokenizer: Any, *, cutoff_len: int = 2048, skip_special_tokens: bool = True,
                 default_system: Optional[str] = None, image_max_pixels: int = 768 * 768,
                 image_min_pixels: int = 32 * 32, generation_config: Any = None,
                 truncate: bool = True, template: Any = "qwen2_vl",
                 enable_thinking: bool = True) -> None:
        self.tokenizer = tokenizer
        self.cutoff_len = int(cutoff_len)
        self.skip_special_tokens = bool(skip_special_tokens)
        self.default_system = default_system
        self.image_max_pixels = int(image_max_pixels)
        self.image_min_pixels = int(image_min_pixels)
        self.truncate = bool(truncate)
        self.stop_ids = stop_token_ids(tokenizer, generation_config)
        # the family's LLaMA-Factory template; enable_thinking as vllm_infer passes it (reasoning templates)
        self.template = dataclasses.replace(get_vision_template(template), enable_thinking=bool(enable_thinking))

    def render(self, item: CytologyItem) -> None:
        """Fill ``prompt_ids``, ``prompt_text``, ``prompt`` and ``label`` (no image needed: failed rows keep
        them), encoding slot by slot with the training encoder
        (:func:`~slidechat.data.template.encode_qwen2vl_prompt`).

        With ``truncate``, LLaMA-Factory's ``infer_seqlen`` cuts the prompt ids and the label ids to
        ``cutoff_len`` (each image counted once), as vllm_infer does; a prompt whose image placeholder
        is cut away is refused (SlideChatError), since the image cannot be fed. Without ``truncate``, a
        prompt the rule would cut is refused, and a text far over any budget
        (:data:`~slidechat.data.limits.CHARS_PER_TOKEN_BOUND` characters per allowed token) is refused
        before it is tokenized.
        """
        tok = self.tokenizer
        try:
            if not self.truncate:
                text = render_qwen2vl_prompt(item.messages, system=item.system,
                                             default_system=self.default_system, template=self.template)
                max_chars = self.cutoff_len * CHARS_PER_TOKEN_BOUND
                if len(text) > max_chars:
                    raise SlideChatError(
                        f"prompt has {len(text):,} characters, over {max_chars:,} ({CHARS_PER_TOKEN_BOUND} x "
                        f"cutoff_len {self.cutoff_len}); not tokenized", item.source,
                        hint="shorten the conversation")
            enc = encode_qwen2vl_prompt(tok, item.messages, item.label_content, item.system,
                                        cutoff_len=self.cutoff_len, default_system=self.default_system,
                                        template=self.template)
        except ValueError as e:  # ConversationError: a row the reader let through but cannot be asked
            raise SlideChatError(str(e), item.source) from e
        if item.label_content is not None:
            item.label = tok.decode(enc.label_ids, skip_special_tokens=self.skip_special_tokens)
        if len(enc.prompt_ids) < enc.prompt_len and not self.truncate:
            raise SlideChatError(
                f"prompt has {enc.prompt_len} tokens (each image counted once); with its {enc.label_len}-token "
                f"label, cutoff_len {self.cutoff_len} would cut it to {len(enc.prompt_ids)} (LLaMA-Factory's "
                f"rule)", item.source, hint="shorten the conversation; it is not truncated")
        item.prompt_ids = enc.prompt_ids
        item.truncated = enc.truncated
        item.prompt_text = tok.decode(enc.prompt_ids, skip_special_tokens=False)
        item.prompt = tok.decode(enc.prompt_ids, skip_special_tokens=self.skip_special_tokens)
        if enc.truncated:
            logger.warning("%s: cut to cutoff_len %d as LLaMA-Factory does (prompt %d -> %d tokens, label "
                           "%d -> %d)", item.source, self.cutoff_len, enc.prompt_len, len(enc.prompt_ids),
                           enc.label_len, len(enc.label_ids))
            pad_id = tok.convert_tokens_to_ids(self.template.image_token)
            if enc.prompt_ids.count(pad_id) != len(item.images):
                raise SlideChatError(
                    f"cutoff_len {self.cutoff_len} cuts the prompt ({enc.prompt_len} tokens, each image counted "
                    f"once) to {len(enc.prompt_ids)}, which drops an image placeholder", item.source,
                    hint="raise --cutoff_len")

    def prepare(self, item: CytologyItem) -> None:
        """The family's ``prepare``: render the prompt (length checks), then read the images."""
        self.render(item)
        self.load_images(item)

    def load_images(self, item: CytologyItem) -> None:
        """Read and scale the item's images once; the batch builder takes them as prepared."""
        item.prepared_images = [prepare_image(p, self.image_max_pixels, self.image_min_pixels)
                                for p in item.images]

    def answer_length(self, ids: Sequence[int]) -> int:
        """Generated tokens up to and including the first stop token (all when none)."""
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                return k + 1
        return len(ids)

    def decode_new(self, ids: Sequence[int]) -> str:
        """Generated ids -> text: cut at the first stop token, special tokens skipped or kept."""
        ids = list(ids)
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:k]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _generation_config_eos(generation_config: Any) -> List[int]:
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(generation_config, Mapping):
        eos = generation_config.get("eos_token_id")
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> List[int]:
    """The tokens vllm_infer stops on, for the ``qwen2_vl`` template.

    LLaMA-Factory passes ``SamplingParams(stop_token_ids=template.get_stop_token_ids(tokenizer))``:
    the template's stop words plus its eos, which ``replace_eos`` made ``<|im_end|>``
    (:func:`~slidechat.data.template.template_stop_token_ids`). vLLM then also stops on the model's own
    eos (the folder tokenizer's ``eos_token_id``) and on every ``eos_token_id`` of the folder's
    ``generation_config.json`` (``SamplingParams.update_from_generation_config``); so
    ``<|endoftext|>`` stops generation only where the model's generation config lists it (released
    Qwen2-VL-Instruct does), never by itself. Order: template ids, tokenizer eos, generation config.
    """
    ids = template_stop_token_ids(tokenizer)
    extra = [tokenizer.eos_token_id] + _generation_config_eos(generation_config)
    for t in extra:
        if t is not None and int(t) not in ids:
            ids.append(int(t))
    if not ids:
        raise SlideChatError("tokenizer has no <|im_end|>/eos token: not a Qwen2-VL tokenizer")
    return ids


@dataclass
class KeptImageCache:
    """A chat's cache between turns on a Qwen VL model: the cache, the ids it holds and the M-RoPE
    ``rope_deltas`` of its image prefix (the model keeps only the last call's)."""

    prefix: PrefixCache
    rope_deltas: Any


class Qwen2VLFamily(_Qwen2VLText):
    """Qwen2-VL on the transformers engine: batched, left-padded ``model.generate``.

    With ``prefix_reuse`` (the default) the questions of one image (rows with the same image list) share
    one run of the vision tower and one prefill of their common prefix (:meth:`_generate_shared`),
    ``max_batch`` questions per ``generate``.
    """

    def __init__(self, model: Any, processor: Any, sampling: SamplingSettings, *, prefix_reuse: bool = True,
                 max_batch: int = 8, **kw: Any) -> None:
        self.prefix_reuse = bool(prefix_reuse)
        self.max_batch = int(max_batch)
        kw.setdefault("generation_config", getattr(model, "generation_config", None))
        if kw.get("template") is None:  # the model's family's LLaMA-Factory template
            kw["template"] = family_of(model).lf_template
        super().__init__(processor.tokenizer, **kw)
        self.model = model
        self.processor = processor
        self.sampling = sampling
        self.gen_kwargs = sampling.hf_kwargs()
        pad = processor.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        self.new_tokens = 0  # answer tokens generated (through the stop token)
        self.token_slots = 0  # rows x decoding steps: a batch runs until its longest answer ends

    @staticmethod
    def group_key(item: CytologyItem) -> Optional[Hashable]:
        """Rows asking about the same image files share the image's tokens."""
        return tuple(item.images) if item.images else None

    @torch.no_grad()
    def generate(self, items: Sequence[CytologyItem]) -> List[str]:
        if self.sampling.seed is not None:  # reproducible per batch, whatever ran before (resume)
            torch.manual_seed(int(self.sampling.seed) + items[0].position)
        if not self.prefix_reuse:
            return self._generate_batch(items)
        return answer_in_groups(items, self.group_key, self._generate_batch, self._generate_shared)

    def _inputs(self, items: Sequence[CytologyItem]) -> Dict[str, Any]:
        """The left-padded batch on the model's device (pixels in its dtype)."""
        batch = prepare_generation_batch(self.processor, [it.prompt_ids for it in items],
                                         [it.prepared_images for it in items])
        param = next(self.model.parameters())
        return {k: (v.to(param.device, dtype=param.dtype) if k in ("pixel_values",) else v.to(param.device))
                if torch.is_tensor(v) else v for k, v in batch.items()}

    def _texts(self, new: List[List[int]]) -> List[str]:
        self.token_slots += sum(len(row) for row in new)
        self.new_tokens += sum(self.answer_length(row) for row in new)
        return [self.decode_new(row) for row in new]

    def _generate_batch(self, items: Sequence[CytologyItem]) -> List[str]:
        """Today's path: one left-padded ``generate`` over the full prompts."""
        inputs = self._inputs(items)
        with per_image_vision(self.model):
            out = self.model.generate(**inputs, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                      **self.gen_kwargs)
        return self._texts(out[:, inputs["input_ids"].shape[1]:].tolist())

    def _generate_shared(self, items: Sequence[CytologyItem]) -> List[str]:
        """Questions about one image: the vision tower and the common prefix (which must hold every image
        token, else there is nothing worth sharing and today's path answers) run once; the rest from forks
        of the prefix cache. M-RoPE: the prefill sets the model's ``rope_deltas`` for the prefix, and
        ``generate`` continues with text positions (mask cumulative sum) + that delta, which is exactly
        ``get_rope_index`` of each full prompt for text after the image
        (``Qwen2VLForConditionalGeneration._prepare_position_ids_for_generation``)."""
        inputs = self._inputs(items)
        mask = inputs["attention_mask"].bool()
        rows = [ids[m] for ids, m in zip(inputs["input_ids"], mask)]
        shared = common_prefix_len([r.tolist() for r in rows])
        vision = inputs["mm_token_type_ids"][0][mask[0]].nonzero() if "mm_token_type_ids" in inputs else None
        if vision is None or vision.numel() == 0 or int(vision.max()) >= shared:
            return self._generate_batch(items)
        cache = self._image_prefill(inputs, rows[0], shared, len(items[0].prepared_images))
        texts: List[str] = []
        for lo in range(0, len(rows), max(1, self.max_batch)):
            new = generate_from_prefix(self.model, cache, rows[0][:shared],
                                       [r[shared:] for r in rows[lo:lo + self.max_batch]], embeds=False,
                                       pad=self.pad_id, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                       **self.gen_kwargs)
            texts += self._texts(new.tolist())
        return texts

    def _image_prefill(self, inputs: Mapping[str, Any], row: torch.Tensor, upto: int, n_images: int) -> Any:
        """A new cache of ``row[:upto]`` (row 0 of ``inputs``, holding its ``n_images`` images): the vision
        tower runs here, and the model's ``rope_deltas`` become the prefix's."""
        grid = inputs["image_grid_thw"][:n_images]
        types = inputs["mm_token_type_ids"][0][inputs["attention_mask"][0].bool()]
        with per_image_vision(self.model):
            return prefill(self.model, input_ids=row[None, :upto], attention_mask=torch.ones_like(row[None, :upto]),
                           pixel_values=inputs["pixel_values"][:int(grid.prod(-1).sum())], image_grid_thw=grid,
                           mm_token_type_ids=types[None, :upto])

    @torch.no_grad()
    def answer_kept(self, item: CytologyItem, kept: Optional[KeptImageCache]) -> "tuple[str, KeptImageCache]":
        """One chat turn from the cache the previous turn kept (``chat --image``): when the kept cache
        still holds this prompt's image, it is cropped to what the prompt shares with it and only the
        new text is prefilled (positions: the image prefix's ``rope_deltas``, kept with it); otherwise
        the prompt is prefilled with its image. Returns the answer and the cache to keep."""
        inputs = self._inputs([item])
        row = inputs["input_ids"][0]  # one row: no padding
        n = int(row.shape[0])
        rope_model = getattr(self.model, "model", self.model)
        last_image = int(inputs["mm_token_type_ids"][0].nonzero().max())
        start = shared_len(kept.prefix.ids, row.tolist()) if kept is not None else 0
        if kept is not None and start > last_image:
            cache = kept.prefix.cache
            crop_cache(cache, start)
            rope_model.rope_deltas = kept.rope_deltas
            if start < n - 1:
                cache = prefill(self.model, cache, input_ids=row[None, start:n - 1])
        else:
            cache = self._image_prefill(inputs, row, n - 1, len(item.prepared_images))
        new = generate_from_prefix(self.model, cache, row[:n - 1], [row[n - 1:]], embeds=False, fork=False,
                                   pad=self.pad_id, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                   **self.gen_kwargs)
        held = (row.tolist() + new[0].tolist())[:cache.get_seq_length()]
        return self._texts(new.tolist())[0], KeptImageCache(PrefixCache(cache, held), rope_model.rope_deltas)


class VllmQwen2VLFamily(_Qwen2VLText):
    """Qwen2-VL on vLLM, set up like LLaMA-Factory's ``scripts/vllm_infer.py`` (only when installed)."""

    def __init__(self, model_name_or_path: PathLike, sampling: SamplingSettings,
                 adapter_name_or_path: Optional[PathLike] = None, dtype: str = "auto",
                 vllm_config: Optional[Mapping[str, Any]] = None, trust_remote_code: bool = False,
                 pipeline_parallel_size: int = 1, **kw: Any) -> None:
        vllm = require_vllm()
        tok = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        if kw.get("template") is None:  # the folder's family's LLaMA-Factory template
            kw["template"] = read_family(model_name_or_path)[1].lf_template
        super().__init__(tok, **kw)
        pp = int(pipeline_parallel_size)
        engine_args: Dict[str, Any] = {
            "model": os.fspath(model_name_or_path), "dtype": dtype,
            "max_model_len": self.cutoff_len + sampling.max_new_tokens,
            "tensor_parallel_size": (torch.cuda.device_count() // pp) or 1, "pipeline_parallel_size": pp,
            "disable_log_stats": True,
            "enable_lora": adapter_name_or_path is not None, "trust_remote_code": bool(trust_remote_code),
            "limit_mm_per_prompt": {"image": 4, "video": 2}}
        engine_args.update(dict(vllm_config or {}))
        try:
            self.llm = vllm.LLM(**engine_args)
        except (ValueError, RuntimeError, OSError) as e:  # e.g. vLLM's "weights ... were not initialized"
            reason = " ".join(str(e).split())[:300]
            raise SlideChatError(f"vLLM cannot load the model: {type(e).__name__}: {reason}",
                                 model_name_or_path) from None
        self.params = vllm.SamplingParams(
            repetition_penalty=sampling.repetition_penalty or 1.0,
            temperature=sampling.temperature, top_p=sampling.top_p or 1.0,
            # as vllm_infer: the template's stop ids; vLLM adds the model's eos and generation config itself
            top_k=sampling.top_k or -1, stop_token_ids=template_stop_token_ids(tok, self.template),
            max_tokens=sampling.max_new_tokens,
            skip_special_tokens=self.skip_special_tokens, seed=sampling.seed)
        self.lora = None
        if adapter_name_or_path is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("default", 1, os.fspath(adapter_name_or_path))

    def generate(self, items: Sequence[CytologyItem]) -> List[str]:
        # token ids with one pad per image, as vllm_infer passes them (vLLM expands the image itself)
        inputs = [{"prompt_token_ids": list(it.prompt_ids),
                   "multi_modal_data": {"image": [p.image for p in it.prepared_images]}
                   if it.prepared_images else None} for it in items]
        results = self.llm.generate(inputs, self.params, lora_request=self.lora)
        return [r.outputs[0].text for r in results]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> Any:
    """The ``vllm`` module, or one clear error saying it is not installed (never a dependency)."""
    if not vllm_available():
        raise SlideChatError("--engine vllm: vLLM is not installed; `--engine transformers` (the default) "
                             "runs the same inference without it",
                             hint="pip install vllm on a GPU machine to use it")
    import vllm

    return vllm


# ================================================================================ slides (SlideChat)

class SlideFamily:
    """SlideChat on SlideBench rows: prepare = features + prompt ids (errors per row), generate =
    one batched ``predict``. The mmengine test loop's dataloader prepares the rows itself and hands
    them over with :meth:`hold`; both drivers then answer through :func:`generate_into`."""

    def __init__(self, model: Any, dataset: Any, *, max_new_tokens: int = 500, fp16: bool = False,
                 generation_kwargs: Optional[Mapping[str, Any]] = None, prefix_reuse: bool = True,
                 batch_size: int = 8) -> None:
        self.model = model  # SlideChatTrainModel (mmengine) - it has data_preprocessor + predict
        self.dataset = dataset  # SlideBenchTestDataset: its prepare_item reads features, encodes the prompt
        self.tokenizer = dataset.tokenizer
        self.max_new_tokens = int(max_new_tokens)
        # the questions of one slide: one encode + one prefill of their common prefix (issue 14)
        self.prefix_reuse = bool(prefix_reuse)
        self.batch_size = int(batch_size)  # questions per generate call from one prefill
        self.fp16 = fp16
        self.generation_kwargs = dict(generation_kwargs or {})
        self.generation_kwargs.setdefault("use_cache", True)
        self._prepared: Dict[int, Mapping[str, Any]] = {}
        self.timings: Dict[str, float] = {"generate_s": 0.0, "new_tokens": 0, "rows_generated": 0}

    def prepare(self, item: Any) -> None:
        self.hold([self.dataset.prepare_item(item)])

    def hold(self, instances: Iterable[Mapping[str, Any]]) -> None:
        """Keep the prepared instances (``SlideBenchTestDataset.prepare_item`` outputs) of the runnable
        rows until :meth:`generate` answers them; rows that failed to prepare carry their ``error``."""
        for inst in instances:
            item = inst["item"]
            if item.error is None:
                self._prepared[id(item)] = inst

    @staticmethod
    def group_key(item: Any) -> Optional[Hashable]:
        """Rows reading the same feature file ask about the same slide (the same tokens: the patch
        subsample is deterministic)."""
        path = getattr(item, "feature_path", None)
        return None if path is None else os.fspath(path)

    def generate(self, items: Sequence[Any]) -> List[str]:
        insts = [self._prepared[id(it)] for it in items]
        try:
            texts = self._answer(insts)
        except SlideChatError:
            if len(items) == 1:  # no retry follows (generate_into retries batches row by row)
                self._prepared.pop(id(items[0]), None)
            raise
        for it in items:
            self._prepared.pop(id(it), None)
        return texts

    def _answer(self, insts: Sequence[Mapping[str, Any]]) -> List[str]:
        """Texts for prepared rows: the questions of one slide through :meth:`_predict_shared`, the other
        rows together through today's batched ``predict``."""
        def batched(rows: List[Mapping[str, Any]]) -> List[str]:
            return self._predict(slidebench_collate_fn(rows)["data"])

        if not self.prefix_reuse:
            return batched(list(insts))
        return answer_in_groups(insts, lambda inst: self.group_key(inst["item"]), batched, self._predict_shared)

    def _autocast(self) -> Any:
        try:
            device_type = next(self.model.parameters()).device.type
        except StopIteration:
            device_type = "cpu"
        return torch.autocast(device_type=device_type, enabled=self.fp16)

    def _decoded(self, new_tokens: Sequence[torch.Tensor], t0: float) -> List[str]:
        self.timings["generate_s"] += time.perf_counter() - t0
        self.timings["new_tokens"] += sum(len(t) for t in new_tokens)
        self.timings["rows_generated"] += len(new_tokens)
        texts = self.tokenizer.batch_decode([t.tolist() for t in new_tokens], skip_special_tokens=True)
        return [clean_output(t) for t in texts]

    @torch.no_grad()
    def _predict(self, data: Mapping[str, Any]) -> List[str]:
        """Texts for the runnable rows of a collated SlideBench batch (``data['rows']`` order)."""
        model = self.model
        data = model.data_preprocessor({"data": dict(data), "data_samples": None}, False)["data"]
        t0 = time.perf_counter()
        with self._autocast():
            new_tokens = model.predict(data, max_new_tokens=self.max_new_tokens, **self.generation_kwargs)
        return self._decoded(new_tokens, t0)

    @torch.no_grad()
    def _predict_shared(self, insts: Sequence[Mapping[str, Any]]) -> List[str]:
        """Texts for several questions about ONE slide: the slide encoded once, the common prompt prefix
        prefilled once (``SlideChatModel.generate_shared``)."""
        core = getattr(self.model, "core", self.model)  # SlideChatTrainModel wraps the SlideChatModel
        coords = insts[0].get("coords")
        t0 = time.perf_counter()
        with self._autocast():
            vis = core.encode_slides([insts[0]["features"]], None if coords is None else [coords])[0]
            new_tokens, _ = core.generate_shared([inst["input_ids"] for inst in insts], vis,
                                                 max_batch=self.batch_size, max_new_tokens=self.max_new_tokens,
                                                 **self.generation_kwargs)
        return self._decoded(new_tokens, t0)
