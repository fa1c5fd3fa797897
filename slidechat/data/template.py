"""SlideChat conversations -> token ids and loss labels, in one of two prompt formats.

``qwen_chat`` (compat, the default of every released-model config): the released model was trained with
xtuner's ``qwen_chat`` template and ``llava_map_fn``: the ``<image>`` placeholder is moved to the front of
the first user turn, each turn's prompt is ``<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n``
(no loss), the answer plus ``<|im_end|>`` carries the loss, and a ``\\n`` separator (no loss) follows.
Pieces are tokenized separately, as xtuner did, so ids match what the released weights saw. No system
prompt unless asked; Qwen has no BOS token.

``chat_template`` (:class:`TokenizerChatTemplate`): the LLM's own chat template, so any Hugging Face causal
LM works (Qwen2.5, Qwen3, Llama 3.x, ...). The conversation is rendered by
``tokenizer.apply_chat_template`` and the whole string is tokenized at once, so the ids equal
``apply_chat_template(..., tokenize=True)`` token for token, the ``<image>`` text then collapsed into one
IMAGE_TOKEN_INDEX. Labels come from character spans: each assistant answer as rendered plus the
end-of-turn token after it. Extra template variables (Qwen3's ``enable_thinking``, off unless asked) come
from ``chat_template_kwargs``.

Training (:func:`encode_conversation`), ``slidechat test`` / ``xtuner test``, ``slidechat chat`` and the
slide inference path all encode through :func:`tokenize_pairs`.

Every prompt format, slide and vision (``qwen2_vl``, ``qwen3_vl``: LLaMA-Factory's, below), is registered
once by name in :data:`PROMPT_FORMATS`; each kind has its typed lookup (:func:`resolve_template` /
:func:`get_template` for slides, :func:`get_vision_template` for the Qwen VL families), so a slide format
never reaches the vision encoder by mistake, and one "unknown template" error lists the names of the kind
asked for. :func:`config_template` checks a slide model's configured format where the model is built.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training example (the dataset adds file/row)."""


@dataclass(frozen=True)
class ChatTemplate:
    """Prompt pieces of a chat format; ``{input}`` / ``{system}`` are filled in."""

    system: str
    instruction: str
    suffix: str
    sep: str
    stop_words: Tuple[str, ...] = field(default_factory=tuple)


QWEN_CHAT = ChatTemplate(
    system="<|im_start|>system\n{system}<|im_end|>\n",
    instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>",
    sep="\n",
    stop_words=("<|im_end|>", "<|endoftext|>"),
)

#: name of the prompt format that renders through the tokenizer's own chat template
CHAT_TEMPLATE = "chat_template"
#: template variables passed unless the config says otherwise: Qwen3 answers without a think block
#: (templates that do not read a variable ignore it)
DEFAULT_CHAT_TEMPLATE_KWARGS: Dict[str, Any] = {"enable_thinking": False}


@dataclass(frozen=True)
class TokenizerChatTemplate:
    """The LLM's own chat template (``tokenizer.apply_chat_template``), with extra template variables."""

    kwargs: Tuple[Tuple[str, Any], ...] = tuple(DEFAULT_CHAT_TEMPLATE_KWARGS.items())
    name: str = CHAT_TEMPLATE

    def template_kwargs(self) -> Dict[str, Any]:
        return dict(self.kwargs)


#: a prompt format a slide model is configured with (``SlideChatConfig.prompt_template``)
SlideFormat = Union[ChatTemplate, TokenizerChatTemplate]


def resolve_template(template: Any = "qwen_chat",
                     chat_template_kwargs: Optional[Dict[str, Any]] = None) -> SlideFormat:
    """A slide prompt format from its config name (``qwen_chat`` or ``chat_template``) and, for the
    latter, the template variables (over :data:`DEFAULT_CHAT_TEMPLATE_KWARGS`)."""
    if isinstance(template, (ChatTemplate, TokenizerChatTemplate)):
        if chat_template_kwargs and isinstance(template, TokenizerChatTemplate):
            return TokenizerChatTemplate(tuple({**template.template_kwargs(),
                                                **dict(chat_template_kwargs)}.items()))
        return template
    if template == CHAT_TEMPLATE:
        kwargs = {**DEFAULT_CHAT_TEMPLATE_KWARGS, **dict(chat_template_kwargs or {})}
        return TokenizerChatTemplate(tuple(kwargs.items()))
    if chat_template_kwargs:
        raise ConversationError(f"chat_template_kwargs given but prompt template is '{template}' "
                                f"(they apply to '{CHAT_TEMPLATE}' only)")
    return get_template(template)


def config_template(prompt_template: str, chat_template_kwargs: Optional[Mapping[str, Any]] = None
                    ) -> SlideFormat:
    """The prompt format a slide model's config names (``SlideChatConfig``'s two fields); an unknown one is
    refused in one line naming the config, where a model is built or loaded, before anything runs."""
    try:
        return resolve_template(prompt_template, dict(chat_template_kwargs or {}))
    except ConversationError as e:
        raise SlideChatError(f"slidechat_config: {e}") from None


def describe_template(template: Any) -> str:
    """One line for logs: which prompt format a run uses (a silent switch would go unnoticed)."""
    tpl = resolve_template(template)
    if isinstance(tpl, TokenizerChatTemplate):
        kw = ", ".join(f"{k}={v!r}" for k, v in tpl.kwargs)
        return f"{CHAT_TEMPLATE} (the tokenizer's own chat template; {kw or 'no extra variables'})"
    name = next((n for n, t in PROMPT_FORMATS.items() if t == tpl), "custom")
    return f"{name} (SlideChat's xtuner format)" if name == "qwen_chat" else name


def get_template(template: "str | ChatTemplate") -> ChatTemplate:
    """An xtuner-style slide format by name (``qwen_chat``)."""
    if isinstance(template, ChatTemplate):
        return template
    return _lookup(template, ChatTemplate)


def normalize_conversation(conversations: Any) -> List[Tuple[str, str]]:
    """SlideChat ``conversations`` -> ``[(question, answer), ...]`` with one ``<image>`` in front.

    Leading assistant messages are dropped and consecutive user messages joined (as llava_map_fn
    did); every ``<image>`` is removed and a single ``<image>\\n`` is put at the start of the first
    question, since a sample has exactly one slide.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("'conversations' must be a non-empty list")
    pairs: List[Tuple[str, str]] = []
    pending: List[str] = []
    n_images = 0
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise ConversationError(f"message {i} must be an object with 'from' and 'value'")
        role, value = msg["from"], msg["value"]
        if not isinstance(value, str):
            raise ConversationError(f"message {i} 'value' must be a string")
        if role in ("human", "user"):
            n_images += value.count(IMAGE_TOKEN)
            pending.append(value.replace(IMAGE_TOKEN, "").strip())
        elif role in ("gpt", "assistant"):
            if not pending:
                if pairs:
                    raise ConversationError(f"message {i}: two assistant messages in a row")
                continue  # leading assistant message: skipped like the original
            if not value.strip():
                raise ConversationError(f"message {i}: empty answer")
            pairs.append(("\n".join(p for p in pending if p), value))
            pending = []
        else:
            raise ConversationError(f"message {i}: unknown role '{role}' (expected human/gpt)")
    if pending:
        raise ConversationError("the last user message has no answer")
    if not pairs:
        raise ConversationError("no (question, answer) pair")
    if n_images == 0:
        raise ConversationError(f"no {IMAGE_TOKEN} placeholder in any user message")
    first_q = pairs[0][0]
    pairs[0] = (f"{IMAGE_TOKEN}\n{first_q}" if first_q else IMAGE_TOKEN, pairs[0][1])
    return pairs


def _encode_text(tokenizer: Any, text: str) -> List[int]:
    """Token ids of ``text`` with one IMAGE_TOKEN_INDEX per ``<image>`` (pieces tokenized apart)."""
    out: List[int] = []
    chunks = text.split(IMAGE_TOKEN)
    for k, chunk in enumerate(chunks):
        if chunk:
            out.extend(tokenizer.encode(chunk, add_special_tokens=False))
        if k != len(chunks) - 1:
            out.append(IMAGE_TOKEN_INDEX)
    return out


def tokenize_pairs(tokenizer: Any, pairs: Sequence[Tuple[str, Optional[str]]],
                   template: Any = "qwen_chat", system: str = ""
                   ) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)``; an answer of ``None`` (last pair only) leaves an open assistant turn."""
    for k, (_, answer) in enumerate(pairs):
        if answer is None and k != len(pairs) - 1:
            raise ConversationError("only the last turn may be left without an answer")
    tpl = resolve_template(template)
    if isinstance(tpl, TokenizerChatTemplate):
        return _tokenize_with_chat_template(tokenizer, pairs, tpl, system)
    input_ids: List[int] = []
    labels: List[int] = []
    for k, (question, answer) in enumerate(pairs):
        prompt = tpl.instruction.format(input=question)
        if k == 0 and system:
            prompt = tpl.system.format(system=system) + prompt
        ids = _encode_text(tokenizer, prompt)
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
        if answer is None:
            if k != len(pairs) - 1:
                raise ConversationError("only the last turn may be left without an answer")
            break
        ids = tokenizer.encode(answer + tpl.suffix, add_special_tokens=False)
        input_ids += ids
        labels += ids
        if tpl.sep:
            ids = tokenizer.encode(tpl.sep, add_special_tokens=False)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------
# chat_template: the tokenizer's own template, whole string tokenized, labels from character spans
# ---------------------------------------------------------------------------------------------------------

_SENTINEL = "\x00slidechat-answer-{}\x00"  # no whitespace: survives the templates' trim/strip filters


def _chat_messages(pairs: Sequence[Tuple[str, Optional[str]]], system: str,
                   replace: Optional[int] = None) -> List[Dict[str, str]]:
    """Role/content messages of ``pairs``; the ``replace``-th answer becomes a sentinel string."""
    messages = [{"role": "system", "content": system}] if system else []
    for k, (question, answer) in enumerate(pairs):
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant",
                             "content": _SENTINEL.format(k) if k == replace else answer})
    return messages


def render_chat_template(tokenizer: Any, pairs: Sequence[Tuple[str, Optional[str]]],
                         template: Any = CHAT_TEMPLATE, system: str = "",
                         replace: Optional[int] = None) -> str:
    """The text ``tokenizer.apply_chat_template`` renders for ``pairs`` (an open last turn adds the
    generation prompt); ``replace``: the index of an answer rendered as a sentinel, to locate it."""
    tpl = resolve_template(template)
    if not isinstance(tpl, TokenizerChatTemplate):
        raise ConversationError(f"render_chat_template needs the '{CHAT_TEMPLATE}' prompt template")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConversationError(f"prompt template '{CHAT_TEMPLATE}' but the tokenizer has no chat template "
                                f"(use 'qwen_chat' or a tokenizer folder that ships one)")
    open_turn = bool(pairs) and pairs[-1][1] is None
    try:
        text = tokenizer.apply_chat_template(_chat_messages(pairs, system, replace), tokenize=False,
                                             add_generation_prompt=open_turn, **tpl.template_kwargs())
    except Exception as e:  # jinja errors (raise_exception in the template, bad syntax) -> one line
        raise ConversationError(f"the tokenizer's chat template failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(text, str):
        raise ConversationError("apply_chat_template(tokenize=False) did not return a string")
    return text


def _token_range(offsets: Sequence[Tuple[int, int]], start: int, end: int, what: str) -> Tuple[int, int]:
    """Indices ``[i, j)`` of the tokens exactly covering characters ``[start, end)``; a token that
    straddles either boundary is refused."""
    i = j = None
    for t, (s, e) in enumerate(offsets):
        if e <= start or s >= end:
            continue
        if s < start or e > end:
            raise ConversationError(f"{what} does not align with token boundaries (a token spans "
                                    f"characters {s}-{e} across its edge at {start if s < start else end})")
        if i is None:
            i = t
        j = t + 1
    if i is None:
        raise ConversationError(f"{what} has no tokens")
    return i, j


def _answer_span(text: str, pairs: Sequence[Tuple[str, Optional[str]]], tokenizer: Any,
                 tpl: TokenizerChatTemplate, system: str, k: int) -> Tuple[int, int, int]:
    """``(start, core_start, end)``: characters of the ``k``-th answer in ``text``, where a render with that
    answer replaced by a sentinel puts the sentinel (the text before it must be the same). ``start``: the
    answer as written there, with whatever leading whitespace the template kept; ``core_start``: its
    first non-space character; ``end``: after its last one (templates may strip whitespace)."""
    marked = render_chat_template(tokenizer, pairs, tpl, system, replace=k)
    sentinel = _SENTINEL.format(k)
    at = marked.find(sentinel)
    if at < 0 or marked.count(sentinel) != 1:
        raise ConversationError(f"the chat template does not render answer {k} once and verbatim")
    if text[:at] != marked[:at]:
        raise ConversationError(f"the chat template renders the text before answer {k} differently "
                                f"depending on the answer")
    answer = pairs[k][1] or ""
    core = answer.strip()
    lead = len(answer) - len(answer.lstrip())
    start = at
    while start - at < lead and start < len(text) and text[start].isspace():
        start += 1
    if core and text.startswith(core, start):
        return at, start, start + len(core)
    raise ConversationError(f"the chat template does not render answer {k} verbatim")


def _tokenize_with_chat_template(tokenizer: Any, pairs: Sequence[Tuple[str, Optional[str]]],
                                 tpl: TokenizerChatTemplate, system: str) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of the rendered conversation, tokenized as one string.

    Ids are ``apply_chat_template(..., tokenize=True)``'s with the ``<image>`` tokens replaced by one
    IMAGE_TOKEN_INDEX (see :func:`_ids_with_placeholder` for vocabularies where they are not whole).
    Labels: each answer's tokens plus the end-of-turn token the template writes right after it
    (trailing whitespace of the answer may sit in between and is labelled too); everything else
    IGNORE_INDEX. An answer's leading whitespace is labelled when it forms tokens of its own, and left to
    the prompt when the tokenizer merges it with the template's (``"\\n" + "\\nAnswer"``). An answer
    that does not fall on token boundaries is refused.
    """
    text = render_chat_template(tokenizer, pairs, tpl, system)
    n_img = text.count(IMAGE_TOKEN)
    if n_img != 1:
        raise ConversationError(f"the rendered prompt holds {n_img} '{IMAGE_TOKEN}' strings, expected the "
                                f"one slide placeholder (keep '{IMAGE_TOKEN}' out of the system prompt)")
    if not getattr(tokenizer, "is_fast", False):
        raise ConversationError(f"prompt template '{CHAT_TEMPLATE}' needs a fast tokenizer (character "
                                f"offsets locate the answers)")
    ids, offsets = _ids_with_placeholder(tokenizer, text)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    labels = [IGNORE_INDEX] * len(ids)
    for k, (_, answer) in enumerate(pairs):
        if answer is None:
            continue
        start, core_start, end = _answer_span(text, pairs, tokenizer, tpl, system, k)
        try:  # the answer with its kept leading whitespace, else (merged with the template's) without
            i, j = _token_range(offsets, start, end, f"answer {k}")
        except ConversationError:
            if core_start == start:
                raise
            i, j = _token_range(offsets, core_start, end, f"answer {k}")
        if IMAGE_TOKEN_INDEX in ids[i:j]:
            raise ConversationError(f"the '{IMAGE_TOKEN}' placeholder falls inside answer {k}")
        eot = j
        while eot < len(ids) and ids[eot] not in special:
            s, e = offsets[eot]
            if text[s:e].strip():
                raise ConversationError(f"the chat template writes no end-of-turn token after answer {k} "
                                        f"(found {text[s:e]!r})")
            eot += 1
        if eot == len(ids):
            raise ConversationError(f"the chat template writes no end-of-turn token after answer {k}")
        labels[i:eot + 1] = ids[i:eot + 1]
    return ids, labels


_split_noted: set = set()


def _ids_with_placeholder(tokenizer: Any, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Token ids and character offsets of ``text`` with the ``<image>`` text as one IMAGE_TOKEN_INDEX.

    The whole string is tokenized; when the placeholder's characters are whole tokens they are replaced,
    so the ids are ``apply_chat_template``'s exactly. When a token crosses its edge (byte-level BPE
    vocabularies that merge ``>`` with the newline after it), the text is split at the placeholder and
    each side tokenized on its own: the ids ``apply_chat_template`` gives once ``<image>`` is an added
    token, which is how the slide stands between the text tokens in both training and generation.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    p = text.index(IMAGE_TOKEN)
    q = p + len(IMAGE_TOKEN)
    try:
        a, b = _token_range(offsets, p, q, f"the '{IMAGE_TOKEN}' placeholder")
        return ids[:a] + [IMAGE_TOKEN_INDEX] + ids[b:], offsets[:a] + [(p, q)] + offsets[b:]
    except ConversationError:
        pass
    key = getattr(tokenizer, "name_or_path", "") or id(tokenizer)
    if key not in _split_noted:
        _split_noted.add(key)
        logger.info("'%s' is not on token boundaries for tokenizer %s: prompts are split at the placeholder "
                    "(as for an added token)", IMAGE_TOKEN, key)
    before = tokenizer(text[:p], add_special_tokens=False, return_offsets_mapping=True)
    after = tokenizer(text[q:], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(before["input_ids"]) + [IMAGE_TOKEN_INDEX] + list(after["input_ids"])
    offsets = ([tuple(o) for o in before["offset_mapping"]] + [(p, q)]
               + [(s + q, e + q) for s, e in after["offset_mapping"]])
    return ids, offsets


def encode_conversation(tokenizer: Any, conversations: Any,
                        template: Any = "qwen_chat", system: str = ""
                        ) -> Dict[str, List[int]]:
    """Training example: ``{'input_ids', 'labels'}`` with exactly one IMAGE_TOKEN_INDEX."""
    input_ids, labels = tokenize_pairs(tokenizer, normalize_conversation(conversations),
                                       template, system)
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tokenizer: Any, history: Sequence[Tuple[str, str]], question: str,
                  template: Any = "qwen_chat", system: str = "") -> List[int]:
    """Generation prompt for ``question`` after ``history`` [(question, answer), ...].

    The slide placeholder is normalised like in training: one ``<image>`` at the front of the
    first question (added there if no turn has one).
    """
    pairs: List[Tuple[str, Optional[str]]] = []
    all_q = [q for q, _ in history] + [question]
    first = all_q[0].replace(IMAGE_TOKEN, "").strip()
    pairs_q = [f"{IMAGE_TOKEN}\n{first}" if first else IMAGE_TOKEN] + \
        [q.replace(IMAGE_TOKEN, "").strip() for q in all_q[1:]]
    for k, (_, answer) in enumerate(history):
        pairs.append((pairs_q[k], answer))
    pairs.append((pairs_q[-1], None))
    ids, _ = tokenize_pairs(tokenizer, pairs, template, system)
    return ids


# ---------------------------------------------------------------------------------------------------------
# qwen2_vl: LLaMA-Factory's template for Qwen2-VL, the one CytoChat was trained and evaluated with.
#
# From LLaMA-Factory's data/template.py (the commit CytoChat pins): user slot
# "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n", assistant slot "{{content}}<|im_end|>\n",
# system slot "<|im_start|>system\n{{content}}<|im_end|>\n" (first turn only), default system
# "You are a helpful assistant.", stop word <|im_end|>; its qwen2_vl mm_plugin turns each <image> into
# <|vision_start|> + <|image_pad|> x (t*h*w / merge^2) + <|vision_end|>. Training pairs each user turn
# (no loss) with the following assistant turn (loss on every token of its slot, i.e. the answer,
# <|im_end|> and the trailing "\n"); each slot string is tokenized on its own.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionChatTemplate:
    """LLaMA-Factory-style slots (``{content}`` filled in) plus the image placeholder expansion."""

    name: str
    format_user: str
    format_assistant: str
    format_system: str
    default_system: str
    stop_words: Tuple[str, ...]
    vision_bos: str
    image_token: str
    vision_eos: str
    placeholder: str = IMAGE_TOKEN
    # LLaMA-Factory's ReasoningTemplate (qwen3_vl): (open, close) thought words, None for a plain template;
    # ``enable_thinking`` is LLaMA-Factory's default True (an empty thought is part of every answer)
    thought_words: Optional[Tuple[str, str]] = None
    enable_thinking: bool = True

    def empty_thought(self) -> str:
        """``add_thought()``: the empty thought put before an answer that has none."""
        return f"{self.thought_words[0]}{self.thought_words[1]}" if self.thought_words else ""

    def has_thought(self, content: str) -> bool:
        """Whether an answer carries either thought word (LLaMA-Factory compares them stripped)."""
        return bool(self.thought_words) and (self.thought_words[0].strip() in content
                                             or self.thought_words[1].strip() in content)

    def remove_thought(self, content: str) -> str:
        """LLaMA-Factory's ``remove_thought``: every thought block dropped, then leading newlines stripped
        (also from an answer without a thought: a history answer starting with "\\n" loses it)."""
        if not self.thought_words:
            return content
        pattern = re.compile(f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}",
                             re.DOTALL)
        return re.sub(pattern, "", content).lstrip("\n")


QWEN2_VL = VisionChatTemplate(
    name="qwen2_vl",
    format_user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    format_assistant="{content}<|im_end|>\n",
    format_system="<|im_start|>system\n{content}<|im_end|>\n",
    default_system="You are a helpful assistant.",
    stop_words=("<|im_end|>",),
    vision_bos="<|vision_start|>",
    image_token="<|image_pad|>",
    vision_eos="<|vision_end|>",
)

# LLaMA-Factory's ``qwen3_vl`` (data/template.py): the qwen2_vl slots, NO default system prompt, and a
# ReasoningTemplate with thought words ("<think>\n", "\n</think>\n\n"): in training every answer
# without a thought gets the empty thought before it (loss on it, enable_thinking True); an inference
# prompt drops thoughts from history answers (``remove_thought``, which also strips leading newlines) and
# leaves the generation prompt as it is (the model writes the empty thought itself).
QWEN3_VL = VisionChatTemplate(
    name="qwen3_vl",
    format_user=QWEN2_VL.format_user,
    format_assistant=QWEN2_VL.format_assistant,
    format_system=QWEN2_VL.format_system,
    default_system="",
    stop_words=("<|im_end|>",),
    vision_bos="<|vision_start|>",
    image_token="<|image_pad|>",
    vision_eos="<|vision_end|>",
    thought_words=("<think>\n", "\n</think>\n\n"),
)

# ---------------------------------------------------------------------------------------------------------
# the registry: every prompt format by name, one lookup per kind (a slide format never reaches the vision
# encoder by mistake, nor the other way round)
# ---------------------------------------------------------------------------------------------------------

PromptFormat = Union[ChatTemplate, TokenizerChatTemplate, VisionChatTemplate]

PROMPT_FORMATS: Dict[str, PromptFormat] = {"qwen_chat": QWEN_CHAT, CHAT_TEMPLATE: TokenizerChatTemplate(),
                                           "qwen2_vl": QWEN2_VL, "qwen3_vl": QWEN3_VL}

#: what each kind is called in the "unknown template" error, and which registry entries are of that kind
_KINDS: Dict[type, Tuple[str, Tuple[type, ...]]] = {
    ChatTemplate: ("chat template", (ChatTemplate, TokenizerChatTemplate)),
    VisionChatTemplate: ("template", (VisionChatTemplate,)),
}


def prompt_format_names(kind: type) -> List[str]:
    """The registered names of one kind (slide: ``ChatTemplate``, vision: ``VisionChatTemplate``)."""
    return [n for n, f in PROMPT_FORMATS.items() if isinstance(f, _KINDS[kind][1])]


def _lookup(name: Any, kind: type) -> Any:
    """The registered format ``name`` if it is a ``kind``; else the one "unknown template" error."""
    fmt = PROMPT_FORMATS.get(name) if isinstance(name, str) else None
    if not isinstance(fmt, kind):
        word = _KINDS[kind][0]
        raise ConversationError(f"unknown {word} '{name}' (known: {', '.join(prompt_format_names(kind))})")
    return fmt


def get_vision_template(template: "str | VisionChatTemplate") -> VisionChatTemplate:
    """A LLaMA-Factory vision format by name (``qwen2_vl``, ``qwen3_vl``)."""
    if isinstance(template, VisionChatTemplate):
        return template
    return _lookup(template, VisionChatTemplate)


def expand_image_placeholders(text: str, image_seqlens: Optional[Sequence[int]] = None, start: int = 0,
                              template: "str | VisionChatTemplate" = "qwen2_vl") -> Tuple[str, int]:
    """Replace each ``<image>`` by the vision span; ``image_seqlens[k]`` pad tokens for the k-th image
    (one pad each when None, the unexpanded form the processor expands). Returns (text, next index)."""
    tpl = get_vision_template(template)
    k = start
    while tpl.placeholder in text:
        n = 1 if image_seqlens is None else int(image_seqlens[k])
        text = text.replace(tpl.placeholder, f"{tpl.vision_bos}{tpl.image_token * n}{tpl.vision_eos}", 1)
        k += 1
    return text, k


def _system_and_turns(messages: Sequence[Dict[str, str]], system: Optional[str],
                      default_system: Optional[str], tpl: VisionChatTemplate
                      ) -> Tuple[str, List[Dict[str, str]]]:
    turns = list(messages)
    if turns and turns[0].get("role") == "system":
        if not system:
            system = turns[0].get("content", "")
        turns = turns[1:]
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise ConversationError(f"turn {j}: role '{m.get('role')}' where '{want}' was expected")
        if not isinstance(m.get("content"), str):
            raise ConversationError(f"turn {j}: content must be a string")
    if not turns:
        raise ConversationError("no user turn")
    # LLaMA-Factory: ``system or default_system`` (an empty system prompt means the default)
    return system or default_system or tpl.default_system, turns


def render_qwen2vl_prompt(messages: Sequence[Dict[str, str]], system: Optional[str] = None,
                          add_generation_prompt: bool = True, *, default_system: Optional[str] = None,
                          template: "str | VisionChatTemplate" = "qwen2_vl") -> str:
    """The ``qwen2_vl`` prompt text, each ``<image>`` as ``<|vision_start|><|image_pad|><|vision_end|>``.

    With ``add_generation_prompt`` a final assistant message is treated as the label and left out, so
    the text ends with ``<|im_start|>assistant\\n``; without it every message is rendered. ``system``
    (the row's system prompt) wins over a leading system message, then ``default_system`` (vllm_infer's
    ``--default_system``), then the template's default.
    """
    tpl = get_vision_template(template)
    sys_text, turns = _system_and_turns(messages, system, default_system, tpl)
    if add_generation_prompt and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if add_generation_prompt and tpl.thought_words:  # encode_oneturn: history answers lose their thoughts
        turns = [dict(m, content=tpl.remove_thought(m["content"])) if m["role"] == "assistant" else m
                 for m in turns]
    parts = [tpl.format_system.format(content=sys_text)] if sys_text else []
    for m in turns:
        slot = tpl.format_user if m["role"] == "user" else tpl.format_assistant
        parts.append(slot.format(content=m["content"]))
    text = "".join(parts)
    return expand_image_placeholders(text, None, template=tpl)[0]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> Tuple[int, int]:
    """LLaMA-Factory's truncation rule for one (prompt, answer) pair under ``cutoff_len`` tokens."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def encode_qwen2vl_slots(tokenizer: Any, turns: Sequence[Dict[str, str]], sys_text: str,
                         image_seqlens: Optional[Sequence[int]] = None,
                         template: "str | VisionChatTemplate" = "qwen2_vl") -> List[List[int]]:
    """One id list per message, each slot string tokenized on its own (LLaMA-Factory's ``Template._encode``).

    This is THE encoder of the ``qwen2_vl`` family: training (:func:`encode_qwen2vl`) and inference
    (:func:`encode_qwen2vl_prompt`) both go through it, so a history answer starting with ``"\\n"`` gets the
    same ids in both (a joined string would merge it with the ``assistant\\n`` before it). The system slot
    is encoded apart from the first user slot; ``image_seqlens[k]`` pads for the k-th image, or one pad
    per image when None (vllm_infer's unexpanded form, expanded later by :func:`expand_image_pad_ids`).
    """
    tpl = get_vision_template(template)
    encoded: List[List[int]] = []
    k = 0
    for i, m in enumerate(turns):
        content, k = expand_image_placeholders(m["content"], image_seqlens, k, tpl)
        elements: List[str] = []
        if i == 0 and sys_text:
            elements.append(tpl.format_system.format(content=sys_text))
        slot = tpl.format_user if m["role"] == "user" else tpl.format_assistant
        elements.append(slot.format(content=content))
        ids: List[int] = []
        for el in elements:
            ids += tokenizer.encode(el, add_special_tokens=False)
        encoded.append(ids)
    return encoded


def encode_qwen2vl(tokenizer: Any, messages: Sequence[Dict[str, str]], system: Optional[str] = None,
                   image_seqlens: Sequence[int] = (), *, cutoff_len: Optional[int] = None,
                   default_system: Optional[str] = None, template: "str | VisionChatTemplate" = "qwen2_vl"
                   ) -> Tuple[List[int], List[int]]:
    """Training ``(input_ids, labels)`` exactly as LLaMA-Factory's supervised processor builds them.

    ``messages`` alternate user/assistant and end with an answer; ``image_seqlens[k]`` is the number of
    ``<|image_pad|>`` tokens of the k-th image (``grid_t*grid_h*grid_w // merge_size**2``). Every slot
    string is tokenized separately (:func:`encode_qwen2vl_slots`); user slots (and the system prompt) get
    IGNORE_INDEX, assistant slots keep their ids. ``cutoff_len`` truncates pair by pair with
    LLaMA-Factory's ``infer_seqlen``.
    """
    tpl = get_vision_template(template)
    sys_text, turns = _system_and_turns(messages, system, default_system, tpl)
    if len(turns) % 2 != 0:
        raise ConversationError("the conversation must end with an assistant answer")
    n_placeholders = sum(m["content"].count(tpl.placeholder) for m in turns)
    if n_placeholders != len(image_seqlens):
        raise ConversationError(f"{n_placeholders} {tpl.placeholder} placeholder(s) but "
                                f"{len(image_seqlens)} image(s)")
    if tpl.thought_words and not tpl.enable_thinking:  # encode_multiturn: every thought removed
        turns = [dict(m, content=tpl.remove_thought(m["content"])) if j % 2 else m for j, m in enumerate(turns)]
    encoded = encode_qwen2vl_slots(tokenizer, turns, sys_text, image_seqlens, tpl)
    if tpl.thought_words:  # ReasoningTemplate.encode_multiturn: an answer without thought gets the empty one,
        thought = tokenizer.encode(tpl.empty_thought(), add_special_tokens=False)
        for i in range(1, len(encoded), 2):  # in the answer (with loss), or without thinking in the prompt
            if not tpl.has_thought(turns[i]["content"]):
                if tpl.enable_thinking:
                    encoded[i] = thought + encoded[i]
                else:
                    encoded[i - 1] = encoded[i - 1] + thought
    input_ids: List[int] = []
    labels: List[int] = []
    total = 0
    for source_ids, target_ids in zip(encoded[0::2], encoded[1::2]):
        if cutoff_len is not None:
            if total >= cutoff_len:
                break
            s_len, t_len = infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total)
            source_ids, target_ids = source_ids[:s_len], target_ids[:t_len]
        total += len(source_ids) + len(target_ids)
        input_ids += source_ids + target_ids
        labels += [IGNORE_INDEX] * len(source_ids) + list(target_ids)
    return input_ids, labels


@dataclass
class EncodedPrompt:
    """An inference prompt as LLaMA-Factory's ``scripts/vllm_infer.py`` builds it (one pad per image)."""

    prompt_ids: List[int]  # after cutoff_len truncation
    label_ids: List[int]  # the final answer's slot, after truncation
    prompt_len: int  # before truncation
    label_len: int  # before truncation

    @property
    def truncated(self) -> bool:
        return len(self.prompt_ids) < self.prompt_len or len(self.label_ids) < self.label_len


def encode_qwen2vl_prompt(tokenizer: Any, messages: Sequence[Dict[str, str]], label: Optional[str] = None,
                          system: Optional[str] = None, *, cutoff_len: Optional[int] = None,
                          default_system: Optional[str] = None,
                          template: "str | VisionChatTemplate" = "qwen2_vl") -> EncodedPrompt:
    """Prompt and label ids of one row, as vllm_infer gets them from LLaMA-Factory's unsupervised processor.

    ``messages`` end with the user turn to answer; ``label`` is the final assistant answer (None: an
    empty answer slot, as LLaMA-Factory does for a row without one). The prompt is every slot but the
    last (``Template.encode_oneturn``) through :func:`encode_qwen2vl_slots` with one ``<|image_pad|>`` per
    image (vllm_infer sets ``expand_mm_tokens = False``); with ``cutoff_len``, ``infer_seqlen`` splits the
    budget and both are cut from the right (``input_ids[:source_len]``, ``labels[:target_len]``), as in
    ``UnsupervisedDatasetProcessor._encode_data_example``.
    """
    tpl = get_vision_template(template)
    sys_text, turns = _system_and_turns(messages, system, default_system, tpl)
    if turns[-1]["role"] != "user":
        raise ConversationError("the prompt must end with a user turn")
    full = list(turns) + [{"role": "assistant", "content": label if label is not None else ""}]
    if tpl.thought_words:  # ReasoningTemplate.encode_oneturn (preserve_thinking False): history thoughts go,
        # and without thinking the answer's too
        full = [dict(m, content=tpl.remove_thought(m["content"]))
                if i % 2 and (i < len(full) - 1 or not tpl.enable_thinking) else m for i, m in enumerate(full)]
    encoded = encode_qwen2vl_slots(tokenizer, full, sys_text, None, tpl)
    prompt_ids = [t for ids in encoded[:-1] for t in ids]
    label_ids = encoded[-1]
    if tpl.thought_words and not tpl.has_thought(full[-1]["content"]):
        thought = tokenizer.encode(tpl.empty_thought(), add_special_tokens=False)
        if tpl.enable_thinking:  # the empty thought belongs to the answer (the model writes it)
            label_ids = thought + label_ids
        else:
            prompt_ids = prompt_ids + thought
    n_prompt, n_label = len(prompt_ids), len(label_ids)
    if cutoff_len is not None:
        s_len, t_len = infer_seqlen(n_prompt, n_label, cutoff_len)
        prompt_ids, label_ids = prompt_ids[:s_len], label_ids[:t_len]
    return EncodedPrompt(prompt_ids, label_ids, n_prompt, n_label)


def expand_image_pad_ids(ids: Sequence[int], image_pad_id: int, image_seqlens: Sequence[int],
                         start: int = 0) -> Tuple[List[int], int]:
    """Each ``image_pad_id`` of an unexpanded prompt repeated ``image_seqlens[k]`` times (k-th image), as
    Qwen2-VL's processor expands ``<|image_pad|>`` in text (a special token, so the ids around it are
    unchanged). Returns (ids, next image index)."""
    out: List[int] = []
    k = start
    for t in ids:
        if t == image_pad_id:
            if k >= len(image_seqlens):
                raise ConversationError(f"more image placeholders than the {len(image_seqlens)} image(s)")
            out.extend([image_pad_id] * int(image_seqlens[k]))
            k += 1
        else:
            out.append(t)
    return out, k


def template_stop_token_ids(tokenizer: Any, template: "str | VisionChatTemplate" = "qwen2_vl") -> List[int]:
    """LLaMA-Factory's ``Template.get_stop_token_ids`` for the template: ``{eos} | stop_words``, where the eos
    is the first stop word (``replace_eos=True`` in ``qwen2_vl``: ``fix_special_tokens`` makes
    ``<|im_end|>`` the eos). What vllm_infer passes as ``SamplingParams.stop_token_ids``."""
    tpl = get_vision_template(template)
    ids: List[int] = []
    for word in tpl.stop_words:
        tid = tokenizer.convert_tokens_to_ids(word)
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None) and tid not in ids:
            ids.append(int(tid))
    return ids
