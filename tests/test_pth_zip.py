"""The torch-free .pth reader: the same tensor as torch's own loader, or None so that torch judges the file."""
from __future__ import annotations

import os
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
from pytest_ait_llm.formats.pth_zip import read_plain_tensor
from pytest_ait_llm.formats.tensor import RawTensor
from pytest_ait_llm.formats.torch_layout import load_torch_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.uint16, torch.uint32, torch.uint64]
LIMIT = 1 << 30
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


def _as_torch_reads_it(path: Path) -> RawTensor:
    t = torch.load(path, weights_only=True).detach().contiguous()
    if t.dtype == torch.bfloat16:
        return RawTensor(t.view(torch.uint16).numpy(), "bfloat16", tuple(t.shape))
    return RawTensor(t.numpy(), str(t.dtype).replace("torch.", ""), tuple(t.shape))


def _assert_same(mine, theirs):
    assert mine is not None
    assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape)
    np.testing.assert_array_equal(mine.to_float64(), theirs.to_float64())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_reads_what_torch_reads(tmp_path, dtype, layout):
    base = _BASE.abs() if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else _BASE
    path = tmp_path / "output_0.pth"
    torch.save(LAYOUTS[layout](base.to(dtype)), path)
    raw = read_plain_tensor(path, max_bytes=LIMIT)
    _assert_same(raw, _as_torch_reads_it(path))
    assert not raw.data.flags.writeable  # a map of somebody's dump is never written through


def test_requires_grad_and_bf16_bit_patterns(tmp_path):
    path = tmp_path / "output.pth"
    torch.save(torch.randn(3, 5, requires_grad=True) * 3, path)  # a non-leaf: saved with its grad flag
    _assert_same(read_plain_tensor(path, max_bytes=LIMIT), _as_torch_reads_it(path))
    torch.save(torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16), path)
    raw = read_plain_tensor(path, max_bytes=LIMIT)
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
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
    np.testing.assert_array_equal(load_torch_tensor(path).to_float64(), torch.load(path).detach().double().numpy())


def test_a_negative_bit_view_is_left_to_torch(tmp_path):
    """Its pickle carries a ``neg`` flag the raw bytes do not show: mapping them would flip every sign."""
    path = tmp_path / "output.pth"
    torch.save(torch.ones(3)._neg_view(), path)
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
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
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
    np.testing.assert_array_equal(load_torch_tensor(path).to_float64(), np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("content, message", [
    ((torch.ones(2), torch.ones(2)), "holds a tuple"),
    ({"a": torch.ones(2)}, "holds a dict"),
    ([torch.ones(2)], "holds a list"),
])
def test_containers_of_tensors_are_left_to_torch(tmp_path, content, message):
    path = tmp_path / "output.pth"
    torch.save(content, path)
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
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
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
    with pytest.raises(FormatError):
        load_torch_tensor(path)
    assert not marker.exists()


def test_torch_save_of_a_code_running_object_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "output.pth"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), path)
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
    with pytest.raises(FormatError, match="refused by a weights-only torch.load"):
        load_torch_tensor(path)
    assert not marker.exists()


@pytest.mark.parametrize("deflate", [(), ("data/0",)], ids=["stored", "compressed"])
def test_a_storage_cut_short_is_an_error_not_garbage(tmp_path, deflate):
    """A memory-mapped torch.load reads past such a member into whatever follows it, and says nothing."""
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, replace={"data/0": b"\0" * 20}, deflate=deflate)
    with pytest.raises(FormatError, match="output.pth: .*20 bytes where the tensor's storage has 48"):
        load_torch_tensor(path)


@pytest.mark.parametrize("keep", [-100, 200, 3, 0], ids=["central directory cut", "200 bytes", "3 bytes", "empty"])
def test_a_cut_file_is_left_to_torch(tmp_path, keep):
    path = tmp_path / "output.pth"
    path.write_bytes(_saved(tmp_path).read_bytes()[:keep])
    assert read_plain_tensor(path, max_bytes=LIMIT) is None
    with pytest.raises(FormatError, match="not a torch tensor file|refused by a weights-only torch.load"):
        load_torch_tensor(path)


@pytest.mark.parametrize("change, ours", [
    ({}, True),  # zipfile's own layout (no 64-byte alignment): the copies the other tests damage are readable
    ({"replace": {"data/0": np.arange(13, dtype="<f4").tobytes()}}, True),
    ({"deflate": ("data.pkl",)}, True),
    ({"deflate": ("data.pkl", "data/0", "version", "byteorder")}, True),
], ids=["plain copy", "longer storage", "compressed pickle", "every member compressed"])
def test_harmless_deviations_are_read_by_us_or_by_torch(tmp_path, change, ours):
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, **change)
    assert (read_plain_tensor(path, max_bytes=LIMIT) is not None) == ours
    np.testing.assert_array_equal(load_torch_tensor(path).to_float64(), np.arange(12.0).reshape(3, 4))


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
    """read_plain_tensor gives torch.load's values and shape."""
    loaded = torch.load(path, weights_only=True)
    expected = (loaded.view(torch.uint16) if loaded.dtype == torch.bfloat16 else loaded).numpy()
    raw = read_plain_tensor(path, max_bytes=LIMIT)
    assert raw is not None
    assert (raw.shape, raw.data.dtype) == (expected.shape, expected.dtype)
    np.testing.assert_array_equal(raw.data.reshape(raw.shape), expected)  # contiguous: kept flat


@pytest.mark.parametrize("layout", BIG_LAYOUTS)
@pytest.mark.parametrize("dtype", BIG_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_a_tensor_of_a_few_mb_reads_as_torch_loads_it(tmp_path, dtype, layout):
    path = tmp_path / "output_0.pth"
    torch.save(BIG_LAYOUTS[layout](_big(dtype)), path)
    assert path.stat().st_size > 2 << 20
    _assert_reads_as_torch_loads(path)


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


def test_a_small_expanded_view_reads_as_its_dense_values(tmp_path):
    path = tmp_path / "output.pth"
    torch.save(torch.arange(4.0).reshape(1, 4).expand(1000, 4), path)
    raw = read_plain_tensor(path, max_bytes=LIMIT)
    assert raw.shape == (1000, 4)
    np.testing.assert_array_equal(raw.to_float64(), np.tile(np.arange(4.0), (1000, 1)))


@pytest.mark.parametrize("read", [read_plain_tensor, load_torch_tensor])
def test_an_expanded_view_beyond_the_limit_is_refused(tmp_path, read):
    path = tmp_path / "output.pth"
    torch.save(torch.ones(1, 64).expand(2**40, 64), path)  # a few KB on disk, 256 TiB dense
    with pytest.raises(FormatError, match=r"output.pth: a strided view of \d+ elements .* over the limit"):
        read(path, max_bytes=LIMIT)


def test_a_compressed_storage_inflating_beyond_the_limit_is_refused(tmp_path):
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path, torch.zeros(1 << 16)), path, deflate=("data/0",))
    assert path.stat().st_size < 10_000
    with pytest.raises(FormatError, match=r"output.pth: compressed storage of 262144 bytes exceeds the limit"):
        load_torch_tensor(path, max_bytes=1 << 16)
    np.testing.assert_array_equal(load_torch_tensor(path, max_bytes=1 << 18).to_float64(), np.zeros(1 << 16))


def test_a_compressed_member_that_inflates_past_its_storage_is_refused(tmp_path):
    """The pickle says 48 bytes; the deflated member holds a megabyte: never read beyond what the tensor needs."""
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path), path, replace={"data/0": b"\0" * (1 << 20)}, deflate=("data/0",))
    with pytest.raises(FormatError, match="inflates to more than 48 bytes"):
        load_torch_tensor(path)


def test_a_compressed_container_is_refused_not_mapped(tmp_path):
    """torch.load(mmap=True) would map a compressed member's bytes as values: such a file is refused."""
    path = tmp_path / "output.pth"
    _rewrite(_saved(tmp_path, {"a": torch.ones(3)}), path, deflate=("data/0",))
    with pytest.raises(FormatError, match="compressed torch file that is not one plain tensor"):
        load_torch_tensor(path)
