"""slidechat: whole-slide pathology vision-language toolkit."""

from slidechat.utils.quiet import silence_known_noise

__version__ = "0.1.0"

silence_known_noise()  # known third-party noise, before any command or config imports torch/peft
