"""What a student directory holds: the file names, the model families the engine loads, and the error
for anything that cannot be used. Shared by the loader (``student.py``) and the GGUF converter
(``gguf.py``)."""

from __future__ import annotations

from pathlib import Path

# The Llama-family ``model_type`` values the loader and the converter accept (transformers builds them
# from the config; the LoRA targets are their q/k/v/o and MLP projections).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CONVERSION_FILE = "conversion.json"  # written last into a converted directory; records its provenance


class StudentError(ValueError):
    """A student directory, file or argument that cannot be used; the message names the path or tensor."""


def preview(names: list[str], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more``: the first ``limit`` names of a list for an error message."""
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_converted(out: Path) -> bool:
    """Whether ``out`` is a finished conversion: config, weights and the conversion record are all there."""
    return all((out / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, CONVERSION_FILE))
