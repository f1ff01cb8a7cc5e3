"""Safe file access: atomic writes (nobody sees a half-written file), the symlink policy, bounded reads, limits.

A dump is often read while the process that writes it is still running (or after it was killed). Writing to a
temporary file in the same directory and then ``os.replace``-ing it over the final name makes every file appear
either complete or not at all, because a rename within one filesystem is atomic.

Reading goes the other way: a dump is a directory somebody else wrote. Small files (JSON) are read with a size
bound and never from a FIFO, and no reader follows a symlink out of the dump root unless the user allows it.
"""
from __future__ import annotations

import functools
import os
import secrets
import stat as stat_mod
from pathlib import Path
from typing import Callable, Iterable, Union

from ..errors import FormatError

Chunk = Union[bytes, bytearray, memoryview]


def _temp_name(target: Path) -> Path:
    # Hidden and unique per process and call, so concurrent writers of the same file never share a temp file.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """Make ``path`` appear complete or not at all: ``write(temp)`` fills a temp file beside it, renamed over it.

    The one writer of every file the package writes (tensors, JSON, reports). The parent directory is created if
    needed. ``durable=True`` also fsyncs the data before the rename, which survives a power cut but costs a disk
    flush per file (too slow for dumps with thousands of tensors). On any failure the temp file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(target)
    try:
        write(temp)
        if durable:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[Chunk], *, durable: bool = False) -> Path:
    """Write ``chunks`` (bytes-like objects, in order) to ``path`` atomically (see :func:`atomic_write`)."""
    def write(temp: Path) -> None:
        # O_EXCL: never write through a file (or link) that appeared under the temp name; usual 0o666 - umask
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)

    return atomic_write(path, write, durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", durable: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, [text.encode(encoding)], durable=durable)


# ------------------------------------------------------------------------------------------------ safe reading

#: Set to 1 to let dump readers follow symlinks that lead out of the dump root (off by default).
ALLOW_SYMLINKS_ENV = "AIT_LLM_ALLOW_SYMLINKS"
#: Overrides :data:`DEFAULT_MAX_JSON_BYTES` for every JSON file read (topology, model_tree.json, mapping file).
MAX_JSON_BYTES_ENV = "AIT_LLM_MAX_JSON_BYTES"
#: Topologies of large models are tens of MB; a JSON file far beyond this is not one of ours.
DEFAULT_MAX_JSON_BYTES = 512 * 1024**2
_TRUE = ("1", "true", "yes", "on")


def symlinks_allowed(allow: bool | None = None) -> bool:
    """``allow`` when given, else whether ``AIT_LLM_ALLOW_SYMLINKS`` is set to a true value (read at each call,
    so a test or a CLI run can switch it without any module state)."""
    if allow is not None:
        return bool(allow)
    return os.environ.get(ALLOW_SYMLINKS_ENV, "").strip().lower() in _TRUE


def max_json_bytes(max_bytes: int | None = None) -> int:
    """``max_bytes`` when given, else ``AIT_LLM_MAX_JSON_BYTES`` when set, else :data:`DEFAULT_MAX_JSON_BYTES`."""
    if max_bytes is not None:
        return int(max_bytes)
    text = os.environ.get(MAX_JSON_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_JSON_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise FormatError(f"{MAX_JSON_BYTES_ENV}={text!r} is not a positive number of bytes")
    return value


def _is_dump_root(folder: Path) -> bool:
    # An ATB dump root holds tensors/; a torch dump's {PID}_{device} dir holds model_tree.json.
    try:
        return (folder / "tensors").is_dir() or (folder / "model_tree.json").is_file()
    except OSError:
        return False


def as_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, without building a new one when it is one (each Path() parses every component again;
    a comparison opens thousands of files through several layers)."""
    return path if isinstance(path, Path) else Path(path)


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    """realpath() of a folder, remembered: a folder replaced by a symlink after it was first seen in this process
    is not noticed (as a file replaced between this check and its open() is not).

    Built on the remembered parent: the folders of a dump share every ancestor, so each new folder costs one
    lstat(), where realpath() lstat()s every component of the path again."""
    parent, name = os.path.split(folder)
    if not name or parent == folder or name in (os.curdir, os.pardir) or os.path.islink(folder):
        return os.path.realpath(folder)
    return os.path.join(_real_folder(parent), name)


def outside_dump_root(path: str | os.PathLike, *, allow_symlinks: bool | None = None) -> str | None:
    """Why reading ``path`` is refused (a symlink takes it out of the dump it lies in), or None when it is fine.

    The dump root is the nearest ancestor of ``path`` as written that holds ``tensors/`` (ATB) or
    ``model_tree.json`` (torch). A dump is a directory somebody gave you: a link inside it to ``/etc/shadow`` or
    to another user's files must not be read just because it is named like a tensor. Links that stay inside
    the root (msit's ATB_SAVE_SYMLINK de-duplication) and links above the root (a symlinked home or mount
    point) are fine. A file that lies in no dump (the user named it directly) is not confined.
    """
    try:
        absolute = os.path.abspath(path)
        folder, name = os.path.split(absolute)
        # realpath() lstat()s every component; the folders of a dump repeat thousands of times, so theirs is kept
        real = os.path.realpath(absolute) if os.path.islink(absolute) else os.path.join(_real_folder(folder), name)
    except (OSError, ValueError):  # e.g. an embedded NUL: opening the file will say so
        return None
    if real == absolute or symlinks_allowed(allow_symlinks):
        return None
    for root in Path(absolute).parents:
        if _is_dump_root(root):
            real_root = os.path.realpath(root)
            if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
                return None
            return (f"symlink leads to {real}, outside the dump root {root}; refused "
                    f"(set {ALLOW_SYMLINKS_ENV}=1 to follow such links)")
    return None


def open_regular(path: str | os.PathLike, max_bytes: int, *, what: str = "file", allow_symlinks: bool | None = None,
                 error: type[Exception] | None = None, raise_hint: str = "") -> tuple[int, int]:
    """(open fd, size) of a regular file no larger than ``max_bytes``, after refusing what cannot be read safely.

    Missing files, directories, FIFOs and devices (a FIFO would block a read forever), files over the limit, and
    symlinks out of the dump (see :func:`outside_dump_root`) are ``error`` (default FormatError) with a one-line
    message naming the file. The open file, not the name, is checked, so a file swapped for a FIFO in between
    cannot block us. ``raise_hint`` tells how to raise the limit. The caller closes the fd.
    """
    err = error or FormatError
    p = as_path(path)
    why = outside_dump_root(p, allow_symlinks=allow_symlinks)
    if why:
        raise err(f"{p}: {why}")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise err(f"{p}: no such file") from None
    except IsADirectoryError:
        raise err(f"{p}: not a regular file (a directory), expected a {what}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise err(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise err(f"{p}: not a regular file, expected a {what}")
        if st.st_size > max_bytes:
            raise err(f"{p}: {st.st_size} bytes exceeds the limit of {max_bytes} bytes for a {what} ({raise_hint})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bounded(path: str | os.PathLike, max_bytes: int, *, what: str = "file",
                 allow_symlinks: bool | None = None, error: type[Exception] | None = None) -> bytes:
    """The bytes of a small regular file, after refusing what would hang, exhaust memory or escape the dump
    (see :func:`open_regular`): a file over ``max_bytes`` would otherwise be read whole into memory."""
    err = error or FormatError
    p = Path(path)
    fd, _ = open_regular(p, max_bytes, what=what, allow_symlinks=allow_symlinks, error=err,
                         raise_hint=f"raise it with max_bytes=... or {MAX_JSON_BYTES_ENV}")
    try:
        st = os.fstat(fd)
        chunks = []
        remaining = max_bytes + 1  # the file may grow after fstat: never read past the limit
        step = min(st.st_size + 1, 1 << 20)  # os.read allocates what it is asked for: ask for what is there
        while remaining > 0:
            asked = min(remaining, step)
            chunk = os.read(fd, asked)
            if chunk:
                chunks.append(chunk)
                remaining -= len(chunk)
            if len(chunk) < asked:  # a short read of a regular file is its end
                break
            step = 1 << 20
    except OSError as exc:
        raise err(f"{p}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise err(f"{p}: grew beyond the limit of {max_bytes} bytes while being read")
    return data
