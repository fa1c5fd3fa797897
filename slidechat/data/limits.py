"""Prompt length limits shared by ``slidechat test``, ``slidechat chat`` and the inference loop.

One over-long prompt must not take a run down: without a cap a 5 MB question is tokenized (slow),
then the LLM is asked for a ~10^6-token prefill (terabytes of attention), the other rows of its batch
are lost, and every resume crashes on the same row. With a cap, the row gets an error entry and the
run goes on.

* ``max_prompt_tokens`` caps the *text* tokens of a prompt (chat: the whole conversation so far plus
  the question). Default: the LLM's context length (``max_position_embeddings``) minus
  ``max_new_tokens``. The slide's visual tokens are not counted: SlideChat's own test setting
  (38,400 patches) already exceeds Qwen2.5-7B's 32,768 positions and is answered by RoPE extrapolation,
  so counting them would refuse rows the released tool answers; the patch count has its own cap
  (``max_patches_test``).
* Before tokenizing, a cheap character check refuses text longer than
  ``max_prompt_tokens * CHARS_PER_TOKEN_BOUND`` characters (real text averages 3-5 characters per
  token), so a multi-megabyte string is never tokenized.
* Interactive input (``slidechat chat``) is read as bytes (:func:`read_input_line`): invalid UTF-8
  becomes U+FFFD replacement characters with a warning, and a line over the byte cap is discarded
  while it is read (it is never held whole), so one bad line costs one refused turn, not the session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import IO, Any, Callable, List, Optional, Sequence, Tuple, Union

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

#: characters allowed per allowed token before tokenizing (a generous bound; see module doc)
CHARS_PER_TOKEN_BOUND = 16

#: characters of one chat input when neither the session nor the user gives a cap
DEFAULT_MAX_INPUT_CHARS = 1_000_000
#: bytes read at a time while discarding the rest of an over-long line
_DISCARD_CHUNK = 1 << 16

_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class InputRefused(SlideChatError):
    """One input (a chat turn, a row) is refused for its length; the session or run goes on."""


@dataclass(frozen=True)
class PromptLimit:
    """A cap on a prompt's text tokens (``None``: no cap) and where it came from, for messages."""

    max_tokens: Optional[int]
    source: str = ""

    @property
    def max_chars(self) -> Optional[int]:
        return None if self.max_tokens is None else self.max_tokens * CHARS_PER_TOKEN_BOUND

    def check_chars(self, text: str) -> Optional[str]:
        """The reason ``text`` is refused without tokenizing it, or ``None``."""
        cap = self.max_chars
        if cap is not None and len(text) > cap:
            return (f"prompt too long: {len(text):,} characters, over the cap of {cap:,} "
                    f"({CHARS_PER_TOKEN_BOUND} x max_prompt_tokens {self.max_tokens:,}{self._from()}); "
                    "shorten it or raise max_prompt_tokens")
        return None

    def check_tokens(self, n_tokens: int) -> Optional[str]:
        """The reason a prompt of ``n_tokens`` text tokens is refused, or ``None``."""
        if self.max_tokens is not None and n_tokens > self.max_tokens:
            return (f"prompt too long: {n_tokens:,} tokens > max_prompt_tokens {self.max_tokens:,}"
                    f"{self._from()}; shorten it or raise max_prompt_tokens")
        return None

    def _from(self) -> str:
        return f" = {self.source}" if self.source else ""


def llm_context_length(llm_or_config: Any) -> Optional[int]:
    """The LLM's position limit (``max_position_embeddings`` or its equivalents), or ``None``."""
    cfg = getattr(llm_or_config, "config", llm_or_config)
    for attr in _CONTEXT_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prompt_limit(context_length: Optional[int], max_new_tokens: int,
                 max_prompt_tokens: Optional[int] = None) -> PromptLimit:
    """The cap to use: ``max_prompt_tokens`` when given, else ``context_length - max_new_tokens``."""
    if max_prompt_tokens is not None:
        n = int(max_prompt_tokens)
        if n < 1:
            raise SlideChatError(f"max_prompt_tokens must be >= 1, got {n}")
        return PromptLimit(n, "")
    if context_length is None:
        logger.warning("the LLM config states no context length; prompts are not length-capped "
                       "(set max_prompt_tokens)")
        return PromptLimit(None)
    n = int(context_length) - int(max_new_tokens)
    if n < 1:
        raise SlideChatError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the LLM's "
                             f"context of {context_length} positions",
                             hint="lower max_new_tokens or set max_prompt_tokens")
    return PromptLimit(n, f"context {context_length:,} - max_new_tokens {max_new_tokens:,}")


def model_prompt_limit(model: Any, max_new_tokens: int,
                       max_prompt_tokens: Optional[int] = None) -> PromptLimit:
    """:func:`prompt_limit` for a SlideChat model (its ``llm``) or a bare LLM."""
    llm = getattr(model, "llm", model)
    return prompt_limit(llm_context_length(llm), max_new_tokens, max_prompt_tokens)


def check_prompt_length(text: str, tokenize: Callable[[], Sequence[int]], limit: PromptLimit,
                        count: Optional[Callable[[Sequence[int]], int]] = None
                        ) -> Tuple[Optional[List[int]], Optional[str]]:
    """``(ids, None)`` or ``(None, reason)``: the character check first, then ``tokenize()`` and the
    token check (``count(ids)``, default ``len``: e.g. leave out a slide placeholder)."""
    reason = limit.check_chars(text)
    if reason is not None:
        return None, reason
    ids = list(tokenize())
    reason = limit.check_tokens(count(ids) if count is not None else len(ids))
    if reason is not None:
        return None, reason
    return ids, None


@dataclass
class InputLine:
    """One line of interactive input: ``text`` without the line break (empty when ``too_long``)."""

    text: str
    n_bytes: int
    too_long: bool = False
    invalid_utf8: bool = False


def read_input_line(stream: Union[IO[bytes], IO[str]], max_chars: Optional[int]) -> Optional[InputLine]:
    """Read one line (``None`` at end of input) from a text stream's byte buffer, tolerantly.

    Bytes that are not UTF-8 become U+FFFD (``invalid_utf8`` set). A line longer than ``max_chars``
    characters (checked on the bytes first: at most 4 per character) comes back ``too_long`` with empty
    text, its bytes read and dropped in chunks.
    """
    raw_stream = getattr(stream, "buffer", stream)
    max_bytes = None if max_chars is None else 4 * int(max_chars)
    first = raw_stream.readline(-1 if max_bytes is None else max_bytes + 1)
    if not first:
        return None
    if isinstance(first, str):  # a text-only stream (no byte buffer): already decoded
        data, n = first, len(first.encode("utf-8", errors="replace"))
    else:
        data, n = first, len(first)
    too_long = max_bytes is not None and n > max_bytes and not data.endswith(("\n" if isinstance(data, str)
                                                                              else b"\n"))
    if too_long:
        while True:  # drop the rest of the line without holding it
            chunk = raw_stream.readline(_DISCARD_CHUNK)
            if not chunk:
                break
            n += len(chunk)
            if chunk.endswith("\n" if isinstance(chunk, str) else b"\n"):
                break
        return InputLine("", n, too_long=True)
    invalid = False
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text, invalid = data.decode("utf-8", errors="replace"), True
    else:
        text = data
    text = text.rstrip("\r\n")
    if max_chars is not None and len(text) > max_chars:
        return InputLine("", n, too_long=True, invalid_utf8=invalid)
    return InputLine(text, n, invalid_utf8=invalid)
