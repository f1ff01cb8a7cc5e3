"""Remember what was parsed from a tensor file's header, by the file's identity, for the life of the process.

A comparison opens most files twice: once for their shape while pairing, once for their values; forked workers
open them again. Parsing a header (a .pth's zip directory and pickle, a .bin's text lines) is most of an open's
cost. The key is the path and the opened file's device, inode, size and modification time (ns), so a file
rewritten in place is parsed anew; only what the header said is kept, never file contents or descriptors.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Hashable

#: Entries kept (a few hundred bytes each): more than the files of one large dump.
MAX_ENTRIES = 1 << 16

_lock = threading.Lock()
_entries: OrderedDict[Hashable, Any] = OrderedDict()


def _new_lock_in_child() -> None:
    """A child forked while another thread held the lock would wait on it forever: it gets a fresh one."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def file_key(path: os.PathLike | str, st: os.stat_result) -> tuple:
    """The identity of the file opened under ``path`` whose ``os.fstat`` is ``st``."""
    return os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def get(key: Hashable) -> Any:
    with _lock:
        value = _entries.get(key)
        if value is not None:
            _entries.move_to_end(key)
        return value


def put(key: Hashable, value: Any) -> None:
    with _lock:
        _entries[key] = value
        _entries.move_to_end(key)
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)
