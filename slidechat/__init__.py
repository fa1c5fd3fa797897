"""slidechat: whole-slide pathology vision-language toolkit."""

__version__ = "0.1.0"
