"""The pytest plugin as a porting team uses it: options, fixtures, the ait_tolerance marker, verdicts.

Each test writes a small project with ``pytester`` and runs pytest on it (in-process unless a subprocess is
needed). The project is a tiny PyTorch model (two LayerNorm+Linear blocks and a Linear head) and its "ATB port":
a numpy re-implementation that writes a genuine ATB-layout dump through ``AtbDumpWriter.from_env``, so it works
both as a pre-recorded dump and as an ``--ait-exec`` command honouring the ATB dump environment. The "bad" port
scales one op's output by 1.05: cosine similarity stays 1.0, only a magnitude-aware metric catches it.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# pytester's in-process runs forget every module first imported during the run; numpy, torch and matplotlib
# cannot be imported twice in one process. Load everything the plugin's engines need before any run.
import matplotlib.backends.backend_agg  # noqa: F401,E402
import matplotlib.figure  # noqa: F401,E402
import numpy  # noqa: F401,E402
import torch  # noqa: F401,E402

import pytest_ait_llm.api  # noqa: F401,E402
import pytest_ait_llm.dump.atb_exec  # noqa: F401,E402
import pytest_ait_llm.dump.atb_writer  # noqa: F401,E402
import pytest_ait_llm.dump.torch_hooks  # noqa: F401,E402
import pytest_ait_llm.report.html  # noqa: F401,E402
import pytest_ait_llm.report.plot  # noqa: F401,E402

pytest_plugins = ["pytester"]

TINY_NET_SRC = '''
"""The golden model: two LayerNorm+Linear blocks and a Linear head, with seeded weights."""
import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(self.norm(x))


class TinyNet(nn.Module):
    def __init__(self, width=16, n_layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(n_layers))
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model, torch.randn((1, 4, 16), generator=generator)


def save_npz(path, seed=0):
    model, x = build(seed)
    np.savez(path, input=x.numpy(), **{k: v.numpy() for k, v in model.state_dict().items()})
'''

PORT_SRC = '''
"""The "ATB port" of TinyNet, in numpy: runs the model and writes an ATB-layout dump as the ATB probe would.

usage: python tiny_port.py DATA.npz [PERTURBED_MODULE]
"""
import os
import sys

import numpy as np

from pytest_ait_llm.dump.atb_writer import AtbDumpWriter

N_LAYERS = 2


def _leaf(name, op_type, x, i, out):
    return {"opName": name, "opType": op_type, "param": {},
            "inTensors": [x, f"TinyNet_weight_{i}", f"TinyNet_weight_{i + 1}"], "outTensors": [out]}


def topology():
    nodes, x = [], "TinyNet_input_0"
    for layer in range(N_LAYERS):
        normed, out = f"TinyLayer_{layer}_internal_0", f"TinyNet_internal_{layer}"
        children = [_leaf(f"LayerNormOperation_{layer}_0", "LayerNormOperation", x, 4 * layer, normed),
                    _leaf(f"LinearOperation_{layer}_1", "LinearOperation", normed, 4 * layer + 2, out)]
        nodes.append({"opName": f"TinyLayer_{layer}", "opType": "TinyLayer", "param": "",
                      "inTensors": [x] + [f"TinyNet_weight_{4 * layer + k}" for k in range(4)],
                      "outTensors": [out], "internalTensors": [normed], "nodes": children})
        x = out
    nodes.append(_leaf(f"LinearOperation_{N_LAYERS}", "LinearOperation", x, 4 * N_LAYERS, "TinyNet_output_0"))
    return {"modelName": "TinyNet", "nodes": nodes}


def layer_norm(h, w, b):
    mu = h.mean(-1, keepdims=True)
    var = h.var(-1, keepdims=True)
    return ((h - mu) / np.sqrt(var + 1e-5) * w + b).astype(np.float32)


def run(weights, x, perturb=None, env=None):
    writer = AtbDumpWriter.from_env("TinyNet", env=env)
    if writer is None:
        raise SystemExit("ATB_SAVE_TENSOR is not set: nothing to dump")
    writer.write_topology(topology())

    def op(rel_dir, module, inputs, out):
        if module == perturb:
            out = (out * np.float32(1.05)).astype(np.float32)
        writer.save_tensors(0, rel_dir, inputs, [out])
        return out

    h = x
    for layer in range(N_LAYERS):
        p = f"layers.{layer}"
        w1, b1, w2, b2 = (weights[f"{p}.{k}"] for k in ("norm.weight", "norm.bias", "fc.weight", "fc.bias"))
        normed = op(f"{layer}_TinyLayer/0_LayerNormOperation", f"{p}.norm", [h, w1, b1], layer_norm(h, w1, b1))
        out = op(f"{layer}_TinyLayer/1_LinearOperation", f"{p}.fc", [normed, w2, b2],
                 (normed @ w2.T + b2).astype(np.float32))
        writer.save_tensors(0, f"{layer}_TinyLayer", [h, w1, b1, w2, b2], [out])
        h = out
    w, b = weights["head.weight"], weights["head.bias"]
    op(f"{N_LAYERS}_LinearOperation", "head", [h, w, b], (h @ w.T + b).astype(np.float32))
    return writer.root


if __name__ == "__main__":
    data = np.load(sys.argv[1])
    perturb = sys.argv[2] if len(sys.argv) > 2 else None
    with open("port_runs.log", "a") as log:
        log.write(f"{os.getpid()} {perturb}\\n")
    print(f"tiny port: dumping into {os.environ.get('ATB_OUTPUT_DIR')} (perturbed: {perturb})")
    root = run({k: data[k] for k in data.files if k != "input"}, data["input"], perturb)
    print(f"tiny port: wrote {root}")
'''

#: The pytest-side golden: run by torch_dump under the dump hooks.
CONFTEST_GOLDEN = '''
import pytest

@pytest.fixture(scope="session")
def ait_golden_model():
    from tiny_net import build
    return build()  # (model, input): one forward call = token 0
'''

INJECTED_OP = "0_TinyLayer/1_LinearOperation"
INJECTED_MODULE = "root.layers.0.fc"


def load_source(path: Path, name: str):
    """Import a generated source file under a private module name (not cached in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Recorded:
    """Pre-recorded dumps, as a CI job without an NPU would keep them."""

    src: Path  # tiny_net.py, tiny_port.py, data.npz
    golden: Path  # torch dump {PID}_cpu dir
    good: Path  # ATB dump root of the healthy port
    bad: Path  # ATB dump root of the port with layers.0.fc scaled by 1.05


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    import numpy as np
    import torch

    from pytest_ait_llm.dump.atb_exec import atb_dump_env
    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook

    root = tmp_path_factory.mktemp("recorded")
    (root / "tiny_net.py").write_text(TINY_NET_SRC)
    (root / "tiny_port.py").write_text(PORT_SRC)
    tiny_net = load_source(root / "tiny_net.py", "_ait_test_tiny_net")
    tiny_port = load_source(root / "tiny_port.py", "_ait_test_tiny_port")
    tiny_net.save_npz(root / "data.npz")
    model, x = tiny_net.build()
    with register_hook(model, DumpConfig(dump_path=root / "golden")) as handle, torch.no_grad():
        model(x)
    data = np.load(root / "data.npz")
    weights = {k: data[k] for k in data.files if k != "input"}
    good = tiny_port.run(weights, data["input"], env=atb_dump_env(root / "good", base_env={}))
    bad = tiny_port.run(weights, data["input"], perturb="layers.0.fc", env=atb_dump_env(root / "bad", base_env={}))
    return Recorded(root, handle.dump_dir, Path(good), Path(bad))


def make_project(pytester: pytest.Pytester, recorded: Recorded, test_src: str, *, golden_model: bool = False) -> Path:
    """A porting project: the golden model, the port script with its weights, and the test file."""
    for name in ("tiny_net.py", "tiny_port.py", "data.npz"):
        (pytester.path / name).write_bytes((recorded.src / name).read_bytes())
    if golden_model:
        pytester.makeconftest(CONFTEST_GOLDEN)
    return pytester.makepyfile(test_port=test_src)


def recorded_args(recorded: Recorded, my: Path | None = None) -> list[str]:
    return [f"--ait-golden-path={recorded.golden}", f"--ait-my-path={my or recorded.good}"]


#: A hung port must not hold the suite for the default hour.
EXEC_TIMEOUT = "--ait-exec-timeout=120"


def port_command(*extra: str) -> str:
    return shlex.join([sys.executable, "tiny_port.py", "data.npz", *extra])


PORT_TEST = '''
import pytest

@pytest.mark.ait_tolerance(cos=0.999)
def test_port(torch_dump, atb_dump, compare_ops):
    result = compare_ops(torch_dump, atb_dump)
    assert len(result.compared) == 7
'''


def failure_lines(output: str) -> list[str]:
    return [line[1:].strip() for line in output.splitlines() if line.startswith("E ")]


# ------------------------------------------------------------------------------------------- pass / fail verdicts

def test_healthy_port_passes_with_prerecorded_dumps(pytester, recorded):
    make_project(pytester, recorded, PORT_TEST)
    result = pytester.runpytest("--strict-markers", *recorded_args(recorded))
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    csv = re.search(r"OK\s+test_port.py::test_port: (\S+\.csv)", out)
    assert csv, out
    assert Path(csv.group(1)).is_file()
    assert Path(csv.group(1)).read_text().startswith("token_id,data_id,golden_data_path")


def test_broken_port_fails_naming_the_injected_op_first(pytester, recorded):
    make_project(pytester, recorded, PORT_TEST)
    result = pytester.runpytest(*recorded_args(recorded, recorded.bad))
    result.assert_outcomes(failed=1)
    lines = failure_lines(result.stdout.str())
    assert lines[0].startswith("AssertionError: first divergent op: " + INJECTED_OP), lines
    assert INJECTED_MODULE in lines[0]
    assert any(re.match(r"relative_euclidean_distance 0\.0(?:5|49)\d* > 1e-05", line) for line in lines), lines
    assert any("propagated" in line for line in lines)
    # the test's own line is shown, not the plugin's internals
    assert "plugin.py" not in result.stdout.str()


def test_compare_ops_accepts_plain_paths_and_returns_the_result(pytester, recorded):
    token_dir = next((recorded.good / "tensors").iterdir()) / "0"
    make_project(pytester, recorded, f'''
def test_paths(compare_ops):
    result = compare_ops({str(recorded.golden / "0")!r}, {str(token_dir)!r})
    assert result.passed and result.tokens == [0]
    assert {{r.torch_module for r in result.compared}} >= {{"root.layers.0.fc", "root.head"}}
''')
    pytester.runpytest().assert_outcomes(passed=1)


def test_golden_model_fixture_is_run_under_the_hooks_once(pytester, recorded):
    make_project(pytester, recorded, '''
import pytest

calls = []

@pytest.fixture(scope="session", autouse=True)
def count_golden_runs(ait_golden_model):
    model = ait_golden_model[0]
    model.register_forward_pre_hook(lambda *a: calls.append(1))

def test_first(torch_dump, atb_dump, compare_ops):
    assert torch_dump.tokens == [0]
    assert torch_dump.tree.find("root.layers.1.norm") is not None
    compare_ops(torch_dump, atb_dump)

def test_second(torch_dump):
    assert len(calls) == 1
''', golden_model=True)
    pytester.runpytest(f"--ait-my-path={recorded.good}").assert_outcomes(passed=2)


def test_tolerance_overrides_at_the_call_site(pytester, recorded):
    make_project(pytester, recorded, '''
def test_loose(torch_dump, atb_dump, compare_ops):
    result = compare_ops(torch_dump, atb_dump, red=0.5)
    assert result.passed and not result.breaches
''')
    pytester.runpytest(*recorded_args(recorded, recorded.bad)).assert_outcomes(passed=1)


# --------------------------------------------------------------------------------------------------------- marker

def test_nearest_ait_tolerance_marker_wins(pytester, recorded):
    """module (strict) < class (loose) < function (strict again); the bad port's error is RED 0.05."""
    make_project(pytester, recorded, '''
import pytest

pytestmark = pytest.mark.ait_tolerance(red=1e-3)

def test_module_marker(torch_dump, atb_dump, compare_ops):
    compare_ops(torch_dump, atb_dump)

@pytest.mark.ait_tolerance(red=0.5)
def test_function_beats_module(torch_dump, atb_dump, compare_ops):
    compare_ops(torch_dump, atb_dump)

@pytest.mark.ait_tolerance(red=0.5)
class TestLoose:
    def test_class_beats_module(self, torch_dump, atb_dump, compare_ops):
        compare_ops(torch_dump, atb_dump)

    @pytest.mark.ait_tolerance(red=1e-3)
    def test_function_beats_class(self, torch_dump, atb_dump, compare_ops):
        compare_ops(torch_dump, atb_dump)
''')
    result = pytester.runpytest("--strict-markers", "-rA", *recorded_args(recorded, recorded.bad))
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    for nodeid in ("test_port.py::test_function_beats_module", "test_port.py::TestLoose::test_class_beats_module"):
        assert f"PASSED {nodeid}" in out
    for nodeid in ("test_port.py::test_module_marker", "test_port.py::TestLoose::test_function_beats_class"):
        assert f"FAILED {nodeid}" in out
    assert re.search(r"relative_euclidean_distance 0\.0(?:5|49)\d* > 0\.001", out)


@pytest.mark.parametrize("marker, named", [
    ('cos="high"', "cos"),
    ("coss=0.999", "coss"),
    ('ops={"LinearOperation": {"cos": "x"}}', "cos"),
])
def test_bad_marker_argument_fails_with_one_line_naming_it(pytester, marker, named):
    """Checked before the dumps are made: no option is given here, yet the marker error is what is reported."""
    pytester.makepyfile(f'''
import pytest

@pytest.mark.ait_tolerance({marker})
def test_port(torch_dump, atb_dump, compare_ops):
    compare_ops(torch_dump, atb_dump)
''')
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    line = next(line for line in out.splitlines() if "@pytest.mark.ait_tolerance on test_" in line)
    assert named in line.split(":", 2)[-1]
    assert "Traceback" not in out and "tolerance.py" not in out and "During handling" not in out


def test_marker_is_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.ait_tolerance(*nearest marker*"])


# ------------------------------------------------------------------------------------------------ skips, options

def test_without_dumps_the_tests_are_skipped_saying_what_to_pass(pytester):
    pytester.makepyfile('''
def test_golden(torch_dump):
    pass

def test_mine(atb_dump):
    pass
''')
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    out = result.stdout.str()
    assert re.search(r"SKIPPED .*torch_dump needs the golden side: pass --ait-golden-path DIR .* ait_golden_model", out)
    assert re.search(r"SKIPPED .*atb_dump needs the ATB side: pass --ait-exec CMD .* --ait-my-path DIR", out)


@pytest.mark.parametrize("args, named", [
    (["--ait-save-time=7"], "argument --ait-save-time: invalid choice: 7"),
    (["--ait-save-part=x"], "argument --ait-save-part: invalid int value: 'x'"),
    (["--ait-token-range=3-1"], "--ait-token-range='3-1': range 3-1 runs backwards"),
    (["--ait-token-range=0..2"], "--ait-token-range='0..2': expected token ids and inclusive ranges"),
    (["--ait-exec-timeout=-5"], "--ait-exec-timeout=-5: expected a positive number"),
    (["--ait-exec=python 'unclosed"], "--ait-exec="),
    (["--ait-my-path=no/such/dump"], "--ait-my-path='no/such/dump'"),
    (["--ait-exce=run.sh"], "--ait-exce"),
])
def test_bad_option_value_is_a_usage_error_naming_the_option(pytester, args, named):
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert named in result.stderr.str()


def test_bad_ini_value_is_a_usage_error_naming_the_key(pytester):
    pytester.makeini("[pytest]\nait_save_part = 5\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key ait_save_part=5: expected one of 0, 1, 2" in result.stderr.str()


def test_ini_keys_provide_the_dumps(pytester, recorded):
    make_project(pytester, recorded, PORT_TEST)
    pytester.makeini(f"[pytest]\nait_golden_path = {recorded.golden}\nait_my_path = {recorded.good}\n")
    pytester.runpytest().assert_outcomes(passed=1)


def test_help_lists_the_options(pytester):
    result = pytester.runpytest("--help")
    for flag in ("--ait-exec=CMD", "--op-mapping-file=DIR", "--ait-golden-path=DIR", "--ait-my-path=DIR",
                 "--ait-output=DIR", "--ait-token-range=TOKENS", "--ait-save-time=", "--ait-save-part=",
                 "--ait-exec-timeout=SECONDS"):
        assert flag in result.stdout.str()


def test_ait_output_holds_a_fresh_session_dir_per_run(pytester, recorded, tmp_path):
    make_project(pytester, recorded, PORT_TEST)
    out = tmp_path / "ait-out"
    for _ in range(2):
        pytester.runpytest(f"--ait-output={out}", *recorded_args(recorded)).assert_outcomes(passed=1)
    sessions = sorted(out.iterdir())
    assert len(sessions) == 2 and all(p.name.startswith("session-") and "-main-" in p.name for p in sessions)
    assert all(len(list(p.glob("compare/*/ait_cmp_report_*.csv"))) == 1 for p in sessions)


# ------------------------------------------------------------------------------------------------------ --ait-exec

def test_ait_exec_runs_the_port_once_with_the_dump_env(pytester, recorded):
    make_project(pytester, recorded, '''
import os

def test_first(torch_dump, atb_dump, compare_ops):
    assert atb_dump.root.name.startswith("msit_dump_")  # save time 3 = inputs before, outputs after (msit)
    compare_ops(torch_dump, atb_dump)

def test_second(atb_dump):
    assert (atb_dump.root.parent / "ait_exec.log").read_text().startswith("tiny port: dumping into")
''')
    result = pytester.runpytest(f"--ait-golden-path={recorded.golden}", f"--ait-exec={port_command()}", EXEC_TIMEOUT)
    result.assert_outcomes(passed=2)
    assert len((pytester.path / "port_runs.log").read_text().splitlines()) == 1


def test_ait_exec_run_compares_a_variant_command(pytester, recorded):
    make_project(pytester, recorded, f'''
def test_variant(torch_dump, ait_exec_run, compare_ops):
    broken = ait_exec_run({port_command("layers.0.fc")!r}, env={{"PORT_VARIANT": "scaled"}})
    compare_ops(torch_dump, broken)
''')
    result = pytester.runpytest(f"--ait-golden-path={recorded.golden}", EXEC_TIMEOUT)
    result.assert_outcomes(failed=1)
    assert failure_lines(result.stdout.str())[0].startswith("AssertionError: first divergent op: " + INJECTED_OP)


def test_failing_ait_exec_shows_its_output_without_a_traceback(pytester, recorded):
    make_project(pytester, recorded, '''
def test_a(atb_dump):
    pass

def test_b(atb_dump):
    pass
''')
    script = pytester.makepyfile(crash='''
import sys
with open("crash_runs.log", "a") as f:
    f.write("run\\n")
print("loading weights from /models/llama")
print("RuntimeError: aclnnMatmul failed with 561103", file=sys.stderr)
sys.exit(3)
''')
    result = pytester.runpytest(f"--ait-exec={shlex.join([sys.executable, str(script)])}", EXEC_TIMEOUT)
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "exited with status 3" in out
    assert "RuntimeError: aclnnMatmul failed with 561103" in out and "loading weights from /models/llama" in out
    assert "Traceback" not in out and "During handling" not in out
    assert (pytester.path / "crash_runs.log").read_text() == "run\n"  # the failure is cached, not re-run


def test_dump_knobs_reach_both_sides(pytester, recorded):
    """--ait-save-time=1 (after only: the ait layout) and --ait-save-part=1 (outputs only) on the ATB command
    and on the golden hooks alike."""
    make_project(pytester, recorded, '''
def test_outputs_only(torch_dump, atb_dump, compare_ops):
    assert atb_dump.root.name == "ait_dump"
    files = sorted(p.relative_to(atb_dump.root).parts[-2:] for p in atb_dump.root.rglob("*.bin"))
    assert files and {sub for sub, _ in files} == {"after"} and all(f.startswith("outtensor") for _, f in files)
    golden = [p.name for p in torch_dump.root.rglob("*.pth")]
    assert golden and not [name for name in golden if name.startswith("input")]
    compare_ops(torch_dump, atb_dump)
''', golden_model=True)
    result = pytester.runpytest(f"--ait-exec={port_command()}", "--ait-save-time=1", "--ait-save-part=1", EXEC_TIMEOUT)
    result.assert_outcomes(passed=1)


def test_golden_model_of_the_wrong_shape_is_a_one_line_failure(pytester):
    pytester.makeconftest('''
import pytest

@pytest.fixture(scope="session")
def ait_golden_model():
    return {"model": None}
''')
    pytester.makepyfile("def test_golden(torch_dump): pass")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["ait_golden_model: returned dict; expected (model, input_ids), *"])
    assert "Traceback" not in result.stdout.str()


GOLDEN_CALLABLE_TWO_TOKENS = '''
import pytest, torch
from pytest_ait_llm.dump.torch_hooks import register_hook

@pytest.fixture(scope="session")
def ait_golden_model():
    from tiny_net import build

    def run(dump_config):
        model, x = build()
        with register_hook(model, dump_config) as handle, torch.no_grad():
            model(x)       # token 0
            model(x * 2)   # token 1
        return handle

    return run
'''


def test_golden_model_may_be_a_callable_that_runs_the_model_itself(pytester, recorded):
    make_project(pytester, recorded, GOLDEN_CALLABLE_TWO_TOKENS + '''
def test_port(torch_dump, atb_dump, compare_ops):
    assert torch_dump.tokens == [0]
    compare_ops(torch_dump, atb_dump)
''')
    pytester.runpytest(f"--ait-my-path={recorded.good}", "--ait-token-range=0").assert_outcomes(passed=1)

def test_a_damaged_bin_fails_the_test_naming_the_op_and_the_file(pytester, recorded, tmp_path):
    """A .bin whose dims numpy cannot hold (issue 18.5): the failure names the op and the file, no numpy frames."""
    import shutil

    damaged = shutil.copytree(recorded.good, tmp_path / "damaged")
    target = next(p for p in damaged.rglob("outtensor0.bin") if INJECTED_OP in p.as_posix())
    target.write_bytes(b"$Version=1.0\n$Object.Count=1\nformat=2\ndtype=0\n"
                       b"dims=0,4611686018427387904,4611686018427387904\n$End=1\n")
    make_project(pytester, recorded, PORT_TEST)
    result = pytester.runpytest(*recorded_args(recorded, damaged))
    result.assert_outcomes(failed=1)
    errors = "\n".join(failure_lines(result.stdout.str()))
    assert INJECTED_OP in errors and str(target) in errors, errors
    assert "numpy" not in result.stdout.str() and "Traceback" not in result.stdout.str()



def test_by_default_every_golden_token_is_dumped_and_a_token_the_port_lacks_is_named(pytester, recorded):
    """The recorded port dumped token 0 only; the golden run makes two: token 1 is reported as not compared."""
    make_project(pytester, recorded, GOLDEN_CALLABLE_TWO_TOKENS + '''
def test_port(torch_dump, atb_dump, compare_ops):
    assert torch_dump.tokens == [0, 1]
    compare_ops(torch_dump, atb_dump)
''')
    result = pytester.runpytest(f"--ait-my-path={recorded.good}")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*ait-llm: test_port.py::test_port: token 1 not compared: token 1 dumped only on "
                                 "the torch side*"])


# ----------------------------------------------------------------------------------- nothing passes silently

def test_a_misspelt_ini_key_is_a_usage_error_not_a_test_without_the_mapping(pytester, recorded):
    """The key docs/guide.md once named: pytest alone would only warn, and the test would pass unmapped."""
    make_project(pytester, recorded, PORT_TEST)
    pytester.makeini(f"[pytest]\nait_op_mapping_file = {pytester.path}\n")
    result = pytester.runpytest(*recorded_args(recorded))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str().strip()
    assert len(err.splitlines()) == 1
    assert "unknown pytest-ait-llm ini key 'ait_op_mapping_file'; did you mean op_mapping_file?" in err


def test_an_unknown_ait_override_is_a_usage_error(pytester):
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-o", "ait_token_rnage=0-1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown pytest-ait-llm ini key 'ait_token_rnage'; did you mean ait_token_range?" in result.stderr.str()


def test_an_unknown_ait_option_is_a_usage_error(pytester):
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--ait-token=0")  # no prefix matching: --ait-token is not --ait-token-range
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unrecognized arguments: --ait-token=0" in result.stderr.str()


def test_ini_values_are_typed_by_pytest(pytester):
    pytester.makeini("[pytest]\nait_exec_timeout = soon\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key ait_exec_timeout:" in result.stderr.str() and "soon" in result.stderr.str()


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_ait_output_that_cannot_be_written_is_a_usage_error(pytester, tmp_path, where):
    import os

    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    else:  # root writes through file modes: /proc refuses even root a new directory
        out = Path("/proc/ait-llm-out")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(f"--ait-output={out}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str().strip()
    assert err.startswith(f"ERROR: --ait-output='{out}': cannot create the directory {out}: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_report_header_names_the_comparison_pass(pytester, recorded):
    make_project(pytester, recorded, PORT_TEST)
    result = pytester.runpytest(*recorded_args(recorded))
    result.stdout.re_match_lines([r"ait-llm: comparison pass: (compiled \(\w+\)|numpy \(.+\))$"])
    plain = pytester.runpytest("-k", "nothing")  # a suite that does not use the plugin pays no import for it
    assert "comparison pass" not in plain.stdout.str()


def test_compare_progress_and_ait_exec_status_reach_the_terminal(pytester, recorded):
    make_project(pytester, recorded, PORT_TEST)
    result = pytester.runpytest(f"--ait-golden-path={recorded.golden}", f"--ait-exec={port_command()}",
                                EXEC_TIMEOUT)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ait-llm --ait-exec: finished after * s | last output: tiny port: wrote *"])
    assert f"ait-llm compare: [{'#' * 30}] 7/7 tensor pairs" in result.stdout.lines
