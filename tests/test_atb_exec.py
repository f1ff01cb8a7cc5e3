"""Running the user's ATB command: the dump environment, the probe library, and every way the command can fail."""
from __future__ import annotations

import os
import shlex
import stat
import sys
import time
from pathlib import Path

import pytest

from pytest_ait_llm.dump.atb_exec import ExecFailed, atb_dump_env, probe_library, run_atb_command
from pytest_ait_llm.errors import ExecError

PY = sys.executable

#: A one-op "ATB model" that dumps through AtbDumpWriter.from_env, as the real probe honours the env vars.
DUMPING_SCRIPT = '''
import sys
import numpy as np
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter

writer = AtbDumpWriter.from_env("OneOp")
writer.write_topology({"nodes": [{"opName": "LinearOperation_0", "opType": "LinearOperation", "param": {},
                                  "inTensors": ["OneOp_input_0", "OneOp_weight_0"], "outTensors": ["OneOp_output_0"]}]})
x = np.ones((2, 4), np.float32)
writer.save_tensors(0, "0_LinearOperation", [x, np.eye(4, dtype=np.float32)], [x])
print("dumped", writer.root, "argv", sys.argv[1:])
'''


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie has exited; only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, seconds: float = 30.0) -> bool:
    """Whether the process is gone (or a zombie) within ``seconds``: generous, it returns as soon as it is."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------------ environment

def test_dump_env_matches_llm_dump(tmp_path):
    base = {"PATH": "/usr/bin", "ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER": "0"}
    env = atb_dump_env(tmp_path / "out", token_range="0, 1", save_time=3, save_part=1, base_env=base, device_id=2)
    assert env["ATB_SAVE_TENSOR"] == "1"
    assert env["ATB_OUTPUT_DIR"] == f"{tmp_path / 'out'}/"
    assert env["ATB_SAVE_TENSOR_RANGE"] == "0,1"
    assert env["ATB_SAVE_TENSOR_TIME"] == "1" and env["ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER"] == "1"
    assert env["ATB_SAVE_TENSOR_PART"] == "1"
    assert env["ATB_SAVE_CHILD"] == "1" and env["ATB_SAVE_TILING"] == "0" and env["ATB_SAVE_CPU_PROFILING"] == "0"
    assert env["ATB_DUMP_TYPE"] == "tensor|model"
    assert env["ATB_DEVICE_ID"] == "2"
    assert env["PATH"] == "/usr/bin" and "LD_PRELOAD" not in env  # no toolkit here: nothing to preload
    assert base == {"PATH": "/usr/bin", "ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER": "0"}  # the caller's dict is untouched


def test_save_time_other_than_3_drops_an_inherited_in_before_out_after(tmp_path):
    env = atb_dump_env(tmp_path, save_time=2, base_env={"ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER": "1"})
    assert env["ATB_SAVE_TENSOR_TIME"] == "2" and "ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER" not in env


@pytest.mark.parametrize("kwargs, named", [
    ({"save_time": 4}, "save_time=4"),
    ({"save_part": 3}, "save_part=3"),
    ({"token_range": "0"}, "token range '0'"),
    ({"token_range": "3,1"}, "start > end"),
    ({"device_id": -1}, "device_id=-1"),
])
def test_dump_env_rejects_bad_settings(tmp_path, kwargs, named):
    with pytest.raises(ExecError, match=named):
        atb_dump_env(tmp_path, base_env={}, **kwargs)


@pytest.fixture
def toolkit(tmp_path):
    """A fake Ascend toolkit with both probe libraries, a libatb.so, and an ``nm`` whose output a test chooses."""
    probe_dir = tmp_path / "toolkit" / "tools" / "ait_backend" / "dump"
    probe_dir.mkdir(parents=True)
    for abi in (0, 1):
        (probe_dir / f"libatb_probe_abi{abi}.so").write_bytes(b"\x7fELF")
        os.chmod(probe_dir / f"libatb_probe_abi{abi}.so", 0o755)
    atb_home = tmp_path / "atb"
    (atb_home / "lib").mkdir(parents=True)
    (atb_home / "lib" / "libatb.so").write_bytes(b"\x7fELF")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def env(nm_output: str | None, **extra: str) -> dict[str, str]:
        if nm_output is not None:
            nm = bin_dir / "nm"
            nm.write_text(f"#!/bin/sh\ncat <<'EOF'\n{nm_output}\nEOF\n")
            nm.chmod(0o755)
        return {"ASCEND_TOOLKIT_HOME": str(tmp_path / "toolkit"), "ATB_HOME_PATH": str(atb_home),
                "PATH": str(bin_dir), **extra}

    env.probe_dir = probe_dir
    return env


def test_probe_abi1_when_libatb_exports_cxx11_probe_symbols(toolkit):
    env = atb_dump_env("out", base_env=toolkit("0000 T _ZN3atb5Probe8IsSaveB5cxx11Ev\n0000 T other"))
    assert env["LD_PRELOAD"] == str(toolkit.probe_dir / "libatb_probe_abi1.so")


def test_probe_abi0_when_the_probe_symbols_are_old_abi(toolkit):
    env = atb_dump_env("out", base_env=toolkit("0000 T _ZN3atb5Probe8IsSaveEv", LD_PRELOAD="/opt/libjemalloc.so"))
    assert env["LD_PRELOAD"] == f"{toolkit.probe_dir / 'libatb_probe_abi0.so'}:/opt/libjemalloc.so"


def test_probe_without_nm_takes_whichever_library_exists(toolkit):
    (toolkit.probe_dir / "libatb_probe_abi0.so").unlink()
    assert probe_library(toolkit(None)) == toolkit.probe_dir / "libatb_probe_abi1.so"


def test_probe_library_writable_by_others_is_refused(toolkit):
    lib = toolkit.probe_dir / "libatb_probe_abi0.so"
    lib.chmod(lib.stat().st_mode | stat.S_IWOTH)
    with pytest.raises(ExecError, match="libatb_probe_abi0.so: refusing to LD_PRELOAD"):
        atb_dump_env("out", base_env=toolkit("no probe symbols"))


# --------------------------------------------------------------------------------------------------- running

def test_runs_the_command_and_returns_the_dump_it_wrote(tmp_path):
    script = write_script(tmp_path, "port.py", DUMPING_SCRIPT)
    out = tmp_path / "run"
    dump = run_atb_command(f"{shlex.quote(PY)} {script} 'two words' '$HOME;echo'", output_dir=out,
                           env=atb_dump_env(out), timeout=60)
    assert dump.tokens == [0]
    assert dump.root.parent == out and dump.root.name.startswith("msit_dump_")
    assert [op.op_type for op in dump.ranks[0].topology().walk()] == ["LinearOperation"]
    log = (out / "ait_exec.log").read_text()
    assert "argv ['two words', '$HOME;echo']" in log  # split like a shell, never interpreted by one


def test_never_reuses_a_directory_that_holds_something(tmp_path):
    script = write_script(tmp_path, "port.py", DUMPING_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    first = run_atb_command([PY, script], output_dir=out, timeout=60)
    second = run_atb_command([PY, script], output_dir=out, timeout=60)
    assert (out / "keep.txt").read_text() == "earlier results" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert first.root.parent == tmp_path / "run-1" and second.root.parent == tmp_path / "run-2"


def test_command_not_found(tmp_path):
    with pytest.raises(ExecError, match="command not found: 'no-such-atb-runner'"):
        run_atb_command("no-such-atb-runner --model x", output_dir=tmp_path / "run", timeout=10)


def test_non_zero_exit_shows_the_last_lines_of_output(tmp_path):
    script = write_script(tmp_path, "crash.py", '''
import sys
for i in range(100):
    print(f"step {i}")
print("aclnnMatmul failed: 561103", file=sys.stderr)
sys.exit(7)
''')
    with pytest.raises(ExecFailed) as info:
        run_atb_command([PY, script], output_dir=tmp_path / "run", timeout=60)
    err = info.value
    assert "exited with status 7" in err.summary and "\n" not in err.summary
    message = str(err)
    assert "step 99" in message and "aclnnMatmul failed: 561103" in message
    assert "step 10\n" not in message  # only the tail, not 100 lines
    assert err.log_path == tmp_path / "run" / "ait_exec.log" and "step 0" in err.log_path.read_text()


def test_exit_zero_without_a_dump_is_a_failure(tmp_path):
    with pytest.raises(ExecFailed, match="exited 0 but wrote no ATB dump"):
        run_atb_command([PY, "-c", "print('forgot to set up the probe')"], output_dir=tmp_path / "run", timeout=60)


SPAWNING_SCRIPT = '''
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1], "w") as f:
    f.write(f"{child.pid}")
print("started worker", child.pid, flush=True)
if sys.argv[2] == "hang":
    time.sleep(60)
'''


def test_timeout_kills_the_whole_process_group(tmp_path):
    script = write_script(tmp_path, "hang.py", SPAWNING_SCRIPT)
    pid_file = tmp_path / "child.pid"
    with pytest.raises(ExecFailed, match=r"timed out after 2 s; its process group was killed") as info:
        run_atb_command([PY, script, pid_file, "hang"], output_dir=tmp_path / "run", timeout=2)
    assert "started worker" in str(info.value)
    assert wait_gone(int(pid_file.read_text())), "the command's child outlived the timeout"


def test_background_children_left_by_a_finished_command_are_stopped(tmp_path):
    script = write_script(tmp_path, "leaky.py", SPAWNING_SCRIPT + "\n" + DUMPING_SCRIPT)
    pid_file = tmp_path / "child.pid"
    run_atb_command([PY, script, pid_file, "exit"], output_dir=tmp_path / "run", timeout=60)
    assert wait_gone(int(pid_file.read_text()))


def test_while_it_runs_the_caller_is_told_the_elapsed_time_and_the_last_output_line(tmp_path):
    """What the plugin shows in pytest's terminal during an hours-long NPU run. The command waits until the
    caller has been told its first line (it then creates ``go``), so no timing is assumed."""
    go = tmp_path / "go"
    script = write_script(tmp_path, "slow.py", f"""import os, time
print('loading weights', flush=True)
for _ in range(6000):  # at most 60 s: a hang guard, not a timing assumption
    if os.path.exists({str(go)!r}):
        break
    time.sleep(0.01)
""" + DUMPING_SCRIPT)
    seen = []

    def on_wait(elapsed, line):
        seen.append((elapsed, line))
        if line == "loading weights":
            go.touch()

    run_atb_command([PY, script], output_dir=tmp_path / "run", timeout=120, wait_interval=0.05, on_wait=on_wait)
    assert go.exists()                                        # told the first line while it ran
    assert seen[-1][1].startswith("dumped ")                 # and the last one when it ended
    assert [t for t, _ in seen] == sorted(t for t, _ in seen)
