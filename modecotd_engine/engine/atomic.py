"""File helpers: atomic writes (a reader sees the old file or the new one, never half of one) and
content digests.

The data goes to a hidden temporary file beside the target (same filesystem), is flushed to disk,
and replaces the target in one ``os.replace``. A crash leaves at most a ``.NAME.PID.tmp`` file,
which the readers of this project ignore (hidden files are never tasks, banks or reports).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _replacing(path: str | Path):
    """Yield a temporary path beside ``path``; on success its file is flushed to disk and renamed
    over ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories created); returns the path."""
    with _replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (name -> torch tensor) as a safetensors file atomically; returns the path.

    Tensors are detached, made contiguous and moved to the CPU first (safetensors needs all three).
    """
    from safetensors.torch import save_file

    with _replacing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
