"""ATB .bin files: what we write reads back bit for bit, and every broken file is a one-line FormatError."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_ait_llm.errors import FormatError
from pytest_ait_llm.formats.atb_bin import (
    DEFAULT_MAX_BIN_BYTES,
    float32_to_bf16_bits,
    read_bin,
    read_bin_header,
    write_bin,
)
from pytest_ait_llm.formats.safe_io import atomic_write_bytes
from pytest_ait_llm.formats.dtypes import ACL_DTYPES
from pytest_ait_llm.formats.tensor import RawTensor


def _bin(*lines: str, payload: bytes = b"") -> bytes:
    return "".join(line + "\n" for line in lines).encode() + payload


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _payload_after_end(path: Path) -> bytes:
    """An independent reader: the bytes after the '$End=1' line, found without our parser."""
    raw = path.read_bytes()
    marker = b"$End=1\n"
    return raw[raw.index(marker) + len(marker):]


def _sample(acl, rng: np.random.Generator, shape=(3, 5)) -> np.ndarray:
    if acl.name == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    # Random bit patterns cover NaNs, infinities, subnormals and signed zeros for the float types.
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * acl.itemsize, dtype=np.uint8)
    return raw.view(acl.storage).reshape(shape)


@pytest.mark.parametrize("code", sorted(ACL_DTYPES))
def test_every_dtype_round_trips_bit_exact(tmp_path, code):
    acl = ACL_DTYPES[code]
    original = _sample(acl, np.random.default_rng(code))
    path = write_bin(tmp_path / f"{acl.name}.bin", original, dtype=acl.name)

    header = read_bin_header(path)
    tensor = read_bin(path)

    assert header.dtype_code == code
    assert header.dims == (3, 5)
    assert tensor.dtype == acl.name and tensor.shape == (3, 5)
    assert tensor.data.dtype == acl.storage
    assert np.asarray(tensor.data).tobytes() == np.ascontiguousarray(original, dtype=acl.storage).tobytes()


def test_header_matches_the_documented_format(tmp_path):
    path = write_bin(tmp_path / "t.bin", np.array([[[1.0, 2.0]]], dtype=np.float16))
    head, _, payload = path.read_bytes().partition(b"$End=1\n")
    assert head.decode().splitlines() == [
        "$Version=1.0", "$Object.Count=1", "$Object.Length=4", "format=2", "dtype=1", "dims=1,1,2",
        "$Object.data=0,4",
    ]
    assert payload == np.array([1.0, 2.0], dtype="<f2").tobytes()


def test_reads_the_original_tools_example_header(tmp_path):
    """The header from the original project's unit test (no $Object.data line variants handled alike)."""
    payload = np.array([0.5, -2.0], dtype="<f2").tobytes()
    path = _write(tmp_path / "x.bin", _bin("$Version=1.0", "$Object.Count=1", "$Object.Length=4", "format=2",
                                         "dtype=1", "dims=1,1,2", "$End=1", payload=payload))
    tensor = read_bin(path)
    assert tensor.shape == (1, 1, 2)
    np.testing.assert_array_equal(tensor.to_float64(), [[[0.5, -2.0]]])


def test_object_data_offset_is_respected(tmp_path):
    payload = b"\xff" * 4 + np.array([7, 8], dtype="<i4").tobytes()
    path = _write(tmp_path / "o.bin", _bin("dtype=3", "dims=2", "$Object.data=4,8", "$End=1", payload=payload))
    np.testing.assert_array_equal(read_bin(path).to_float64(), [7, 8])


def test_bf16_rounds_to_nearest_even_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    one = 1.0
    values = np.array([one, one + 2**-8, one + 3 * 2**-8, -3.14159, 65504.0, 1e-30, np.inf, -np.inf, 3.0e38],
                      dtype=np.float32)
    path = write_bin(tmp_path / "bf.bin", values, dtype="bfloat16")

    independent = np.frombuffer(_payload_after_end(path), dtype="<u2")
    widened = (independent.astype(np.uint32) << 16).view(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(widened, expected)
    # ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and must become 1.0
    assert widened[1] == 1.0 and widened[2] == 1.0 + 2**-6
    np.testing.assert_array_equal(read_bin(path).to_float64(), expected.astype(np.float64))


def test_bf16_nan_stays_nan_even_with_low_mantissa_bits():
    nan_low = np.array([0x7F800001, 0xFF800001], dtype=np.uint32).view(np.float32)
    widened = (float32_to_bf16_bits(nan_low).astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(widened).all()
    assert np.signbit(widened).tolist() == [False, True]


def test_uint16_array_with_bfloat16_dtype_is_taken_as_bit_patterns(tmp_path):
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)  # 1.0, -2.0
    path = write_bin(tmp_path / "p.bin", bits, dtype="bfloat16")
    assert read_bin_header(path).dtype_code == 27
    np.testing.assert_array_equal(read_bin(path).to_float64(), [1.0, -2.0])


def test_torch_tensors_including_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3).to(torch.bfloat16)
    path = write_bin(tmp_path / "t.bin", t)
    back = read_bin(path)
    assert back.dtype == "bfloat16" and back.shape == (4, 3)
    np.testing.assert_array_equal(back.to_float64(), t.to(torch.float64).numpy())

    f16 = torch.arange(6, dtype=torch.float16).reshape(2, 3).t()  # non-contiguous
    back16 = read_bin(write_bin(tmp_path / "h.bin", f16))
    np.testing.assert_array_equal(back16.to_float64(), f16.to(torch.float64).numpy())


def test_raw_tensor_round_trip_and_rewrite(tmp_path):
    first = read_bin(write_bin(tmp_path / "a.bin", np.arange(12, dtype=np.int64).reshape(3, 4)))
    second = read_bin(write_bin(tmp_path / "b.bin", first))
    assert isinstance(second, RawTensor)
    assert second.dtype == "int64" and second.shape == (3, 4)
    np.testing.assert_array_equal(second.to_float64(), np.arange(12).reshape(3, 4))


def test_payload_is_memory_mapped(tmp_path):
    tensor = read_bin(write_bin(tmp_path / "m.bin", np.ones(1000, dtype=np.float32)))
    base = tensor.data
    while isinstance(base, np.ndarray):  # a view of a view of the file's mapping
        base = base.base
    assert isinstance(base.obj, mmap.mmap)  # frombuffer keeps a memoryview of the map
    assert not tensor.data.flags.writeable


def test_empty_and_scalar_tensors(tmp_path):
    empty = read_bin(write_bin(tmp_path / "e.bin", np.zeros((2, 0, 3), dtype=np.float16)))
    assert empty.shape == (2, 0, 3) and empty.numel == 0
    scalar = read_bin(write_bin(tmp_path / "s.bin", np.array(2.5, dtype=np.float32)))
    assert scalar.shape == () and scalar.to_float64() == 2.5


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    write_bin(target, np.arange(3, dtype=np.int32))
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]

    def failing():
        yield b"partial"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, failing())
    # the old file is intact and no temp file is left behind
    np.testing.assert_array_equal(read_bin(target).to_float64(), [0, 1, 2])
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]


def test_writing_an_unsupported_dtype_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="complex"):
        write_bin(tmp_path / "c.bin", np.zeros(2, dtype=np.complex64))


GOOD = ("$Version=1.0", "$Object.Count=1", "format=2", "dtype=0")

BAD_FILES = {
    "truncated payload": (_bin(*GOOD, "dims=2,2", "$End=1", payload=b"\0" * 12), "truncated"),
    "extra payload": (_bin(*GOOD, "dims=2,2", "$End=1", payload=b"\0" * 20), "extra"),
    "object length disagrees with dims": (_bin(*GOOD, "$Object.Length=8", "dims=2,2", "$End=1",
                                               payload=b"\0" * 16), "Object.Length"),
    "object data length disagrees": (_bin(*GOOD, "dims=2", "$Object.data=0,4", "$End=1", payload=b"\0" * 8),
                                     "Object.data"),
    "unknown dtype code": (_bin("format=2", "dtype=999", "dims=1", "$End=1", payload=b"\0" * 4), "999"),
    "known unsupported dtype": (_bin("format=2", "dtype=13", "dims=1", "$End=1", payload=b"\0" * 4), "string"),
    "no $End": (_bin(*GOOD, "dims=1", payload=b""), "End"),
    "no $End and binary junk": (b"\x00\x01\x02" * 100, "End=1"),
    "non-UTF-8 header": (_bin(*GOOD, "dims=1").replace(b"format", b"f\xffrmat") + b"$End=1\n" + b"\0" * 4,
                         "UTF-8"),
    "10 GB dims claim": (_bin(*GOOD, "dims=50000,50000", "$End=1", payload=b"\0" * 1000), "10000000000"),
    "negative dims": (_bin(*GOOD, "dims=-1,4", "$End=1", payload=b"\0" * 16), "negative"),
    "line without =": (_bin(*GOOD, "dims 1", "$End=1", payload=b"\0" * 4), "key=value"),
    "non-integer dims": (_bin(*GOOD, "dims=1,x", "$End=1", payload=b"\0" * 4), "dims"),
    "missing dims": (_bin(*GOOD, "$End=1", payload=b"\0" * 4), "dims"),
    "two objects": (_bin("$Object.Count=2", "format=2", "dtype=0", "dims=1", "$End=1", payload=b"\0" * 4),
                    "Count"),
    "duplicate key": (_bin(*GOOD, "dims=1", "dims=1", "$End=1", payload=b"\0" * 4), "duplicate"),
    "zero-byte file": (b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_broken_files_give_a_one_line_error_naming_the_file(tmp_path, case):
    content, fragment = BAD_FILES[case]
    path = _write(tmp_path / "bad.bin", content)
    with pytest.raises(FormatError) as info:
        read_bin(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert fragment in message


def test_header_without_end_is_not_searched_past_64_kib(tmp_path):
    path = _write(tmp_path / "long.bin", _bin(*(f"k{i}=v" for i in range(20000)), "dims=1", "$End=1",
                                            payload=b"\0" * 4))
    with pytest.raises(FormatError, match="first 65536 bytes"):
        read_bin_header(path)


def test_max_bytes_limit_tells_how_to_raise_it(tmp_path):
    path = write_bin(tmp_path / "big.bin", np.zeros(1024, dtype=np.float32))
    with pytest.raises(FormatError) as info:
        read_bin(path, max_bytes=1000)
    assert "max_bytes" in str(info.value) and "1000" in str(info.value)
    assert read_bin(path, max_bytes=DEFAULT_MAX_BIN_BYTES).shape == (1024,)


def test_missing_file_and_directory_are_format_errors(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        read_bin(tmp_path / "nope.bin")
    with pytest.raises(FormatError, match="not a regular file"):
        read_bin(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        read_bin(fifo)


def test_stats_only_file(tmp_path):
    path = _write(tmp_path / "s.bin", _bin("format=2", "dtype=1", "dims=2,3", "max=4.5", "min=-1",
                                          "mean=0.25", "l2norm=7.0", "$End=1"))
    header = read_bin_header(path)
    assert header.stats == {"max": 4.5, "min": -1.0, "mean": 0.25, "l2norm": 7.0}
    assert header.dims == (2, 3) and header.is_stats_only
    with pytest.raises(FormatError, match="stats-only .bin"):
        read_bin(path)


def test_tensor_file_has_no_stats(tmp_path):
    assert read_bin_header(write_bin(tmp_path / "t.bin", np.ones(2, np.float32))).stats is None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_reading_a_200_mb_tensor_does_not_load_it(tmp_path):
    numel = 50 * 1024 * 1024  # 200 MiB of float32
    header = _bin("$Version=1.0", "$Object.Count=1", f"$Object.Length={numel * 4}", "format=2", "dtype=0",
                  f"dims={numel}", f"$Object.data=0,{numel * 4}", "$End=1")
    path = tmp_path / "big.bin"
    with open(path, "wb") as fh:  # sparse: fast to create, takes no disk
        fh.write(header)
        fh.truncate(len(header) + numel * 4)

    before = _rss_bytes()
    tensor = read_bin(path)
    last = float(tensor.data[-1])  # touching one element maps one page, not the file
    grown = _rss_bytes() - before

    assert tensor.shape == (numel,) and last == 0.0
    assert grown < 50 * 1024 * 1024, f"RSS grew by {grown} bytes"
