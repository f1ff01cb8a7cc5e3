"""`ait-llm` as a user types it in a shell: exit codes, one-line errors on stderr, what lands on disk."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm import __version__

PY = sys.executable


def ait_llm(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pytest_ait_llm", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """A two-token golden dump of a 2-layer Llama and its healthy bf16 ATB-layout mirror."""
    golden = golden_llama_dump(tmp_path_factory.mktemp("golden"), num_layers=2)
    my_root, _ = write_mirror(golden, tmp_path_factory.mktemp("my"), num_layers=2)
    return golden.root, my_root


def test_version():
    proc = ait_llm("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"ait-llm {__version__}"


@pytest.mark.parametrize("tokens", ["0,1", "0-1", "all"])
def test_tokens_as_a_list_or_a_range_compare_both_tokens(dumps, tmp_path, tokens):
    proc = ait_llm("compare", "-gp", dumps[0], "-mp", dumps[1], "-o", tmp_path, "--tokens", tokens)
    assert proc.returncode == 0, proc.stderr
    assert "over 2 token(s)" in proc.stdout


def test_one_token(dumps, tmp_path):
    proc = ait_llm("compare", "-gp", dumps[0], "-mp", dumps[1], "-o", tmp_path, "--tokens", "1")
    assert proc.returncode == 0, proc.stderr
    assert "over 1 token(s)" in proc.stdout


def test_a_token_not_in_the_dump_is_exit_2_naming_it(dumps, tmp_path):
    err = one_line_error(ait_llm("compare", "-gp", dumps[0], "-mp", dumps[1], "-o", tmp_path, "--tokens", "5"))
    assert "--tokens 5: token(s) 5 not in the golden dump" in err and "(it holds 0-1)" in err
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("tokens", ["0..1", "1-0", "x", ""])
def test_malformed_tokens_are_exit_2(tmp_path, tokens):
    err = one_line_error(ait_llm("compare", "-gp", tmp_path, "-mp", tmp_path, "--tokens", tokens))
    assert "--tokens" in err and "expected token ids and inclusive ranges" in err


def test_the_comparison_pass_in_use_is_said_once(dumps, tmp_path):
    proc = ait_llm("compare", "-gp", dumps[0], "-mp", dumps[1], "-o", tmp_path, env={"AIT_LLM_KERNEL": "numpy"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("comparison pass:") == 1
    assert "comparison pass: numpy (AIT_LLM_KERNEL=numpy)" in proc.stderr


# ---------------------------------------------------------------------------------------------------- ait-llm dump

#: A stand-in for an ATB inference command: prints its dump environment, then dumps one op as ATB would.
FAKE_PORT = textwrap.dedent('''
    import os, sys
    import numpy as np
    from pytest_ait_llm.dump.atb_writer import AtbDumpWriter

    print("range", os.environ["ATB_SAVE_TENSOR_RANGE"], flush=True)
    if len(sys.argv) > 1 and sys.argv[1] == "fail":
        sys.exit(3)
    writer = AtbDumpWriter.from_env("Fake")
    writer.write_topology({"nodes": [{"opName": "Linear_0", "opType": "LinearOperation",
                                      "inTensors": ["Fake_input_0"], "outTensors": ["Fake_output_0"]}]})
    for token in range(3):
        writer.save_tensors(token, "0_LinearOperation", [np.ones(4, np.float32)], [np.ones(4, np.float32)])
''')


def token_dirs(root: Path) -> list[str]:
    (rank_dir,) = (root / "tensors").iterdir()
    return sorted(p.name for p in rank_dir.iterdir())


@pytest.fixture
def fake_port(tmp_path) -> str:
    script = tmp_path / "fake_port.py"
    script.write_text(FAKE_PORT)
    return f"{PY} {script}"


def test_dump_writes_into_the_output_dir_itself_even_when_it_holds_files(tmp_path, fake_port):
    out = tmp_path / "dumps"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = ait_llm("dump", "--exec", fake_port, "-o", out, "-er", "0-1")
    assert proc.returncode == 0, proc.stderr
    root = Path(proc.stdout.strip())
    assert root.parent == out and root.name.startswith("msit_dump_")  # -time 3 (default) is msit's layout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps", "fake_port.py"]  # no dumps-1
    assert token_dirs(root) == ["0", "1"]
    assert "range 0,1" in (out / "ait_exec.log").read_text()


def test_dump_token_list_becomes_atb_pairs(tmp_path, fake_port):
    proc = ait_llm("dump", "--exec", fake_port, "-o", tmp_path / "d", "-er", "0,2", "-time", "1")
    assert proc.returncode == 0, proc.stderr
    assert "range 0,0,2,2" in (tmp_path / "d" / "ait_exec.log").read_text()
    assert token_dirs(Path(proc.stdout.strip())) == ["0", "2"]


def test_dump_into_a_dir_that_holds_a_dump_is_refused(tmp_path, fake_port):
    assert ait_llm("dump", "--exec", fake_port, "-o", tmp_path / "d").returncode == 0
    err = one_line_error(ait_llm("dump", "--exec", fake_port, "-o", tmp_path / "d"))
    assert f"--exec {tmp_path / 'd'}: already holds a dump (msit_dump_" in err


def test_dump_errors_name_the_dump_option_not_the_plugins(tmp_path, fake_port):
    proc = ait_llm("dump", "--exec", f"{fake_port} fail", "-o", tmp_path / "d")
    assert proc.returncode == 2
    assert proc.stderr.startswith("ait-llm: error: --exec ") and "exited with status 3" in proc.stderr
    assert "--ait-exec" not in proc.stderr
    err = one_line_error(ait_llm("dump", "--exec", "no-such-runner x", "-o", tmp_path / "e"))
    assert "--exec no-such-runner x: command not found" in err and "--ait-exec" not in err
