"""File helpers: atomic writes (a reader sees the old file or the new one, never half of one),
directories renamed into place, and content digests. Every durable write of the engine goes
through here.

A file goes to a hidden temporary file beside the target (same filesystem), is flushed to disk,
and replaces the target in one ``os.replace`` (:func:`replacing`, and :func:`atomic_write_text`,
:func:`atomic_write_bytes`, :func:`atomic_save_tensors` on top of it). A crash leaves at most a
``.NAME.PID.tmp`` file, which the readers of this project ignore (hidden files are never tasks,
banks or reports). A directory (a checkpoint, a converted student, built-in task files) is written
under a temporary name, flushed file by file (:func:`fsync_tree`) and renamed into place
(:func:`replace_dir`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parent directories created) for the caller to write;
    on success its file is flushed to disk and renamed over ``path``, on any error it is removed.

    The temporary name ends in ``.tmp``: a writer that picks its format from the file name (e.g.
    matplotlib's ``savefig``) must be told the format.
    """
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
    with replacing(path) as tmp:
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

    with replacing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` and ``root`` itself, so a directory renamed into place never
    holds empty files after a crash."""
    root = Path(root)
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the finished directory ``tmp`` to ``final`` durably: flush its files (:func:`fsync_tree`),
    rename it (``os.replace``: ``final`` must not exist or be empty; a caller that replaces an older
    copy removes it first) and flush the parent's entry. Returns ``final``.
    """
    final = Path(final)
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
