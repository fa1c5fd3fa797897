"""slidechat: whole-slide pathology vision-language toolkit."""

from slidechat.utils.quiet import silence_known_noise
from slidechat.utils.version import __version__

__all__ = ["__version__"]

silence_known_noise()  # known third-party noise, before any command or config imports torch/peft
