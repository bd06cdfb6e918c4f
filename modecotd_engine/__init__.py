"""modecotd-engine: chain-of-thought distillation into a frozen student through LoRA experts."""

__version__ = "0.1.0"
