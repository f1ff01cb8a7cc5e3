"""Regression baselines on the example's Llama port, as a porting team uses them.

The dumps: the float32 golden Llama of examples/llama_port, its healthy bf16 port, and two variants that pass
every tolerance: layer 6's input RmsNorm scaled by 1 + 2^-10 before its bf16 rounding (below bf16's rounding: must
pass the baseline) and by 1.005 (a 0.5 % scale error: must fail it, naming that op first).
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import re
import sys
from pathlib import Path

import pytest
import torch

import llama_example
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.cli import main
from pytest_ait_llm.compare.regression import (BaselineError, Margin, RegressionRules, check_regression,
                                               compare_metric, quantize)
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
from pytest_ait_llm.report import baseline as baseline_file
from pytest_ait_llm.report.csv_report import AIT_COLUMNS

import matplotlib.backends.backend_agg  # noqa: F401,E402
import matplotlib.figure  # noqa: F401,E402
import pytest_ait_llm.baseline_plugin  # noqa: F401,E402 - pytester's in-process runs must not import these anew
import pytest_ait_llm.report.html  # noqa: F401,E402
import pytest_ait_llm.report.plot  # noqa: F401,E402

pytest_plugins = ["pytester"]

EXAMPLE = llama_example.EXAMPLE
CHANGED_OP = "7_LlamaLayer/0_RmsNormOperation"
CHANGED_MODULE = "root.model.layers.6.input_layernorm"


golden_module, port = llama_example.golden, llama_example.port


def _port_dump(out: Path, bug: str | None) -> Path:
    writer = AtbDumpWriter(out, model_name=port.MODEL_NAME, token_range=[(0, 1)])
    p, input_ids, max_new = port.build_port(bug=bug, recorder=writer)
    writer.write_topology(p.topology)
    p.generate(input_ids, max_new)
    return writer.root


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, Path]:
    """golden, healthy, subrounding and half_percent dump roots (each written once per module)."""
    model, input_ids = golden_module.build_golden()
    out = tmp_path_factory.mktemp("golden")
    with register_hook(model, DumpConfig(dump_path=out, token_range=[0, 1])) as handle, torch.no_grad():
        model.generate(input_ids, **golden_module.GENERATE_KWARGS)
    return {"golden": handle.dump_dir,
            "healthy": _port_dump(tmp_path_factory.mktemp("healthy"), None),
            "subrounding": _port_dump(tmp_path_factory.mktemp("subrounding"), "rmsnorm_scale_subrounding"),
            "half_percent": _port_dump(tmp_path_factory.mktemp("half_percent"), "rmsnorm_scale_0.5pct")}


def ait_llm(dumps, my: str, out: Path, *extra: str, capsys) -> tuple[int, str, str]:
    code = main(["compare", "-gp", str(dumps["golden"]), "-mp", str(dumps[my]), "--op-mapping-file", str(EXAMPLE),
                 "-o", str(out), "-j", "1", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def accepted(dumps, tmp_path_factory) -> Path:
    """The healthy port's baseline, as ``--update-baseline`` writes it."""
    path = tmp_path_factory.mktemp("accepted") / "llama_port.json"
    assert main(["compare", "-gp", str(dumps["golden"]), "-mp", str(dumps["healthy"]), "--op-mapping-file",
                 str(EXAMPLE), "-o", str(path.parent), "--baseline", str(path), "--update-baseline"]) == 0
    return path


# ------------------------------------------------------------------------------------------------- the rule, CLI

def test_first_run_writes_the_baseline_and_fails_naming_it(dumps, tmp_path, capsys):
    path = tmp_path / "baselines" / "port.json"
    code, out, _ = ait_llm(dumps, "healthy", tmp_path, "--baseline", str(path), "--fail-on-breach", capsys=capsys)
    assert code == 1
    assert f"no baseline yet: wrote {path}" in out and "--update-baseline" in out
    assert path.is_file()
    code, out, _ = ait_llm(dumps, "healthy", tmp_path, "--baseline", str(path), "--fail-on-breach", capsys=capsys)
    assert code == 0, out
    assert "no regression against the baseline" in out


def test_a_run_that_breaches_its_tolerance_is_never_written_as_the_baseline(dumps, tmp_path, capsys):
    path = tmp_path / "port.json"
    code, out, _ = ait_llm(dumps, "healthy", tmp_path, "-t", "red=0.001", "--baseline", str(path),
                           "--update-baseline", "--fail-on-breach", capsys=capsys)
    assert code == 1
    assert f"baseline {path} not written: this run breaches its tolerance" in out
    assert not path.exists()


def test_rerun_of_the_accepted_dumps_passes_and_rewrites_the_same_bytes(dumps, accepted, tmp_path, capsys):
    code, out, _ = ait_llm(dumps, "healthy", tmp_path, "--baseline", str(accepted), "--fail-on-breach",
                           capsys=capsys)
    assert code == 0, out
    assert "first regression" not in out
    again = tmp_path / "again.json"
    ait_llm(dumps, "healthy", tmp_path, "--baseline", str(again), "--update-baseline", capsys=capsys)
    assert again.read_bytes() == accepted.read_bytes()  # deterministic: a PR diff shows only what moved


def test_change_below_bf16_rounding_passes(dumps, accepted, tmp_path, capsys):
    code, out, _ = ait_llm(dumps, "subrounding", tmp_path, "--baseline", str(accepted), "--fail-on-breach",
                           capsys=capsys)
    assert code == 0, out
    assert "no regression against the baseline" in out


def test_half_percent_scale_passes_every_tolerance_but_fails_the_baseline_naming_that_op_first(
        dumps, accepted, tmp_path, capsys):
    code, out, _ = ait_llm(dumps, "half_percent", tmp_path, "--fail-on-breach", capsys=capsys)
    assert code == 0 and "breaches: 0" in out  # inside every tolerance

    code, out, _ = ait_llm(dumps, "half_percent", tmp_path, "--baseline", str(accepted), "--fail-on-breach",
                           capsys=capsys)
    assert code == 1
    first = next(line for line in out.splitlines() if line.startswith("first regression:"))
    assert first.startswith(f"first regression: {CHANGED_OP} <-> {CHANGED_MODULE} (token 0): "
                            "relative_euclidean_distance (added)"), out
    assert "marked as following it" in out
    assert "--update-baseline" in out


def test_csv_carries_baseline_delta_and_regressed_after_the_existing_columns(dumps, accepted, tmp_path, capsys):
    code, out, _ = ait_llm(dumps, "half_percent", tmp_path, "--baseline", str(accepted), capsys=capsys)
    assert code == 0  # without --fail-on-breach a regression is reported, not gated
    report = next(tmp_path.glob("ait_cmp_report_*.csv"))
    with report.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    assert header[:len(AIT_COLUMNS)] == AIT_COLUMNS
    assert header[-len(baseline_file.CSV_COLUMNS):] == baseline_file.CSV_COLUMNS
    col = {name: i for i, name in enumerate(header)}
    changed = next(r for r in rows[1:] if r[col["atb_op"]] == CHANGED_OP and r[col["token_id"]] == "0")
    assert changed[col["regressed"]] == "True"
    assert changed[col["regression"]].startswith("first regression")
    was = float(changed[col["baseline_relative_euclidean_distance"]])
    now = float(changed[col["relative_euclidean_distance"]])
    assert float(changed[col["delta_relative_euclidean_distance"]]) == pytest.approx(now - was)
    assert now > was
    untouched = next(r for r in rows[1:] if r[col["atb_op"]] == "0_GatherOperation")
    assert untouched[col["regressed"]] == "False"
    assert float(untouched[col["delta_relative_euclidean_distance"]]) == 0.0


def test_ops_new_or_missing_against_the_baseline_are_listed(dumps, accepted, tmp_path):
    base = baseline_file.read_baseline(accepted)
    dropped = [op for op in base.ops if op.atb_op.startswith("13_")]  # the final norm, both tokens
    base.ops = [op for op in base.ops if not op.atb_op.startswith("13_")]
    base.ops[0].atb_op = "0_RenamedGather"
    result = run_compare(dumps["golden"], dumps["healthy"], mapping_dir=EXAMPLE, write_csv=False, workers=1)
    regression = check_regression(result, base)
    assert {r.atb_op for r in regression.new} == {"13_RmsNormOperation", "0_GatherOperation"}
    assert [op.atb_op for op in regression.missing] == ["0_RenamedGather"]
    assert not regression.passed and not regression.regressions
    assert "1 baseline op(s) no longer compared, e.g. 0_RenamedGather" in regression.summary()
    assert len(dropped) == 2 and "3 op(s) not in the baseline" in regression.summary()


def test_improvement_beyond_the_margin_says_the_baseline_can_be_tightened(dumps, tmp_path, capsys):
    worse = tmp_path / "from_the_drifted_port.json"
    ait_llm(dumps, "half_percent", tmp_path, "--baseline", str(worse), "--update-baseline", capsys=capsys)
    _, out, _ = ait_llm(dumps, "healthy", tmp_path, "--baseline", str(worse), capsys=capsys)
    assert re.search(rf"better than the baseline beyond the margin: the baseline can be tightened, e\.g\. "
                     rf"{CHANGED_OP} <-> {CHANGED_MODULE}", out), out


def test_margins_overridden_per_op_type_and_pattern(dumps, accepted):
    result = run_compare(dumps["golden"], dumps["half_percent"], mapping_dir=EXAMPLE, write_csv=False, workers=1)
    base = baseline_file.read_baseline(accepted)
    loose = RegressionRules.from_marker(ops={"RmsNormOperation": {"red": (0.25, 2e-3)}})
    first = check_regression(result, base, loose).first_regression
    assert first is None or CHANGED_OP not in first.row.atb_op
    # a glob on the torch module wins over the op type entry
    tight_again = RegressionRules.from_marker(ops={"RmsNormOperation": {"red": (0.25, 2e-3)},
                                                   "*layers.6.input_layernorm": {"red": (0.0, 1e-4)}})
    assert check_regression(result, base, tight_again).first_regression.row.atb_op == CHANGED_OP
    ungated = RegressionRules.from_marker(red=None)
    assert not check_regression(result, base, ungated).regressions


def test_exact_rerun_passes_even_with_zero_margins():
    zero = Margin(0.0, 0.0)
    assert compare_metric("relative_euclidean_distance", quantize(0.0123456789123), 0.0123456789123, zero) is None
    assert compare_metric("cosine_similarity", quantize(0.99991234567), 0.99991234567, zero) is None
    # a metric that was computed and no longer is, is a regression; infinities compare as errors
    assert compare_metric("relative_euclidean_distance", 0.01, float("nan"), Margin(1, 1)).kind == "regressed"
    assert compare_metric("relative_euclidean_distance", 0.01, float("inf"), Margin(1, 1)).kind == "regressed"
    assert compare_metric("cosine_similarity", 0.999, 0.99, Margin(0.5, 0)).kind == "regressed"
    assert compare_metric("cosine_similarity", 0.99, 0.999, Margin(0.5, 0)).kind == "improved"


@pytest.mark.parametrize("kwargs, message", [
    ({"red": "tight"}, "margins must be finite numbers >= 0"),
    ({"red": (0.1,)}, "expected (rel, abs)"),
    ({"reds": (0.1, 0)}, "unknown metric 'reds'"),
    ({"ops": {"RmsNormOperation": {"red": {"rel": 0.1, "absolute": 1}}}}, "unknown key 'absolute'"),
    ({"red": (-0.1, 0)}, "margins must be finite numbers >= 0"),
])
def test_bad_margins_are_one_line_errors(kwargs, message):
    with pytest.raises(BaselineError, match=re.escape(message)):
        RegressionRules.from_marker(**kwargs)


# ----------------------------------------------------------------------------------- corrupt / hand-edited files

def _edit_op(index: int, change):
    def edit(text: str) -> str:
        lines = text.splitlines()
        ops_start = lines.index('  "ops": [') + 1
        line = lines[ops_start + index].rstrip(",")
        entry = json.loads(line)
        change(entry)
        lines[ops_start + index] = "    " + json.dumps(entry) + ","
        return "\n".join(lines) + "\n"
    return edit


def _set_metric(entry, name, value):
    entry["metrics"][name] = value


CORRUPTIONS = {
    "truncated": (lambda t: t[: len(t) // 2], r"not a baseline file: invalid JSON at line \d+ column \d+"),
    "not_a_baseline": (lambda t: '{"ops": []}\n', r"header: 'format' is None"),
    "metric_as_text": (_edit_op(3, lambda e: _set_metric(e, "relative_euclidean_distance", "0.01")),
                       r"ops\[3\] \(1_LlamaLayer/2_LinearOperation <-> root.model.layers.0.self_attn.k_proj, "
                       r"token 0\): metrics\['relative_euclidean_distance'\]='0.01' is not a number"),
    "unknown_metric": (_edit_op(5, lambda e: _set_metric(e, "rel_euclid_dist", 0.01)),
                       r"ops\[5\] .*: metrics: unknown metric 'rel_euclid_dist'"),
    "nan_literal": (lambda t: t.replace('"cosine_similarity": 0.', '"cosine_similarity": NaN, "x": 0.', 1),
                    r"not a baseline file: NaN is not JSON"),
    "token_as_text": (_edit_op(0, lambda e: e.update(token="0")), r"ops\[0\] \(0_GatherOperation <-> root.model.embed_tokens, token 0\): token='0' is not an integer"),
    "missing_key": (_edit_op(2, lambda e: e.pop("torch_module")), r"ops\[2\] \([^)]* <-> \?, token 0\): 'torch_module' is missing"),
    "duplicate_op": (_edit_op(1, lambda e: e.update(atb_op="0_GatherOperation", torch_module="root.model.embed_tokens")),
                     r"ops\[1\] .*: the same op as ops\[0\]"),
    "another_model": (lambda t: t.replace('"atb_op": "', '"atb_op": "Bloom/'),
                      r"only 0 of its \d+ ops match the \d+ ops of this run .*another model"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_or_hand_edited_baseline_is_a_one_line_error_never_a_pass(corruption, dumps, accepted, tmp_path,
                                                                          capsys):
    edit, pattern = CORRUPTIONS[corruption]
    bad = tmp_path / "edited.json"
    bad.write_text(edit(accepted.read_text()))
    code, out, err = ait_llm(dumps, "healthy", tmp_path, "--baseline", str(bad), "--fail-on-breach", capsys=capsys)
    assert code == 2
    # the CLI says which comparison pass runs before it compares; the error itself is one line
    lines = [line for line in err.strip().splitlines() if not line.startswith("comparison pass: ")]
    assert len(lines) == 1 and lines[0].startswith(f"ait-llm: error: {bad}: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------ concurrency

def _write_many(path: str, tag: int, count: int) -> None:
    text = baseline_file.dumps(baseline_file.loads(Path(path).read_text(), path))
    for i in range(count):
        baseline_file.atomic_write_text(path, text.replace('"package_version": "', f'"package_version": "{tag}.{i}-'))


def test_concurrent_writers_never_leave_or_show_a_half_written_baseline(accepted, tmp_path):
    """Two processes rewrite the same baseline while it is read: every read is a whole, valid file."""
    target = tmp_path / "shared.json"
    target.write_bytes(accepted.read_bytes())
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_many, args=(str(target), tag, 25)) for tag in (1, 2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        baseline_file.read_baseline(target)  # raises on a torn file
        reads += 1
    for w in writers:
        w.join(timeout=300)
        assert w.exitcode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]  # no temp file left behind


# -------------------------------------------------------------------------------------------------- in pytest

PROJECT_TEST = '''
import os
import pytest

GOLDEN, HEALTHY = {golden!r}, {healthy!r}
MY = os.environ.get("MY_DUMP", HEALTHY)


@pytest.mark.ait_baseline
def test_port(compare_ops):
    compare_ops(GOLDEN, MY)


def test_port_without_baseline(compare_ops):
    compare_ops(GOLDEN, MY)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_port_variant(compare_ops, variant):
    compare_ops(GOLDEN, MY, baseline=True)


@pytest.mark.ait_baseline
def test_port_opted_out(compare_ops):
    compare_ops(GOLDEN, MY, baseline=False)
'''


@pytest.fixture
def project(pytester, dumps, monkeypatch):
    monkeypatch.delenv("MY_DUMP", raising=False)
    pytester.makepyfile(test_port=PROJECT_TEST.format(golden=str(dumps["golden"]), healthy=str(dumps["healthy"])))
    return pytester


def run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", f"--op-mapping-file={EXAMPLE}", *args)


def test_pytest_first_run_fails_naming_the_file_it_wrote_then_the_rerun_passes(project):
    result = run(project)
    result.assert_outcomes(passed=2, failed=3)
    path = project.path / "ait_baselines" / "test_port" / "test_port.json"
    result.stdout.fnmatch_lines([f"*no baseline yet: wrote {path} from this run; review it and commit it*"
                                 "--ait-update-baseline rewrites it*"])
    written = sorted(p.name for p in path.parent.iterdir())
    assert written == ["test_port.json", "test_port_variant[a].json", "test_port_variant[b].json"]
    run(project).assert_outcomes(passed=5)


def test_pytest_names_the_drifted_op_first_and_update_accepts_it(project, dumps, monkeypatch):
    run(project, "--ait-update-baseline").assert_outcomes(passed=5)
    accepted = (project.path / "ait_baselines" / "test_port" / "test_port.json").read_text()
    monkeypatch.setenv("MY_DUMP", str(dumps["half_percent"]))
    html = project.path / "report.html"
    result = run(project, "-k", "test_port and not variant and not opted", f"--html={html}")
    result.assert_outcomes(passed=1, failed=1)  # the test without a baseline passes: inside every tolerance
    result.stdout.fnmatch_lines([f"*first regression: {CHANGED_OP} <-> {CHANGED_MODULE} (token 0): "
                                 "relative_euclidean_distance (added)*",
                                 "*accept it: rerun with --ait-update-baseline and commit the baseline*"])
    import html as html_mod

    page = html_mod.unescape(html_mod.unescape(html.read_text()))
    assert "regressed ops: was / now" in page and "first regression" in page
    assert "ait-llm-baseline-profile" in page  # the added error drawn over the baseline's
    run(project, "-k", "test_port and not variant", "--ait-update-baseline").assert_outcomes(passed=3)
    assert (project.path / "ait_baselines" / "test_port" / "test_port.json").read_text() != accepted
    run(project, "-k", "test_port and not variant").assert_outcomes(passed=3)


def test_pytest_baseline_dir_option_and_ini_key(project, tmp_path):
    run(project, f"--ait-baseline-dir={tmp_path / 'opt'}", "--ait-update-baseline").assert_outcomes(passed=5)
    assert (tmp_path / "opt" / "test_port" / "test_port_variant[b].json").is_file()
    project.makeini(f"[pytest]\nait_baseline_dir = {tmp_path / 'ini'}\n")
    run(project, "--ait-update-baseline", "-k", "test_port").assert_outcomes(passed=5)
    assert (tmp_path / "ini" / "test_port" / "test_port.json").is_file()
    assert not (project.path / "ait_baselines").exists()


def test_pytest_corrupt_baseline_fails_the_test_in_one_line(project):
    run(project, "--ait-update-baseline", "-k", "test_port and not variant").assert_outcomes(passed=3)
    path = project.path / "ait_baselines" / "test_port" / "test_port.json"
    path.write_text(path.read_text().replace('"token": 0', '"token": "zero"', 1))
    result = run(project, "-k", "test_port and not variant")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([f"*baseline error: {path}: ops[[]0[]] (0_GatherOperation <-> "
                                 "root.model.embed_tokens, token zero): token='zero' is not an integer"])
    assert "Traceback" not in result.stdout.str()


def test_pytest_bad_margin_in_the_marker_is_a_one_line_failure(pytester, dumps):
    pytester.makepyfile(test_bad=f'''
import pytest

@pytest.mark.ait_baseline(red="tight")
def test_port(compare_ops):
    compare_ops({str(dumps["golden"])!r}, {str(dumps["healthy"])!r})
''')
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.ait_baseline on test_bad.py::test_port: red='tight': margins must "
                                 "be finite numbers >= 0"])


def test_pytest_xdist_workers_write_their_own_files_whole(pytester, dumps):
    pytester.makepyfile(test_many=f'''
import pytest

@pytest.mark.ait_baseline
@pytest.mark.parametrize("n", range(6))
def test_port(compare_ops, n):
    compare_ops({str(dumps["golden"])!r}, {str(dumps["healthy"])!r}, tokens=[n % 2])
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", f"--op-mapping-file={EXAMPLE}",
                                           "--ait-update-baseline")
    result.assert_outcomes(passed=6)
    folder = pytester.path / "ait_baselines" / "test_many"
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [f"test_port[{n}].json" for n in range(6)]  # no temp file left
    for p in files:
        n = int(p.name[len("test_port["):-len("].json")])
        assert baseline_file.read_baseline(p).tokens == [n % 2]


# ------------------------------------------------------------------------------------------- the example's baseline

@pytest.mark.parametrize("variant, passes", [("healthy", True), ("subrounding", True), ("half_percent", False)])
def test_example_committed_baseline_gates_the_recorded_dumps(variant, passes, dumps, tmp_path):
    """test_healthy_port against examples/llama_port/ait_baselines as CI without an NPU runs it."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE), f"--rootdir={EXAMPLE}", "-c", str(EXAMPLE / "pytest.ini"),
         f"--ait-golden-path={dumps['golden']}", f"--ait-my-path={dumps[variant]}", f"--op-mapping-file={EXAMPLE}",
         f"--ait-output={tmp_path}", "-k", "test_healthy_port", "-q"],
        capture_output=True, text=True, timeout=600)
    if passes:
        assert proc.returncode == 0, proc.stdout[-3000:]
    else:
        assert proc.returncode == 1, proc.stdout[-3000:]
        assert f"first regression: {CHANGED_OP} <-> {CHANGED_MODULE} (token 0)" in proc.stdout
        assert "breach" not in proc.stdout.lower().replace("breaches: 0", "")
