"""What the benchmarks share: the device in words, library versions, a device sync, the load
average, and the random experts the inference and mixing benchmarks run."""

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


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# Random experts of the inference and mixing benchmarks. B ~ N(0, B_STD^2): large enough that every
# expert changes the student's greedy text, small enough that the text stays language-like (lengths
# and tokens like a trained expert's).
RANK = 8
ALPHA = 16.0
TARGETS = ("q_proj", "v_proj")
B_STD = 0.01


def random_bank(model, names: list[str], seed: int = 0):
    """An expert bank for ``model`` with random A (the bank's init) and B ~ N(0, B_STD^2)."""
    from ..engine.experts import ExpertBank

    bank = ExpertBank.create(model, names, rank=RANK, alpha=ALPHA, targets=TARGETS, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in bank.modules:
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=gen) * B_STD
    return bank
