"""Known third-party noise, silenced at its source: one exact message per entry, with the reason.

Every ``slidechat`` command (and every ``xtuner train`` of our configs, which import this package)
used to open with the same few warnings that say nothing about the user's run. Each entry below drops
ONE message, matched by a regular expression, on the ONE third-party logger that emits it (a
:class:`logging.Filter` on that logger, not a level change: the logger's other messages still show),
or ONE Python warning by message, category and module. Nothing else is hidden: no blanket
``warnings.simplefilter("ignore")``, no logger turned off. :func:`silence_known_noise` is called by
``slidechat/__init__.py``, so it runs before the CLI or a config imports torch, peft or deepspeed.

To add an entry: run the command, copy the exact message, say below why it is noise for our users.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Pattern, Tuple, Type

__all__ = ["KNOWN_LOG_NOISE", "KNOWN_WARNING_NOISE", "NoiseFilter", "silence_known_noise"]


@dataclass(frozen=True)
class LogNoise:
    """One message of one third-party logger that we drop, and why."""

    logger: str
    pattern: str
    reason: str


@dataclass(frozen=True)
class WarningNoise:
    """One Python warning (message regex, category, emitting module regex) that we ignore, and why."""

    pattern: str
    category: Type[Warning]
    module: str
    reason: str


KNOWN_LOG_NOISE: Tuple[LogNoise, ...] = (
    LogNoise(
        "bitsandbytes.cextension",
        r"^The installed version of bitsandbytes was compiled without GPU support\.",
        "printed by `import peft` on every CPU-only machine. We use bitsandbytes only for 4/8-bit "
        "LLMs, which a user asks for explicitly; those fail with bitsandbytes' own error there."),
    LogNoise(
        "DeepSpeed",
        r"^Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.",
        "printed (on stdout) by deepspeed's import on every machine without CUDA, through xtuner. "
        "CPU is what the user has; torch's own device checks still report a missing GPU where one is "
        "asked for (--device cuda)."),
    LogNoise(
        "transformers.models.qwen2_vl.modeling_qwen2_vl",
        r"^`Qwen2VLRotaryEmbedding` can now be fully parameterized by passing the model config",
        "transformers 4.48 builds the vision-language attention's rotary embedding without the "
        "config itself (modeling_qwen2_vl.py); the deprecation is addressed to transformers, not "
        "to anyone who loads a Qwen2-VL model."),
)

#: Python ``warnings`` we ignore (none found in the runs listed in the module docstring yet).
KNOWN_WARNING_NOISE: Tuple[WarningNoise, ...] = ()


class NoiseFilter(logging.Filter):
    """Drops the records of one logger whose message matches one of ``patterns``."""

    def __init__(self, patterns: List[Pattern[str]]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(p.search(msg) for p in self.patterns)


_installed = False


def silence_known_noise() -> None:
    """Install the filters above (idempotent; cheap: imports nothing heavy)."""
    global _installed
    if _installed:
        return
    by_logger: Dict[str, List[Pattern[str]]] = {}
    for n in KNOWN_LOG_NOISE:
        by_logger.setdefault(n.logger, []).append(re.compile(n.pattern))
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(NoiseFilter(patterns))
    for w in KNOWN_WARNING_NOISE:
        warnings.filterwarnings("ignore", message=w.pattern, category=w.category, module=w.module)
    _installed = True
