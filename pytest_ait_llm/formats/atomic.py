"""Atomic file writes: a reader (or a crashed writer) never sees a half-written tensor or topology.

A dump is often read while the process that writes it is still running (or after it was killed). Writing to a
temporary file in the same directory and then ``os.replace``-ing it over the final name makes every file appear
either complete or not at all, because a rename within one filesystem is atomic.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterable, Union

Chunk = Union[bytes, bytearray, memoryview]


def _temp_name(target: Path) -> Path:
    # Hidden and unique per process and call, so concurrent writers of the same file never share a temp file.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[Chunk], *, durable: bool = False) -> Path:
    """Write ``chunks`` (bytes-like objects, written in order) to ``path`` atomically and return the path.

    The parent directory is created if needed. ``durable=True`` also fsyncs the data before the rename, which
    survives a power cut but costs a disk flush per file (too slow for dumps with thousands of tensors).
    The file gets the usual permissions (0o666 minus the umask), unlike ``tempfile.mkstemp``'s 0o600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(target)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", durable: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, [text.encode(encoding)], durable=durable)
