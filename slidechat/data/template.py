"""SlideChat conversations -> token ids and loss labels (ChatML / Qwen, empty system prompt).

The released model was trained with xtuner's ``qwen_chat`` template and ``llava_map_fn``: the
``<image>`` placeholder is moved to the front of the first user turn, each turn's prompt is
``<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n`` (no loss), the answer plus
``<|im_end|>`` carries the loss, and a ``\\n`` separator (no loss) follows. Pieces are tokenized
separately, as xtuner did, so ids match what the released weights saw. Qwen has no BOS token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX


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

TEMPLATES: Dict[str, ChatTemplate] = {"qwen_chat": QWEN_CHAT}


def get_template(template: "str | ChatTemplate") -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ConversationError(f"unknown chat template '{template}' (known: {', '.join(TEMPLATES)})")


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
                   template: "str | ChatTemplate" = "qwen_chat", system: str = ""
                   ) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)``; an answer of ``None`` (last pair only) leaves an open assistant turn."""
    tpl = get_template(template)
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


def encode_conversation(tokenizer: Any, conversations: Any,
                        template: "str | ChatTemplate" = "qwen_chat", system: str = ""
                        ) -> Dict[str, List[int]]:
    """Training example: ``{'input_ids', 'labels'}`` with exactly one IMAGE_TOKEN_INDEX."""
    input_ids, labels = tokenize_pairs(tokenizer, normalize_conversation(conversations),
                                       template, system)
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tokenizer: Any, history: Sequence[Tuple[str, str]], question: str,
                  template: "str | ChatTemplate" = "qwen_chat", system: str = "") -> List[int]:
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
