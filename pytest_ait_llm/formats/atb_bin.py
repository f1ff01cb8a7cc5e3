"""The ATB tensor ``.bin`` format: ``key=value`` header lines up to ``$End=1``, then the raw payload.

The original reader trusted the header: it read the whole file into memory, never checked ``$Object.Length``
and let torch raise on a payload of the wrong size. Here the header is read with a bounded read, every claim
in it is checked against the file before anything is allocated, and the payload is memory-mapped, so a
multi-GB tensor costs address space, not RAM.
"""
from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .safe_io import as_path, atomic_write_bytes, open_regular
from .dtypes import ACL_DTYPES, BY_NAME, KNOWN_UNSUPPORTED, AclDtype, by_name
from .tensor import RawTensor

DEFAULT_MAX_BIN_BYTES = 2 * 1024**3
#: The header is a handful of short lines; a file without ``$End`` in its first 64 KiB is not a tensor file.
MAX_HEADER_BYTES = 64 * 1024
#: What is read first: enough for any real header, far less than copying MAX_HEADER_BYTES of payload each time.
HEADER_PROBE = 4096
#: ATB tensors have at most 8 dims; numpy refuses more than 64. More than this is a corrupt header.
MAX_DIMS = 32
#: A dimension numpy can index (even an empty tensor, with a 0 elsewhere in dims, needs each dim to fit).
MAX_DIM = 2**62
#: Keys of the msit "stats" dump (``--type stats``): text-only files holding these summaries instead of a payload.
STATS_KEYS = ("max", "min", "mean", "l2norm")
_END_KEY = "$End"
_END_LINE = re.compile(rb"(?:^|\n)[ \t]*\$End[ \t]*=[^\n]*\n")  # a whole $End line has been read
_ND_FORMAT = 2


@dataclass
class BinHeader:
    """What a ``.bin`` header says, checked against the file.

    ``payload_offset`` is the file offset just after the ``$End`` line and ``payload_length`` the number of bytes
    actually present from there to the end of the file. ``object_offset`` is where the tensor starts inside that
    payload (``$Object.data=offset,length``; 0 when absent). ``stats`` is set when the file carries msit summary
    keys (max/min/mean/l2norm); with no payload it is a stats-only file. ``extra`` keeps keys this reader does
    not interpret (e.g. a stats file's ``type``), as text.
    """

    path: Path
    dtype_code: int
    format: int
    dims: tuple[int, ...]
    payload_offset: int
    payload_length: int
    stats: dict[str, float] | None = None
    object_offset: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_stats_only(self) -> bool:
        return self.stats is not None and self.payload_length == 0

    @property
    def acl_dtype(self) -> AclDtype:
        """The dtype entry for ``dtype_code`` (FormatError if this reader cannot hold such values)."""
        return _dtype_for(self.dtype_code, self.path)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)


def _dtype_for(code: int, path: Path) -> AclDtype:
    found = ACL_DTYPES.get(code)
    if found is not None:
        return found
    if code in KNOWN_UNSUPPORTED:
        raise FormatError(f"{path}: dtype={code} ({KNOWN_UNSUPPORTED[code]}) is not a supported aclDataType "
                          f"(supported: {_supported_codes()})")
    raise FormatError(f"{path}: unknown aclDataType code dtype={code} (supported: {_supported_codes()})")


def _supported_codes() -> str:
    return ", ".join(f"{c} {d.name}" for c, d in sorted(ACL_DTYPES.items()))


def _open_regular_file(path: Path, max_bytes: int, allow_symlinks: bool | None) -> tuple[int, int]:
    """(open fd, size) of a tensor file, after refusing what cannot be one (see ``safe_io.open_regular``)."""
    fd, size = open_regular(path, max_bytes, what="ATB .bin tensor", allow_symlinks=allow_symlinks,
                            raise_hint=f"raise it with max_bytes=..., e.g. max_bytes={_size_hint(path)}, "
                                       f"or --max-bin-bytes")
    if size == 0:
        os.close(fd)
        raise FormatError(f"{path}: empty file (0 bytes), expected a .bin header ending in $End=1")
    return fd, size


def _size_hint(path: Path) -> int | str:
    try:
        return os.stat(path).st_size
    except OSError:
        return "N"


def _read_header_lines(path: Path, fd: int, size: int) -> tuple[list[tuple[int, str, str]], int]:
    """``[(line_no, key, value), ...]`` up to and including ``$End``, and the offset just after that line."""
    want = min(size, MAX_HEADER_BYTES)
    parts: list[bytes] = []
    got = 0
    step = HEADER_PROBE  # real headers are a few hundred bytes: read more only while no $End line has come
    try:
        while got < want:
            chunk = os.read(fd, min(step, want - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            if _END_LINE.search(b"".join(parts)):
                break
            step = want
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    head = b"".join(parts)
    lines: list[tuple[int, str, str]] = []
    pos = 0
    line_no = 0
    while True:
        newline = head.find(b"\n", pos)
        if newline < 0:
            where = "the file ends" if len(head) == size else f"the first {MAX_HEADER_BYTES} bytes end"
            raise FormatError(f"{path}: no '$End=1' header line before {where}; not an ATB .bin tensor file")
        line_no += 1
        raw = head[pos:newline]
        pos = newline + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: header line {line_no} is not UTF-8 text; not an ATB .bin tensor file") from None
        text = text.rstrip("\r")
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise FormatError(f"{path}: header line {line_no} {shown!r} is not key=value")
        key = key.strip()
        lines.append((line_no, key, value.strip()))
        if key == _END_KEY:
            return lines, pos


_INT = re.compile(r"[+-]?[0-9]{1,30}")


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _parse_int(path: Path, key: str, value: str) -> int:
    # ASCII digits only: int() would also take "1_0", Arabic-Indic digits or 4000-digit numbers.
    if not _INT.fullmatch(value):
        raise FormatError(f"{path}: header {key}={_shown(value)} is not an integer")
    return int(value)


def _parse_int_list(path: Path, key: str, value: str) -> tuple[int, ...]:
    if value == "":
        return ()
    parts = [part.strip() for part in value.split(",")]
    if len(parts) > MAX_DIMS or not all(_INT.fullmatch(part) for part in parts):
        what = f"more than {MAX_DIMS} entries" if len(parts) > MAX_DIMS else "not a comma-separated list of integers"
        raise FormatError(f"{path}: header {key}={_shown(value)} is {what}")
    return tuple(int(part) for part in parts)


def read_bin_header(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BIN_BYTES,
                    allow_symlinks: bool | None = None) -> BinHeader:
    """Parse and validate the header of an ATB ``.bin`` file without touching its payload.

    Every consistency check happens here (dtype known, dims non-negative, payload size = prod(dims) x itemsize,
    ``$Object.Length`` and ``$Object.data`` agreeing), so a caller that only lists shapes still sees broken files.
    A stats-only file (msit ``--type stats``) returns its summaries in ``stats`` and skips the payload checks.
    Nothing is allocated from the header's claims: a file claiming 10^12 elements is refused by arithmetic.
    A symlink out of the dump root is refused unless ``allow_symlinks`` (default: ``AIT_LLM_ALLOW_SYMLINKS``).
    """
    p = as_path(path)
    fd, size = _open_regular_file(p, max_bytes, allow_symlinks)
    try:
        return _header_from(p, fd, size)
    finally:
        os.close(fd)


def _header_from(p: Path, fd: int, size: int) -> BinHeader:
    lines, payload_offset = _read_header_lines(p, fd, size)
    seen: dict[str, str] = {}
    for line_no, key, value in lines:
        if key in seen:
            raise FormatError(f"{p}: header line {line_no}: duplicate key {key!r}")
        seen[key] = value

    dtype_code: int | None = None
    fmt = _ND_FORMAT
    dims: tuple[int, ...] | None = None
    object_length: int | None = None
    object_data: tuple[int, ...] | None = None
    stats: dict[str, float] = {}
    extra: dict[str, str] = {}
    for key, value in seen.items():
        if key == "dtype":
            dtype_code = _parse_int(p, key, value)
        elif key == "format":
            fmt = _parse_int(p, key, value)
        elif key == "dims":
            dims = _parse_int_list(p, key, value)
        elif key == "$Object.Length":
            object_length = _parse_int(p, key, value)
        elif key == "$Object.data":
            object_data = _parse_int_list(p, key, value)
        elif key == "$Object.Count":
            count = _parse_int(p, key, value)
            if count != 1:
                raise FormatError(f"{p}: $Object.Count={count}; only single-object .bin files are supported")
        elif key in STATS_KEYS:
            try:
                stats[key] = float(value)
            except ValueError:
                raise FormatError(f"{p}: header {key}={value!r} is not a number") from None
        elif key in ("$Version", _END_KEY):
            pass
        else:
            extra[key] = value

    payload_length = size - payload_offset
    if dims is None:
        raise FormatError(f"{p}: header has no dims= line")
    negative = [d for d in dims if d < 0]
    if negative:
        raise FormatError(f"{p}: dims={','.join(map(str, dims))} has a negative dimension")
    if any(d > MAX_DIM for d in dims):
        raise FormatError(f"{p}: dims={','.join(map(str, dims))} has a dimension over {MAX_DIM}")

    header = BinHeader(path=p, dtype_code=-1 if dtype_code is None else dtype_code, format=fmt, dims=dims,
                       payload_offset=payload_offset, payload_length=payload_length,
                       stats=stats or None, extra=extra)
    if header.is_stats_only:
        if dtype_code is None and "type" in extra:
            # msit stats files may name the dtype under "type"; keep the code when it is numeric.
            try:
                header.dtype_code = int(extra["type"])
            except ValueError:
                pass
        return header

    if dtype_code is None:
        raise FormatError(f"{p}: header has no dtype= line")
    itemsize = _dtype_for(dtype_code, p).itemsize
    expected = math.prod(dims) * itemsize  # Python int: a bogus 10 GB claim is just a big number, nothing allocated
    dims_text = ",".join(map(str, dims))
    if math.prod(max(d, 1) for d in dims) * itemsize >= 2**63:
        # numpy sizes even an empty array as if its zero dims were 1 (dims=0,2^62,2^62 is "too big")
        raise FormatError(f"{p}: dims={dims_text} is too large for any array, even an empty one")
    if object_length is not None and object_length != expected:
        raise FormatError(f"{p}: $Object.Length={object_length} but dims={dims_text} x {itemsize} bytes "
                          f"needs {expected} bytes")
    start = 0
    if object_data is not None:
        if len(object_data) != 2 or object_data[0] < 0 or object_data[1] < 0:
            raise FormatError(f"{p}: $Object.data={seen['$Object.data']!r} is not 'offset,length' "
                              f"with non-negative integers")
        start, length = object_data
        if length != expected:
            raise FormatError(f"{p}: $Object.data length {length} but dims={dims_text} x {itemsize} bytes "
                              f"needs {expected} bytes")
    present = payload_length - start
    if present < expected:
        raise FormatError(f"{p}: truncated payload: dims={dims_text} x {itemsize} bytes needs {expected} bytes "
                          f"but {max(present, 0)} are present")
    if present > expected:
        raise FormatError(f"{p}: payload has {present - expected} extra bytes beyond dims={dims_text} "
                          f"x {itemsize} bytes = {expected} bytes")
    header.object_offset = start
    return header


def read_bin(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BIN_BYTES,
             allow_symlinks: bool | None = None) -> RawTensor:
    """The tensor in an ATB ``.bin`` file, its payload memory-mapped read-only (bf16 as uint16 patterns).

    The returned ``RawTensor.data`` is shaped ``dims``; nothing is read until it is used. Empty tensors (a 0 in
    dims) are valid and come back as an empty array.
    """
    p = as_path(path)
    fd, size = _open_regular_file(p, max_bytes, allow_symlinks)
    try:
        header = _header_from(p, fd, size)
        if header.is_stats_only:
            raise FormatError(f"{header.path}: stats-only .bin (no tensor payload)")
        acl = header.acl_dtype
        numel = header.numel
        if numel == 0:
            data = np.empty(header.dims, dtype=acl.storage)
        else:
            # Map the file already opened and checked, not the name again: a name swapped for a FIFO meanwhile
            # would block the mapping's open(). One read-only map of the whole file, the array a view into it
            # (np.memmap costs more per file, and a comparison opens thousands: docs/performance.md).
            try:
                whole = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                data = np.frombuffer(whole, dtype=acl.storage, count=numel,
                                     offset=header.payload_offset + header.object_offset)
            except (OSError, ValueError) as exc:
                # The file shrank between the header check and the mapping (e.g. still being written).
                raise FormatError(f"{header.path}: cannot map payload ({exc})") from None
            data = data.reshape(header.dims)
    finally:
        os.close(fd)
    return RawTensor(data=data, dtype=acl.name, shape=header.dims, path=header.path)


# ----------------------------------------------------------------------------------------------------- writing

def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of ``values``, rounded to nearest, ties to even (as torch does).

    NaNs stay NaN (quiet, sign kept): plain rounding would carry a low-mantissa NaN into infinity.
    """
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    lsb = (bits >> 16) & np.uint32(1)
    rounded = ((bits.astype(np.uint64) + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16).astype(np.uint16) & np.uint16(0x8000)) | np.uint16(0x7FC0)
    return rounded


def _is_torch_tensor(obj: Any) -> bool:
    # Checked by type name so that plain numpy callers never pay for importing torch.
    return any(cls.__module__.startswith("torch") and cls.__name__ == "Tensor" for cls in type(obj).__mro__)


def _storage_and_name(data: Any, path: Path) -> tuple[np.ndarray, str]:
    """(storage array, logical dtype name) of whatever ``write_bin`` was given."""
    if isinstance(data, RawTensor):
        return np.asarray(data.data).reshape(data.shape), data.dtype
    if _is_torch_tensor(data):
        import torch  # lazily: only callers holding torch tensors pay for it

        tensor = data.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        try:
            arr = tensor.numpy()
        except TypeError as exc:
            raise FormatError(f"{path}: cannot write a torch tensor of dtype {tensor.dtype} ({exc})") from None
        return arr, arr.dtype.name
    arr = np.asarray(data)
    return arr, arr.dtype.name


def _convert(arr: np.ndarray, source: str, target: AclDtype) -> np.ndarray:
    if source == target.name:
        return arr
    if target.name == "bfloat16":
        if arr.dtype == np.uint16:
            return arr  # caller hands us bit patterns already
        values = arr if source != "bfloat16" else (arr.astype(np.uint32) << 16).view(np.float32)
        return float32_to_bf16_bits(values.astype(np.float32))
    if source == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(target.storage)


def write_bin(path: str | os.PathLike, data: Any, *, dtype: str | None = None, format: int = _ND_FORMAT) -> Path:
    """Write ``data`` as an ATB ``.bin`` file (atomically: readers never see a partial file) and return the path.

    ``data`` is a numpy array, a :class:`RawTensor` or a ``torch.Tensor``. The dtype is taken from the data unless
    ``dtype`` names another one; ``dtype="bfloat16"`` treats a uint16 array as bf16 bit patterns and rounds any
    float array to bf16 (nearest, ties to even).
    """
    p = Path(path)
    arr, source = _storage_and_name(data, p)
    try:
        target = by_name(dtype if dtype is not None else source)
    except KeyError:
        raise FormatError(f"{p}: cannot write dtype {dtype or source!r} to a .bin "
                          f"(supported: {', '.join(sorted(BY_NAME))})") from None
    arr = _convert(arr, source, target)
    shape = tuple(int(d) for d in arr.shape)
    payload = np.ascontiguousarray(arr, dtype=target.storage).reshape(-1)
    nbytes = payload.size * target.itemsize
    header = (
        "$Version=1.0\n"
        "$Object.Count=1\n"
        f"$Object.Length={nbytes}\n"
        f"format={int(format)}\n"
        f"dtype={target.code}\n"
        f"dims={','.join(map(str, shape))}\n"
        f"$Object.data=0,{nbytes}\n"
        "$End=1\n"
    ).encode("ascii")
    chunks: list[Any] = [header]
    if nbytes:
        chunks.append(memoryview(payload.view(np.uint8)))
    return atomic_write_bytes(p, chunks)
