"""What every benchmark report carries: the device in words, library versions, a device sync."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions(*extra: str) -> dict:
    """python, torch, transformers and each of ``extra`` (None where not installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", *extra):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out
