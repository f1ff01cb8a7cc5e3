"""The torch-free .pth reader: the same tensor as torch's own loader, or None so that torch judges the file."""
from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm.errors import FormatError
from pytest_ait_llm.formats import pth_zip
from pytest_ait_llm.formats.pth_zip import read_plain_tensor
from pytest_ait_llm.formats.torch_layout import _raw_from_torch, load_torch_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.uint16, torch.uint32, torch.uint64]
_BASE = torch.arange(-20, 40, dtype=torch.float64).reshape(6, 10) / 3
LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.t(),
    "sliced with an offset": lambda t: t[2:, 3:7],
    "strided": lambda t: t[::2, 1::3],
    "broadcast (stride 0)": lambda t: t[:, :1].expand(6, 4),
    "size-1 dim": lambda t: t[:, 4:5],
    "0-d": lambda t: t[1, 2],
    "empty": lambda t: t[:0],
}


def _as_torch_reads_it(path: Path):
    return _raw_from_torch(torch.load(path, weights_only=True, mmap=True), path)


def _assert_same(mine, theirs):
    assert mine is not None
    assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape)
    np.testing.assert_array_equal(mine.to_float64(), theirs.to_float64())
    np.testing.assert_array_equal(np.concatenate([np.zeros(0), *mine.chunks(7)]),
                                  theirs.to_float64().reshape(-1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_reads_what_torch_reads(tmp_path, dtype, layout):
    base = _BASE.abs() if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else _BASE
    path = tmp_path / "output_0.pth"
    torch.save(LAYOUTS[layout](base.to(dtype)), path)
    raw = read_plain_tensor(path)
    _assert_same(raw, _as_torch_reads_it(path))
    assert not raw.data.flags.writeable  # a map of somebody's dump is never written through


def test_requires_grad_and_bf16_bit_patterns(tmp_path):
    path = tmp_path / "output.pth"
    torch.save(torch.randn(3, 5, requires_grad=True) * 3, path)  # a non-leaf: saved with its grad flag
    _assert_same(read_plain_tensor(path), _as_torch_reads_it(path))
    torch.save(torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16), path)
    raw = read_plain_tensor(path)
    assert (raw.dtype, raw.data.dtype) == ("bfloat16", np.uint16)
    np.testing.assert_array_equal(raw.data, [0x3FC0, 0xC010, 0x7F62])


def test_load_torch_tensor_maps_the_file_without_torch_load(tmp_path, monkeypatch):
    path = tmp_path / "output.pt"
    torch.save(torch.arange(6.0).reshape(2, 3), path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    raw = load_torch_tensor(path)
    assert (raw.dtype, raw.shape, raw.path) == ("float32", (2, 3), path)
    assert not raw.data.flags.owndata and raw.data.base is not None  # a view of the file, not a copy
    np.testing.assert_array_equal(raw.to_float64(), np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("make", [
    lambda p: torch.save(torch.ones(3), p, _use_new_zipfile_serialization=False),
    lambda p: torch.save(torch.nn.Parameter(torch.ones(3)), p),
], ids=["legacy non-zip", "nn.Parameter"])
def test_other_single_tensors_fall_back_to_torch(tmp_path, make):
    path = tmp_path / "output.pth"
    make(path)
    assert read_plain_tensor(path) is None
    np.testing.assert_array_equal(load_torch_tensor(path).to_float64(), torch.load(path).detach().double().numpy())


def test_a_negative_bit_view_is_left_to_torch(tmp_path):
    """Its pickle carries a ``neg`` flag the raw bytes do not show: mapping them would flip every sign."""
    path = tmp_path / "output.pth"
    torch.save(torch.ones(3)._neg_view(), path)
    assert read_plain_tensor(path) is None
    with pytest.raises(FormatError, match="cannot be read"):
        load_torch_tensor(path)


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()) -> None:
    """Copy torch's zip member by member (names relative to the archive folder), some replaced or deflated."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            method = zipfile.ZIP_DEFLATED if rel in deflate else zipfile.ZIP_STORED
            zout.writestr(info.filename, replace.get(rel, zin.read(info)), method)


def _saved(tmp_path: Path, tensor=None) -> Path:
    src = tmp_path / "src.pth"
    torch.save(torch.arange(12.0).reshape(3, 4) if tensor is None else tensor, src)
    return src


def test_a_big_endian_payload_is_left_to_torch(tmp_path):
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, {"data/0": np.arange(12, dtype=">f4").tobytes(), "byteorder": b"big"})
    assert read_plain_tensor(path) is None
    np.testing.assert_array_equal(load_torch_tensor(path).to_float64(), np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("content, message", [
    ((torch.ones(2), torch.ones(2)), "holds a tuple"),
    ({"a": torch.ones(2)}, "holds a dict"),
    ([torch.ones(2)], "holds a list"),
])
def test_containers_of_tensors_are_left_to_torch(tmp_path, content, message):
    path = tmp_path / "output.pth"
    torch.save(content, path)
    assert read_plain_tensor(path) is None
    with pytest.raises(FormatError, match=message):
        load_torch_tensor(path)


def _evil_pickles(marker: Path) -> dict[str, bytes]:
    shell = f"touch {marker}".encode()
    return {
        "os.system": b"cos\nsystem\n(S'" + shell + b"'\ntR.",
        "builtins.eval": b"cbuiltins\neval\n(S'open(" + repr(str(marker)).encode() + b", \"w\")'\ntR.",
        # an allowed name called with crafted arguments: the storage is not one persistent_load gave
        "rebuild without a storage": b"ctorch._utils\n_rebuild_tensor_v2\n((S'0'\nI999999\nS'float32'\ntI0\n"
                                     b"(I999\nt(I1\ntI00\nccollections\nOrderedDict\n)RtR.",
        "a storage class called": b"ctorch\nFloatStorage\n(I5\ntR.",
    }


@pytest.mark.parametrize("kind", list(_evil_pickles(Path("x"))))
def test_a_hostile_data_pkl_runs_nothing_and_is_refused(tmp_path, kind):
    marker, path = tmp_path / "pwned", tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, {"data.pkl": _evil_pickles(marker)[kind]})
    assert read_plain_tensor(path) is None
    with pytest.raises(FormatError):
        load_torch_tensor(path)
    assert not marker.exists()


def test_torch_save_of_a_code_running_object_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "output.pth"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), path)
    assert read_plain_tensor(path) is None
    with pytest.raises(FormatError, match="refused by a weights-only torch.load"):
        load_torch_tensor(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ({"replace": {"data/0": b"\0" * 20}}, "holds 20 bytes where the tensor's storage has 48"),
    ({"deflate": ("data/0",)}, "is compressed"),
])
def test_a_damaged_storage_is_an_error_not_garbage(tmp_path, damage, message):
    """A memory-mapped torch.load reads past such a member into whatever follows it, and says nothing."""
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, **damage)
    for read in (read_plain_tensor, load_torch_tensor):
        with pytest.raises(FormatError, match=message):
            read(path)


@pytest.mark.parametrize("keep", [-100, 200, 3, 0], ids=["central directory cut", "200 bytes", "3 bytes", "empty"])
def test_a_cut_file_is_left_to_torch(tmp_path, keep):
    path = tmp_path / "output.pth"
    path.write_bytes(_saved(tmp_path).read_bytes()[:keep])
    assert read_plain_tensor(path) is None
    with pytest.raises(FormatError, match="not a torch tensor file|refused by a weights-only torch.load"):
        load_torch_tensor(path)


@pytest.mark.parametrize("change, ours", [
    ({}, True),  # zipfile's own layout (no 64-byte alignment): the copies the other tests damage are readable
    ({"replace": {"data/0": np.arange(13, dtype="<f4").tobytes()}}, True),
    ({"deflate": ("data.pkl",)}, False),
], ids=["plain copy", "longer storage", "compressed pickle"])
def test_harmless_deviations_are_read_by_us_or_by_torch(tmp_path, change, ours):
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, **change)
    assert (read_plain_tensor(path) is not None) == ours
    np.testing.assert_array_equal(load_torch_tensor(path).to_float64(), np.arange(12.0).reshape(3, 4))


def _by_zipfile(fh: pth_zip._Bytes) -> dict:
    return {info.filename: info for info in zipfile.ZipFile(fh.map).infolist()}


def _directory(path: Path, parse=pth_zip._central_directory) -> dict | None:
    """The zip's members as ``parse`` finds them (None: it gave up), with what the reader uses of each."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as fh:
        found = parse(pth_zip._Bytes(f.fileno(), fh))
    return None if found is None else {name: (e.filename, e.header_offset, e.compress_type, e.compress_size,
                                              e.file_size) for name, e in found.items()}


def _outcome(data: bytes, path: Path):
    """read_plain_tensor's result on ``data`` written to a new ``path`` (nothing remembered of an earlier parse)."""
    path.write_bytes(data)
    try:
        raw = read_plain_tensor(path)
    except FormatError as e:
        return "FormatError", str(e).replace(str(path), "<file>")
    return None if raw is None else (raw.dtype, raw.shape, raw.to_float64().tolist())


def _assert_read_as_through_zipfile(data: bytes, tmp_path: Path, monkeypatch) -> str | None:
    """The same result as when zipfile read every directory (as before the parser): a tensor, None or the error.

    Returns what it was: "read", None or "FormatError"."""
    ours = _outcome(data, tmp_path / "ours.pth")
    with monkeypatch.context() as m:
        m.setattr(pth_zip, "_central_directory", lambda fh: None)
        assert ours == _outcome(data, tmp_path / "zipfile.pth")
    return None if ours is None else "FormatError" if ours[0] == "FormatError" else "read"


@pytest.mark.parametrize("content", [
    torch.arange(12.0).reshape(3, 4), torch.arange(7, dtype=torch.int64),
    torch.tensor([1.5, -2.25], dtype=torch.bfloat16), torch.tensor([True, False]),
    torch.zeros(0, 3, dtype=torch.float16), torch.tensor(2.5, dtype=torch.float64),
    torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024), {"a": torch.ones(2), "b": torch.arange(3)},
], ids=["float32", "int64", "bfloat16", "bool", "empty", "0-d", "4 MiB", "dict"])
def test_the_zip_directory_of_torch_save_is_read_as_zipfile_reads_it(tmp_path, monkeypatch, content):
    path = tmp_path / "output.pth"
    torch.save(content, path)
    data = path.read_bytes()
    assert data[-42:-38] == b"PK\x06\x07"  # torch writes the ZIP64 end records: the path under test
    assert _directory(path) == _directory(path, _by_zipfile)
    outcome = _assert_read_as_through_zipfile(data, tmp_path, monkeypatch)
    assert outcome == (None if isinstance(content, dict) else "read")


@pytest.mark.parametrize("change, outcome", [
    ({}, "read"),  # zipfile's own writing: no ZIP64 end records
    ({"deflate": ("data.pkl",)}, None),
    ({"deflate": ("data/0",)}, "FormatError"),
], ids=["zipfile copy", "compressed pickle", "compressed storage"])
def test_zips_written_by_zipfile_are_read_as_zipfile_reads_them(tmp_path, monkeypatch, change, outcome):
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, **change)
    assert _directory(path) == _directory(path, _by_zipfile)
    assert _assert_read_as_through_zipfile(path.read_bytes(), tmp_path, monkeypatch) == outcome


def _central(data: bytes, suffix: str) -> int:
    """Where the central directory entry of the member named ``*suffix`` starts, walking from the end record."""
    count, _, pos = struct.unpack_from("<HLL", data, len(data) - 12)
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46:pos + 46 + name_len].decode().endswith(suffix):
            return pos
        pos += 46 + name_len + extra_len + comment_len
    raise LookupError(suffix)


def _put(data: bytes, pos: int, fmt: str, *values) -> bytes:
    patch = struct.pack(fmt, *values)
    return data[:pos] + patch + data[pos + len(patch):]


def _end_records(data: bytes, field: str, delta: int, zip64: bool = True) -> bytes:
    """The directory's entry ``count`` or ``size`` changed by ``delta`` in the end record and (``zip64``) the ZIP64
    one: torch's ZIP64 record is the 56 bytes before the 20-byte locator and the 22-byte end record."""
    count, size = struct.unpack_from("<HL", data, len(data) - 12)
    if field == "count":
        data = _put(data, len(data) - 14, "<HH", count + delta, count + delta)
        return _put(data, len(data) - 98 + 24, "<QQ", count + delta, count + delta) if zip64 else data
    data = _put(data, len(data) - 10, "<L", size + delta)
    return _put(data, len(data) - 98 + 40, "<Q", size + delta) if zip64 else data


def _cut_directory(data: bytes) -> bytes:
    """The directory's last 20 bytes gone, every count, size and offset left as it was."""
    end = len(data) - 98
    return data[:end - 20] + data[end:]


#: A change to a torch.save file -> what reading it gives through zipfile, as before: a tensor ("read"), None, or
#: ``...`` where that depends on the Python version (newer zipfiles check the ZIP64 records more).
ODD_ZIPS = {
    "zip comment": (lambda d: _put(d, len(d) - 2, "<H", 5) + b"hello", "read"),
    "comment length, no comment": (lambda d: _put(d, len(d) - 2, "<H", 5), ...),
    "garbage after the end record": (lambda d: d + b"\0garbage", ...),
    "entry count one more": (lambda d: _end_records(d, "count", 1), ...),
    "entry count one fewer": (lambda d: _end_records(d, "count", -1), ...),
    "end record's count not the ZIP64 record's": (lambda d: _end_records(d, "count", 1, zip64=False), ...),
    "ZIP64 locator pointing elsewhere": (lambda d: _put(d, len(d) - 42 + 8, "<Q", 0), ...),
    "directory size 4 more": (lambda d: _end_records(d, "size", 4), None),  # zipfile looks 4 bytes earlier
    "central directory cut": (_cut_directory, None),
    "two disks": (lambda d: _put(d, len(d) - 22 - 4, "<L", 2), None),
    "member on another disk": (lambda d: _put(d, _central(d, "data/0") + 34, "<H", 1), ...),
    "size needing a ZIP64 extra field": (lambda d: _put(d, _central(d, "data/0") + 24, "<L", 0xFFFFFFFF), None),
    "local header past the directory": (lambda d: _put(d, _central(d, "data/0") + 42, "<L", len(d)), None),
    "encrypted flag": (lambda d: _put(d, _central(d, "data/0") + 8, "<H", 0x809), "read"),
    "name not UTF-8": (lambda d: _put(d, _central(d, "byteorder") + 46, "<B", 0xFF), None),
    "NUL in a name": (lambda d: _put(d, _central(d, "/version") + 46 + len("src/versio"), "<B", 0), None),
    "version zipfile refuses": (lambda d: _put(d, _central(d, "/version") + 6, "<B", 64), None),
}


@pytest.mark.parametrize("kind", ODD_ZIPS)
def test_an_odd_zip_is_left_to_zipfile(tmp_path, monkeypatch, kind):
    """Anything torch.save does not write goes to zipfile, whose result (a tensor, None or an error) stays."""
    damage, outcome = ODD_ZIPS[kind]
    path = tmp_path / "odd.pth"
    path.write_bytes(damage(_saved(tmp_path).read_bytes()))
    assert _directory(path) is None
    result = _assert_read_as_through_zipfile(path.read_bytes(), tmp_path, monkeypatch)
    assert outcome is ... or result == outcome


#: dtypes of the few-MB tensors below: the parse reads their zip and pickle with pread, the tensor is a map view
BIG_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32,
              torch.int64, torch.bool]
BIG_LAYOUTS = {"contiguous": lambda t: t, "transposed": lambda t: t.t(), "with an offset": lambda t: t[3:]}


def _big(dtype: torch.dtype, nbytes: int = 3 << 20) -> torch.Tensor:
    """A ``(rows, 256)`` tensor of about ``nbytes``: the zip's start and end lie pages apart."""
    n = nbytes // dtype.itemsize // 256 * 256
    g = torch.Generator().manual_seed(n)
    if dtype.is_floating_point:
        t = (torch.randn(n, generator=g) * 100).to(dtype)
    elif dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g).bool()
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -(1 << 62)), min(info.max, 1 << 62), (n,), generator=g, dtype=torch.int64)
        t = t.to(dtype)
    return t.reshape(-1, 256)


def _assert_reads_as_torch_loads(path: Path) -> None:
    """read_plain_tensor gives torch.load's values and shape, and (if it says so) they lie at ``offset`` in the file."""
    loaded = torch.load(path, weights_only=True)
    expected = (loaded.view(torch.uint16) if loaded.dtype == torch.bfloat16 else loaded).numpy()
    raw = read_plain_tensor(path)
    assert raw is not None
    assert (raw.shape, raw.data.dtype) == (expected.shape, expected.dtype)
    np.testing.assert_array_equal(raw.data.reshape(raw.shape), expected)  # contiguous: kept flat
    assert (raw.offset is None) == (not expected.flags.c_contiguous)
    if raw.offset is not None:
        with open(path, "rb") as f:
            assert os.pread(f.fileno(), expected.nbytes, raw.offset) == expected.tobytes()


@pytest.mark.parametrize("layout", BIG_LAYOUTS)
@pytest.mark.parametrize("dtype", BIG_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_a_tensor_of_a_few_mb_reads_as_torch_loads_it(tmp_path, dtype, layout):
    path = tmp_path / "output_0.pth"
    torch.save(BIG_LAYOUTS[layout](_big(dtype)), path)
    assert path.stat().st_size > 2 << 20
    _assert_reads_as_torch_loads(path)


def _save_with_a_long_storage_key(tensor: torch.Tensor, path: Path, key_len: int = 9000) -> None:
    """``tensor`` as torch's own zip writer lays it out (ZIP64 end records, aligned members), its storage named by a
    ``key_len``-character key: data.pkl and the directory entry of data/<key> each hold the key."""
    src = path.with_suffix(".src")
    torch.save(tensor, src)
    with zipfile.ZipFile(src) as z:
        records = {info.filename.split("/", 1)[1]: z.read(info) for info in z.infolist()}
    key, short = "k" * key_len, b"X\x01\x00\x00\x000"  # BINUNICODE '0': the storage key in torch's pickle
    assert records["data.pkl"].count(short) == 1
    records["data.pkl"] = records["data.pkl"].replace(short, b"X" + struct.pack("<L", len(key)) + key.encode())
    records["data/" + key] = records.pop("data/0")
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, data in records.items():
        if name not in ("version", ".data/serialization_id"):  # written by write_end_of_file
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer


def test_a_pickle_and_directory_across_the_read_windows_read_as_torch_loads_them(tmp_path):
    """data.pkl runs past the first _WINDOW bytes, the directory starts before the last ones, the storage's local
    header lies in neither: each read of a range across a window's edge or outside both gets the file's bytes."""
    path = tmp_path / "long_key.pth"
    _save_with_a_long_storage_key(_big(torch.float32), path)
    size, window = path.stat().st_size, pth_zip._WINDOW
    with zipfile.ZipFile(path) as z:
        infos = {info.filename.split("/", 1)[1]: info for info in z.infolist()}
        pkl, storage = infos["data.pkl"], infos["data/" + "k" * 9000]
        assert pkl.header_offset < window < pkl.header_offset + 30 + len(pkl.filename) + pkl.file_size
        assert z.start_dir < size - window < size - 98  # the directory's start and its end records
        assert window < storage.header_offset < size - window
    _assert_reads_as_torch_loads(path)


@pytest.mark.parametrize("window", [1, 7, 64, 100, 1000, 4096, 1 << 20])
def test_any_read_window_gives_the_same_tensor(tmp_path, monkeypatch, window):
    """Smaller windows cut data.pkl, the directory, the end records and the local headers anywhere; larger ones
    read the whole file at once."""
    monkeypatch.setattr(pth_zip, "_WINDOW", window)
    torch.save(_big(torch.float16).t(), tmp_path / "output.pth")
    _save_with_a_long_storage_key(_big(torch.int32)[5:], tmp_path / "long_key.pth")
    torch.save(torch.arange(5.0), tmp_path / "small.pth")
    for name in ("output.pth", "long_key.pth", "small.pth"):
        _assert_reads_as_torch_loads(tmp_path / name)


class _NoMap:
    """Stands for a file's map in :class:`pth_zip._Bytes`: the file's length, and nothing to read."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def test_the_parse_reads_the_file_with_pread_not_through_its_map(tmp_path):
    """A first touch of a mapped page is a page fault: the zip and pickle are read with pread, only the tensor is
    a view of the map."""
    torch.save(_big(torch.float32), tmp_path / "output.pth")
    _save_with_a_long_storage_key(_big(torch.float32), tmp_path / "long_key.pth")
    for path in (tmp_path / "output.pth", tmp_path / "long_key.pth"):
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as fh:
                view = pth_zip._read(pth_zip._Bytes(fd, fh), path)
            assert view is not None
            assert pth_zip._read(pth_zip._Bytes(fd, _NoMap(os.fstat(fd).st_size)), path) == view
        finally:
            os.close(fd)


def test_a_file_read_again_is_not_parsed_again(tmp_path, monkeypatch):
    path = tmp_path / "output.pth"
    torch.save(_big(torch.float32), path)
    first = read_plain_tensor(path)
    monkeypatch.setattr(pth_zip, "_Bytes", lambda *args: pytest.fail("read again"))
    monkeypatch.setattr(pth_zip, "_read", lambda *args: pytest.fail("parsed again"))
    again = read_plain_tensor(path)
    assert (again.shape, again.offset) == (first.shape, first.offset)
    np.testing.assert_array_equal(again.data, first.data)


def test_compare_of_a_plain_dump_never_imports_torch(tmp_path):
    golden = golden_llama_dump(tmp_path / "golden", num_layers=2)
    my, _ = write_mirror(golden, tmp_path / "my", num_layers=2)
    code = textwrap.dedent(f"""
        import sys
        from pytest_ait_llm.api import run_compare
        result = run_compare({str(golden.root)!r}, {str(my)!r}, output_dir={str(tmp_path / "out")!r})
        assert result.compared, "nothing was compared"
        heavy = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
        assert not heavy, f"the compare imported {{heavy[:5]}}"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
