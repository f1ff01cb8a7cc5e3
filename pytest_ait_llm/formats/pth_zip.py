"""Read a one-tensor ``torch.save`` file without torch: parse its tiny pickle, memory-map its storage with numpy.

``torch.load`` costs ~0.15-0.5 ms a file and importing torch ~1 s, yet a dumped golden tensor is one plain tensor
in torch's zip format: a ~150-byte ``data.pkl`` naming one storage, and a stored member ``data/<key>`` holding its
bytes. :func:`read_plain_tensor` reads exactly that. Anything else (legacy pre-zip files, containers, subclasses,
other globals, big-endian payloads, odd zips) gets None, and the caller falls back to a weights-only
``torch.load``, which keeps its refusals and error messages. The unpickler resolves no global outside a fixed
list and calls nothing but OrderedDict and the rebuild stand-ins below.

A plain tensor whose storage member is shorter than its pickle says, or compressed, raises :class:`FormatError`
instead: a memory-mapped ``torch.load`` would silently read whatever bytes follow the member.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import stat
import struct
import sys
import zipfile
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np

from ..errors import FormatError
from . import parsed
from .tensor import RawTensor

__all__ = ["read_plain_tensor"]

#: our dtype name -> numpy storage dtype (bf16 stays uint16 bit patterns)
_NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int8": "i1", "uint8": "u1",
          "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "int64": "<i8", "uint64": "<u8",
          "bool": "?"}
#: ``torch.<X>Storage`` (pickled by _rebuild_tensor_v2) -> dtype name
_STORAGES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
             "DoubleStorage": "float64", "IntStorage": "int32", "LongStorage": "int64", "ShortStorage": "int16",
             "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_MAX_PICKLE_BYTES = 1 << 16  # a plain tensor's data.pkl is ~150 bytes

#: What a storage class (``dtype`` None: UntypedStorage, sized in bytes) or ``torch.<dtype>`` global unpickles
#: to: only ever compared, never called (a pickle that calls one fails, and the file goes to torch).
_Tag = namedtuple("_Tag", "kind dtype")
#: What the rebuild stand-ins return: ``storage`` is what ``persistent_load`` returned.
_Tensor = namedtuple("_Tensor", "storage dtype offset size stride")


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if hooks or metadata or storage[2] is None:  # hooks / neg-conj bits / untyped storage: let torch decide
        raise ValueError("not a plain tensor")
    return _Tensor(storage, storage[2], offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if hooks or metadata or storage[2] is not None or not isinstance(dtype, _Tag) or dtype.kind != "dtype":
        raise ValueError("not a plain tensor")
    return _Tensor(storage, dtype.dtype, offset, size, stride)


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2, ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.storage", "UntypedStorage"): _Tag("storage", None),
            **{("torch", n): _Tag("storage", d) for n, d in _STORAGES.items()},
            **{("torch", d): _Tag("dtype", d) for d in _NUMPY}}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple] = []

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} not allowed")
        return found

    def persistent_load(self, pid):
        """``('storage', storage class, key, location, numel)`` -> ``(key, nbytes, dtype or None)``."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Tag)
                and pid[1].kind == "storage" and isinstance(pid[2], str) and _is_count(pid[4])) or self.storages:
            raise pickle.UnpicklingError("not one storage")
        dtype = pid[1].dtype
        item = 1 if dtype is None else np.dtype(_NUMPY[dtype]).itemsize
        self.storages.append((pid[2], pid[4] * item, dtype))
        return self.storages[0]


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def read_plain_tensor(path: Path) -> RawTensor | None:
    """The tensor of a zip-format ``torch.save`` file holding one plain tensor, memory-mapped; else None.

    Raises :class:`FormatError` only for a plain tensor whose storage member is cut short or compressed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        # One read-only map of the whole file: the tensor is a view into it (pages are read when used). Its zip
        # directory and pickle are read with pread (_Bytes), not through the map. What they said is kept per file
        # version (formats/parsed.py): a file opened again is only mapped.
        key = parsed.file_key(path, st)
        fh = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        view = parsed.get(key)
        if view is None:
            view = _read(_Bytes(fd, fh), path)
            if view is None:
                return None
            parsed.put(key, view)
        return _tensor(fh, path, view)
    except FormatError:
        raise
    except Exception:  # anything unusual: the torch path judges it and words the error
        return None
    finally:
        os.close(fd)


#: Where a plain tensor's values lie in its file: enough to map it again without parsing anything.
_View = namedtuple("_View", "dtype shape start count strides")

#: What :class:`_Bytes` reads at once: the first and the last bytes of a file, and at least this many on a miss.
_WINDOW = 8192


class _Bytes:
    """A file's bytes as its parse reads them: with ``os.pread`` on its descriptor, not through its map.

    A first touch of a mapped page is a page fault (~10-17 us), and a parse touches 3+ scattered pages; a pread of a
    few KB costs ~2 us. torch.save keeps data.pkl and the small members at the start of the file, and its directory,
    end records and usually ``version`` at the end: the first and last ``_WINDOW`` bytes are read at once, any other
    range with one more pread (of at least ``_WINDOW`` bytes, kept: the next read is likely nearby). Sliced and
    unpacked as the map would be: same length, bytes and errors (a negative or out-of-range offset is handed to the
    map itself, where struct raises or counts from the end as it does on the map)."""
    __slots__ = ("fd", "map", "size", "windows")

    def __init__(self, fd: int, fh: mmap.mmap):
        self.fd, self.map, self.size = fd, fh, len(fh)
        self.windows: list[tuple[int, int, bytes]] = []  # (start, end, the file's bytes from start to end)
        if self.size <= 2 * _WINDOW:
            self._pread(0, self.size)
        else:
            self._pread(0, _WINDOW)
            self._pread(self.size - _WINDOW, _WINDOW)

    def _pread(self, start: int, n: int) -> bytes:
        data = os.pread(self.fd, n, start)  # short if the file shrank since it was mapped
        self.windows.append((start, start + len(data), data))
        return data

    def __len__(self) -> int:
        return self.size

    def window(self, start: int, n: int) -> tuple[bytes, int]:
        """Bytes holding the file's ``[start, start + n)`` (within its length), and where in them it begins."""
        for at, end, data in self.windows:
            if at <= start and start + n <= end:
                return data, start - at
        if len(self._pread(start, max(n, _WINDOW))) < n:  # the file shrank (the map would raise SIGBUS there)
            raise OSError("the file is shorter than mapped")
        return self.windows[-1][2], 0

    def __getitem__(self, key: slice) -> bytes:
        start, stop, step = key.indices(self.size)
        if step != 1:
            return self.map[key]
        if stop <= start:
            return b""
        data, at = self.window(start, stop - start)
        return data[at:at + stop - start]

    def unpack_from(self, layout: struct.Struct, offset: int) -> tuple:
        if offset < 0 or offset + layout.size > self.size:
            return layout.unpack_from(self.map, offset)
        return layout.unpack_from(*self.window(offset, layout.size))


def _read(fh: _Bytes, path: Path) -> _View | None:
    if fh[:4] != b"PK\x03\x04":
        return None
    members = _central_directory(fh)
    if members is None:  # not laid out as torch.save writes: zipfile reads the map, and raises what it raises
        members = {info.filename: info for info in zipfile.ZipFile(fh.map).infolist()}
    pkl = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pkl) != 1:
        return None
    prefix = pkl[0][:-len("data.pkl")]
    if not all(name.startswith(prefix) for name in members):
        return None
    version = members.get(prefix + "version") or members.get(prefix + ".data/version")
    if version is None or _member(fh, version, 8)[1].strip() not in (b"1", b"2", b"3"):
        return None
    order = members.get(prefix + "byteorder")
    if (_member(fh, order, 8)[1] if order else sys.byteorder.encode()) != b"little":
        return None
    unpickler = _Unpickler(_member(fh, members[pkl[0]], _MAX_PICKLE_BYTES)[1])
    tensor = unpickler.load()
    if type(tensor) is not _Tensor or tensor.storage is not unpickler.storages[0]:
        return None
    return _map(fh, path, tensor, members[prefix + "data/" + tensor.storage[0]])


#: What :func:`_member` and :func:`_map` read of a central directory entry (named as :class:`zipfile.ZipInfo` has it).
_Entry = namedtuple("_Entry", "filename header_offset compress_type compress_size file_size")
#: End of central directory: signature, disk, directory's disk, entries on this disk, entries, size, offset, comment.
_EOCD = struct.Struct("<4s4H2LH")
#: ZIP64 locator: signature, disk of the ZIP64 record, its offset, disks.
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
#: ZIP64 end record (no extensible data): signature, size of the rest, 2 versions, then as _EOCD without a comment.
_EOCD64 = struct.Struct("<4sQ4x2L4Q")
#: Central directory entry, unused fields skipped: signature, version needed, flags, method, compressed size, size,
#: name length, then the extra and comment lengths and the disk (6 bytes, all zero in torch's), local header offset.
_CENTRAL = struct.Struct("<4s2xBxHH8x2LH6s6xL")
#: Local file header, as far as its name and extra lengths: signature, 22 bytes, name length, extra length.
_LOCAL = struct.Struct("<4s22xHH")
_UTF8_NAMES = 0x800
_OTHER_FLAGS = 0xFFFF & ~(_UTF8_NAMES | 0x8)  # torch.save sets only UTF-8 names and data descriptors (bit 3)


def _central_directory(fh: _Bytes) -> dict[str, _Entry] | None:
    """The zip's members by name if it ends as torch.save writes it, else None (and zipfile reads it).

    ``zipfile.ZipFile(fh).infolist()`` spends most of its time building a ZipInfo per member. This reads only
    what a torch.save zip holds (one disk, no comments, no extra fields in the directory, ASCII or UTF-8 names,
    the directory right before its end records) and requires every count, size and offset to agree, so that what
    it accepts zipfile reads the same; anything else, odd or damaged, goes to zipfile, whose verdict stays the rule.
    """
    eocd = len(fh) - _EOCD.size
    if eocd < 0:
        return None
    sig, disk, cd_disk, count_here, count, cd_size, cd_offset, comment_len = fh.unpack_from(_EOCD, eocd)
    if sig != b"PK\x05\x06" or disk or cd_disk or comment_len or count_here != count:
        return None
    end = eocd  # where the central directory must end
    locator = eocd - _EOCD64_LOCATOR.size
    if locator >= 0 and fh[locator:locator + 4] == b"PK\x06\x07":
        # torch 2.x always writes the ZIP64 records; the 32-bit fields hold the same values or all ones
        end = locator - _EOCD64.size
        if end < 0:
            return None
        _, record_disk, record_offset, disks = fh.unpack_from(_EOCD64_LOCATOR, locator)
        sig, record_size, disk, cd_disk, count_here, count64, cd_size64, cd_offset64 = fh.unpack_from(_EOCD64, end)
        if (sig != b"PK\x06\x06" or record_offset != end or record_disk or disks != 1 or disk or cd_disk
                or record_size != _EOCD64.size - 12 or count_here != count64 or count not in (count64, 0xFFFF)
                or cd_size not in (cd_size64, 0xFFFFFFFF) or cd_offset not in (cd_offset64, 0xFFFFFFFF)):
            return None
        count, cd_size, cd_offset = count64, cd_size64, cd_offset64
    if cd_offset + cd_size != end:  # also: nothing prepended to the zip (zipfile would shift every offset)
        return None
    members: dict[str, _Entry] = {}
    # The whole directory in one read (as zipfile reads it), walked in ``directory`` from ``pos`` up to ``stop``
    directory, pos = fh.window(cd_offset, cd_size)
    stop = pos + cd_size
    try:
        for _ in range(count):
            if pos + _CENTRAL.size > stop:
                return None
            sig, needs, flags, method, compress_size, file_size, name_len, zeros, offset = \
                _CENTRAL.unpack_from(directory, pos)
            start = pos + _CENTRAL.size
            pos = start + name_len
            # all-ones sizes or offset need the ZIP64 extra field; zipfile refuses versions above 6.3
            if (sig != b"PK\x01\x02" or flags & _OTHER_FLAGS or zeros != b"\0\0\0\0\0\0" or needs > 63 or pos > stop
                    or offset + 30 + name_len + compress_size > cd_offset
                    or 0xFFFFFFFF in (compress_size, file_size, offset)):
                return None
            # zipfile decodes a name without the UTF-8 flag as cp437: the same on ASCII
            name = directory[start:pos].decode("utf-8" if flags & _UTF8_NAMES else "ascii")
            if "\0" in name or "\\" in name or name in members:  # a name zipfile would cut or rewrite; a duplicate
                return None
            members[name] = _Entry(name, offset, method, compress_size, file_size)
    except UnicodeDecodeError:
        return None
    return members if pos == stop else None


def _member(fh: _Bytes, info: _Entry | zipfile.ZipInfo, limit: int) -> tuple[int, bytes]:
    """(offset of the member's bytes in the file, the bytes if no more than ``limit``); stored members only.

    The local header's own name and extra lengths say where the bytes start (they may differ from the central
    directory's)."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise ValueError("compressed member")
    sig, name_len, extra_len = fh.unpack_from(_LOCAL, info.header_offset)
    if sig != b"PK\x03\x04":
        raise ValueError("bad local header")
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + info.file_size > len(fh):
        raise ValueError("member past the end of the file")
    return offset, fh[offset:offset + info.file_size] if info.file_size <= limit else b""


def _map(fh: _Bytes, path: Path, tensor: _Tensor, info: _Entry | zipfile.ZipInfo) -> _View | None:
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) and _is_count(offset)
            and all(map(_is_count, size + stride))):
        return None
    _, nbytes, _ = tensor.storage
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
        damage = "is compressed" if info.compress_type != zipfile.ZIP_STORED else \
            f"holds {info.file_size} bytes where the tensor's storage has {nbytes}"
        raise FormatError(f"{path}: not a torch tensor file (member {info.filename} {damage}; cut short or "
                          f"rewritten, not as torch.save writes it)")
    itemsize = np.dtype(_NUMPY[tensor.dtype]).itemsize
    shape = tuple(size)
    numel, contiguous = 1, True  # contiguous as torch has it: the stride of a size-1 dim does not matter
    for n, s in zip(reversed(size), reversed(stride)):
        contiguous = contiguous and (n == 1 or s == numel)
        numel *= n
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # highest element index touched
    if numel == 0:
        return _View(tensor.dtype, shape, 0, 0, None)
    if (last + 1) * itemsize > nbytes:  # the view would reach past its storage: torch says how
        return None
    start = _member(fh, info, 0)[0] + offset * itemsize
    if contiguous:
        return _View(tensor.dtype, shape, start, numel, None)
    return _View(tensor.dtype, shape, start, last - offset + 1, tuple(s * itemsize for s in stride))


def _tensor(fh: mmap.mmap, path: Path, view: _View) -> RawTensor:
    dtype = np.dtype(_NUMPY[view.dtype])
    if view.count == 0:
        data = np.empty(0, dtype)
        data.flags.writeable = False
    elif view.strides is None:
        data = np.frombuffer(fh, dtype, view.count, view.start)
    else:
        data = np.lib.stride_tricks.as_strided(np.frombuffer(fh, dtype, view.count, view.start), view.shape,
                                               view.strides, writeable=False)
    return RawTensor(data=data, dtype=view.dtype, shape=view.shape, path=path,
                     offset=view.start if view.strides is None else None)
