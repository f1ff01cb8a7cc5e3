"""Read a one-tensor ``torch.save`` file without torch: parse its tiny pickle, memory-map its storage with numpy.

Importing torch takes about a second (docs/performance.md), yet a dumped golden tensor is one plain tensor in torch's zip format: a ~150-byte
``data.pkl`` naming one storage, and a member ``data/<key>`` holding its bytes. :func:`read_plain_tensor` reads
exactly that with :mod:`zipfile`. Anything else (legacy pre-zip files, containers, subclasses, other globals,
big-endian payloads) gets None, and the caller falls back to a weights-only ``torch.load``, which keeps its
refusals and error messages. The unpickler resolves no global outside a fixed list and calls nothing but
OrderedDict and the rebuild stand-ins below.

Raises :class:`FormatError` where a memory-mapped ``torch.load`` would read bytes that are not the tensor: a
storage member shorter than the pickle says, or a compressed member that cannot be inflated within the size
limit (a stored member is mapped; a compressed one is inflated into memory, so a zip bomb is refused).
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


def read_plain_tensor(path: Path, *, max_bytes: int) -> RawTensor | None:
    """The tensor of a zip-format ``torch.save`` file holding one plain tensor; else None.

    A stored storage member is memory-mapped (nothing is read until used); a compressed one is inflated, up to
    ``max_bytes``. A strided view is materialised only up to ``max_bytes`` (a stride-0 ``expand()`` may claim
    terabytes over a few bytes of storage). Raises :class:`FormatError` where the bytes are not the tensor's.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError):
        return None
    # zipfile reads the directory and small members through the file; the storage is a view of one read-only map
    with open(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or f.read(4) != b"PK\x03\x04":
                return None
            fh = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
            return None  # torch words the error
        try:
            found = _plain_tensor(zf)
        except FormatError:
            raise
        except Exception:  # noqa: BLE001 - anything unusual: the torch path judges it and words the error
            found = None
        if found is None:
            if any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist()):
                # torch.load(mmap=True) would map the compressed bytes as if they were the values
                raise FormatError(f"{path}: compressed torch file that is not one plain tensor; refused (its values "
                                  f"cannot be read in place)")
            return None
        tensor, info = found
        return _tensor(fh, zf, path, tensor, info, max_bytes)


def _member_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ValueError("member too large")
    with zf.open(info) as f:
        return f.read(limit + 1)


def _plain_tensor(zf: zipfile.ZipFile) -> tuple[_Tensor, zipfile.ZipInfo] | None:
    members = {info.filename: info for info in zf.infolist()}
    pkl = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pkl) != 1:
        return None
    prefix = pkl[0][:-len("data.pkl")]
    if not all(name.startswith(prefix) for name in members):
        return None
    version = members.get(prefix + "version") or members.get(prefix + ".data/version")
    if version is None or _member_bytes(zf, version, 8).strip() not in (b"1", b"2", b"3"):
        return None
    order = members.get(prefix + "byteorder")
    if (_member_bytes(zf, order, 8) if order else sys.byteorder.encode()) != b"little":
        return None
    unpickler = _Unpickler(_member_bytes(zf, members[pkl[0]], _MAX_PICKLE_BYTES))
    tensor = unpickler.load()
    if type(tensor) is not _Tensor or tensor.storage is not unpickler.storages[0]:
        return None
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) and _is_count(offset)
            and all(map(_is_count, size + stride))):
        return None
    info = members.get(prefix + "data/" + tensor.storage[0])
    return (tensor, info) if info is not None else None


#: Local file header, as far as its name and extra lengths: signature, 22 bytes, name length, extra length.
_LOCAL = struct.Struct("<4s22xHH")


def _storage(fh: mmap.mmap, zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, nbytes: int,
             max_bytes: int) -> memoryview | bytes | mmap.mmap:
    """The storage's bytes: the file's own (mapped) when stored, inflated within ``max_bytes`` when compressed."""
    if info.file_size < nbytes:
        raise FormatError(f"{path}: not a torch tensor file (member {info.filename} holds {info.file_size} bytes "
                          f"where the tensor's storage has {nbytes}; cut short or rewritten)")
    if info.compress_type == zipfile.ZIP_STORED:
        sig, name_len, extra_len = _LOCAL.unpack_from(fh, info.header_offset)
        start = info.header_offset + 30 + name_len + extra_len
        if sig != b"PK\x03\x04" or start + info.file_size > len(fh):
            raise FormatError(f"{path}: not a torch tensor file (member {info.filename} lies past the file's end)")
        return memoryview(fh)[start:start + nbytes]
    if nbytes > max_bytes:
        raise FormatError(f"{path}: compressed storage of {nbytes} bytes exceeds the limit of {max_bytes} bytes for "
                          f"a tensor file (raise max_bin_bytes / --max-bin-bytes); refused")
    try:
        with zf.open(info) as member:
            data = member.read(nbytes + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise FormatError(f"{path}: compressed member {info.filename} cannot be inflated ({text})") from None
    if len(data) != nbytes:  # a member inflating to more than its storage (a zip bomb) or less
        got = f"more than {nbytes}" if len(data) > nbytes else str(len(data))
        raise FormatError(f"{path}: compressed member {info.filename} inflates to {got} bytes where the tensor's "
                          f"storage has {nbytes}; refused")
    return data


def _tensor(fh: mmap.mmap, zf: zipfile.ZipFile, path: Path, tensor: _Tensor, info: zipfile.ZipInfo,
            max_bytes: int) -> RawTensor:
    dtype = np.dtype(_NUMPY[tensor.dtype])
    shape, stride, offset = tuple(tensor.size), tuple(tensor.stride), tensor.offset
    _, nbytes, _ = tensor.storage
    numel, contiguous = 1, True  # contiguous as torch has it: the stride of a size-1 dim does not matter
    for n, s in zip(reversed(shape), reversed(stride)):
        contiguous = contiguous and (n == 1 or s == numel)
        numel *= n
    if numel == 0:
        data = np.empty(0, dtype)
        data.flags.writeable = False
        return RawTensor(data=data, dtype=tensor.dtype, shape=shape, path=path)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride))  # highest element index touched
    if (last + 1) * dtype.itemsize > nbytes:
        raise FormatError(f"{path}: not a torch tensor file (its view reaches past its storage of {nbytes} bytes)")
    if not contiguous and numel * dtype.itemsize > max_bytes:
        raise FormatError(f"{path}: a strided view of {numel} elements over a storage of {nbytes} bytes (e.g. an "
                          f"expand()ed tensor); comparing it needs {numel * dtype.itemsize} bytes, over the limit of "
                          f"{max_bytes}; refused (save tensor.contiguous() or .clone())")
    storage = _storage(fh, zf, path, info, nbytes, max_bytes)
    base = np.frombuffer(storage, dtype, last - offset + 1, offset * dtype.itemsize)
    if contiguous:
        data = base
    else:  # materialised: every pass reads it flat
        data = np.ascontiguousarray(np.lib.stride_tricks.as_strided(
            base, shape, tuple(s * dtype.itemsize for s in stride), writeable=False)).reshape(-1)
        data.flags.writeable = False  # as a mapped file's values: read, never written
    return RawTensor(data=data, dtype=tensor.dtype, shape=shape, path=path)
