"""Nothing lost: interrupted writers never leave a file that reads as valid, a comparison never touches the dumps
it reads or a report that already exists, and concurrent comparisons into one directory each get their own report.
"""
from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
from pytest_ait_llm.errors import FormatError
from pytest_ait_llm.formats import safe_io as atomic
from pytest_ait_llm.formats.atb_bin import read_bin, write_bin
from pytest_ait_llm.formats.atb_layout import op_files
from pytest_ait_llm.formats.atb_topology import parse_topology
from pytest_ait_llm.report import csv_report

LAYERS = 2


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """(golden {PID}_{device} dir, ATB dump root): a healthy pair that every test here only reads."""
    golden = golden_llama_dump(tmp_path_factory.mktemp("golden"), num_layers=LAYERS)
    root, _ = write_mirror(golden, tmp_path_factory.mktemp("my"), num_layers=LAYERS)
    return golden.root, root


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``roots``: (size, mtime_ns, sha1) by path; symlinks by their target."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                state[str(path)] = (0, 0, os.readlink(path))
            elif path.is_file():
                st = path.stat()
                state[str(path)] = (st.st_size, st.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return state


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


# --------------------------------------------------------------------------------------- interrupted writers

def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = write_bin(tmp_path / "outtensor0.bin", np.arange(4, dtype=np.float32))
    before = target.read_bytes()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_bin(target, np.zeros(8, dtype=np.float32))
    with pytest.raises(OSError):
        write_bin(tmp_path / "outtensor1.bin", np.zeros(8, dtype=np.float32))
    monkeypatch.undo()
    assert target.read_bytes() == before and read_bin(target).to_float64().tolist() == [0, 1, 2, 3]
    assert not (tmp_path / "outtensor1.bin").exists() and _no_temp_files(tmp_path)


def test_a_writer_failing_mid_file_leaves_nothing(tmp_path):
    def chunks():
        yield b"$Version=1.0\n$Object.Count=1\nformat=2\ndtype=0\ndims=4\n$End=1\n"
        yield b"\0" * 8
        raise OSError(5, "Input/output error")  # the disk fails half-way through the payload

    with pytest.raises(OSError, match="Input/output"):
        atomic.atomic_write_bytes(tmp_path / "outtensor0.bin", chunks())
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from pytest_ait_llm.formats import safe_io as atomic

    target, mode = Path(sys.argv[1]), sys.argv[2]
    header = b"$Version=1.0\\n$Object.Count=1\\nformat=2\\ndtype=0\\ndims=1024\\n$End=1\\n"

    def chunks():
        yield header
        yield np.ones(512, np.float32).tobytes()   # half the payload
        if mode == "mid-write":
            print("ready", flush=True)
            time.sleep(120)
        yield np.ones(512, np.float32).tobytes()

    def stall(src, dst):  # the data is complete in the temp file, the rename has not happened
        print("ready", flush=True)
        time.sleep(120)

    if mode == "before-rename":
        atomic.os.replace = stall
    atomic.atomic_write_bytes(target, chunks())
""")


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
@pytest.mark.parametrize("existing", [False, True], ids=["new file", "overwriting"])
def test_a_killed_writer_never_leaves_a_file_that_reads_as_valid(tmp_path, mode, existing):
    op_dir = tmp_path / "ait_dump" / "tensors" / "0_1" / "0" / "0_LinearOperation" / "after"
    op_dir.mkdir(parents=True)
    target = op_dir / "outtensor0.bin"
    if existing:
        write_bin(target, np.full(3, 7, dtype=np.float32))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), mode], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    leftovers = [p.name for p in op_dir.iterdir() if p.name != "outtensor0.bin"]
    assert leftovers and all(name.startswith(".outtensor0.bin.") and name.endswith(".tmp") for name in leftovers)
    if existing:  # the previous, complete file is still there, unchanged
        assert read_bin(target).to_float64().tolist() == [7, 7, 7]
    else:
        assert not target.exists()
    # the leftover temp file is not a tensor file to the layout reader
    op = parse_topology({"modelName": "M", "nodes": [{"opName": "LinearOperation_0", "opType": "LinearOperation"}]}).ops[0]
    assert op_files(op_dir.parent.parent, op).outputs == ([target] if existing else [])


def test_failed_writes_of_dump_writers_leave_no_file_a_reader_lists(tmp_path, monkeypatch):
    """The ATB-layout writer and the torch hooks both go through temp + rename."""
    import torch

    from pytest_ait_llm.dump import torch_hooks

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    writer = AtbDumpWriter(tmp_path / "atb", model_name="M", pid=1)
    monkeypatch.setattr(os, "replace", fail)  # both writers call os.replace through the os module
    with pytest.raises(OSError):
        writer.save_tensors(0, "0_LinearOperation", [np.ones(2, np.float32)], [np.ones(2, np.float32)])
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(OSError):
        with register_hook(model, DumpConfig(dump_path=tmp_path / "torch")):
            model(torch.ones(1, 2))
    monkeypatch.undo()
    assert torch_hooks.os.replace is os.replace
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pth", ".json") and not p.name.startswith(".")], files
    assert _no_temp_files(tmp_path)


# ------------------------------------------------------------------------- comparisons touch nothing of the user's

def test_a_comparison_changes_no_dump_file_even_with_the_report_written_into_the_dump(dumps):
    golden, my = dumps
    before = snapshot(golden, my)
    result = run_compare(golden, my, output_dir=my)  # the worst place a user could choose
    after = snapshot(golden, my)
    assert {k: v for k, v in after.items() if k != str(result.csv_path)} == before
    assert result.csv_path.parent == my and str(result.csv_path) in after


def test_an_existing_report_of_the_same_second_is_never_overwritten(dumps, tmp_path):
    golden, my = dumps
    now = time.time()
    sentinels = {}
    for offset in range(0, 4):  # this second and the next few: whichever the run lands in
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now + offset))
        path = tmp_path / f"ait_cmp_report_{stamp}.csv"
        path.write_text(f"a user's report {offset}\n")
        sentinels[path] = path.read_text()
    result = run_compare(golden, my, output_dir=tmp_path, tokens=[0])
    assert result.csv_path not in sentinels and result.csv_path.is_file()
    assert all(path.read_text() == text for path, text in sentinels.items())


# ----------------------------------------------------------------------------------- concurrent comparisons

def test_concurrent_comparisons_in_threads_each_write_their_own_complete_report(dumps, tmp_path):
    golden, my = dumps
    start = threading.Barrier(4)

    def one(_):
        start.wait()
        return run_compare(golden, my, output_dir=tmp_path, workers=2)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    paths = [r.csv_path for r in results]
    assert len(set(paths)) == 4 and sorted(tmp_path.iterdir()) == sorted(paths)
    contents = [csv_rows(p) for p in paths]
    assert all(c == contents[0] for c in contents) and len(contents[0]) == 1 + len(results[0].rows)
    assert all(r.passed for r in results)


def test_two_cli_runs_at_once_on_the_same_dumps_both_complete(dumps, tmp_path):
    golden, my = dumps
    command = [sys.executable, "-m", "pytest_ait_llm", "compare", "-gp", str(golden), "-mp", str(my),
               "-o", str(tmp_path)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    paths = [Path(out.splitlines()[0]) for out, _ in outputs]
    assert paths[0] != paths[1] and sorted(tmp_path.iterdir()) == sorted(paths)
    first, second = csv_rows(paths[0]), csv_rows(paths[1])
    assert first == second and len(first) > 1


def test_a_report_name_is_reserved_before_it_is_written(tmp_path):
    """Two writers racing for the same second's name: O_EXCL gives each its own."""
    barrier = threading.Barrier(8)

    def reserve(_):
        barrier.wait()
        return csv_report.reserve_report_path(tmp_path)

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(reserve, range(8)))
    assert len(set(names)) == 8


# --------------------------------------------------------------------------------- reads of files being written

def test_a_file_still_being_written_in_place_reads_as_broken_not_as_valid(tmp_path):
    """Another tool (not ours) writing in place: a reader mid-way sees a clear error, never a short tensor."""
    full = write_bin(tmp_path / "full.bin", np.arange(1024, dtype=np.float32)).read_bytes()
    partial = tmp_path / "outtensor0.bin"
    for cut in (10, len(full) // 2, len(full) - 1):
        partial.write_bytes(full[:cut])
        with pytest.raises(FormatError):
            read_bin(partial)
