"""The engine end to end on a real 12-layer HF Llama: torch hooks as golden, a bf16 ATB-layout mirror as "my"."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.compare.tolerance import Tolerance
from pytest_ait_llm.report.csv_report import AIT_COLUMNS

LAYERS = 12
FAULTY = "root.model.layers.5.post_attention_layernorm"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return golden_llama_dump(tmp_path_factory.mktemp("golden"), num_layers=LAYERS)


@pytest.fixture(scope="module")
def healthy(golden, tmp_path_factory):
    return write_mirror(golden, tmp_path_factory.mktemp("healthy"), num_layers=LAYERS)


@pytest.fixture(scope="module")
def healthy_result(golden, healthy, tmp_path_factory):
    return run_compare(golden, healthy[0], output_dir=tmp_path_factory.mktemp("report"))


def test_every_module_backed_op_is_paired_with_its_module(healthy_result, healthy):
    _, truth = healthy
    paired = {(r.atb_op, r.torch_module) for r in healthy_result.compared if r.token_id == 0}
    # LlamaAttention returns o_proj's output: a row of its own on o_proj's op, the same quantity
    o_proj = {module: op for op, module in truth.items() if module.endswith(".self_attn.o_proj")}
    containers = {(op, module.removesuffix(".o_proj")) for module, op in o_proj.items()}
    assert len(containers) == LAYERS and paired == set(truth.items()) | containers


def test_bias_less_linear_before_a_residual_add_is_not_a_bias_add(healthy_result):
    o_proj = [r for r in healthy_result.compared if r.torch_module.endswith("self_attn.o_proj")]
    assert len(o_proj) == 2 * LAYERS
    # the pair reads the Linear's own output, not the residual sum written by the add after it
    assert all(Path(r.my_path).parts[-3] == "5_LinearOperation" for r in o_proj)
    assert all(r.metric("cosine_similarity") > 0.999 for r in o_proj)
    adds = [r for r in healthy_result.rows if r.status == "unpaired" and r.atb_op.endswith("6_ElewiseOperation")]
    assert len(adds) == LAYERS and all("no mapping rule" in r.reason for r in adds)


def test_healthy_bf16_port_has_no_breach_under_default_tolerance(healthy_result):
    assert healthy_result.passed, healthy_result.failure_message()
    assert healthy_result.first_divergence is None
    assert len(healthy_result.compared) == 2 * len([r for r in healthy_result.compared if r.token_id == 0])


def test_five_percent_scale_error_is_the_first_divergence(golden, tmp_path):
    root, truth = write_mirror(golden, tmp_path / "bad", num_layers=LAYERS, faults={FAULTY: 1.05})
    result = run_compare(golden, root, output_dir=tmp_path)
    assert not result.passed
    first = result.first_divergence
    assert (first.torch_module, first.token_id) == (FAULTY, 0)
    # cosine alone would not have caught it
    assert first.metric("cosine_similarity") > 0.999
    assert any(b.metric == "relative_euclidean_distance" for b in first.breaches)
    assert FAULTY in result.failure_message() and first.atb_op in result.failure_message()
    assert [r.first_divergence for r in result.rows].count(True) == 1
    assert all(r.propagated for r in result.breaches if r is not first)


def test_error_arising_in_unpaired_ops_is_caught_and_named(golden, tmp_path):
    # SelfAttention has no torch module; its output is o_proj's input. A 5 % error there must not pass unseen.
    o_proj = "root.model.layers.3.self_attn.o_proj"
    root, _ = write_mirror(golden, tmp_path / "bad", num_layers=LAYERS, faults={f"{o_proj}:input_0": 1.05})
    result = run_compare(golden, root, write_csv=False)
    first = result.first_divergence
    assert first is not None and (first.torch_module, first.token_id) == (o_proj, 0)
    assert "4_LlamaLayer/4_SelfAttentionOperation" in result.failure_message()
    assert "unpaired" in str(first.breaches[0])


def test_csv_has_the_original_columns_first_and_marks_the_root_cause(golden, tmp_path):
    root, _ = write_mirror(golden, tmp_path / "bad", num_layers=LAYERS, faults={FAULTY: 1.05})
    result = run_compare(golden, root, output_dir=tmp_path)
    with open(result.csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
        fh.seek(0)
        header = next(csv.reader(fh))
    assert header[:22] == AIT_COLUMNS
    assert {"golden_op_type", "my_op_type", "passed", "first_divergence", "execution_order"} <= set(header)
    roots = [r for r in rows if r["first_divergence"] == "True"]
    assert len(roots) == 1 and roots[0]["torch_module"] == FAULTY and roots[0]["passed"] == "False"
    assert Path(roots[0]["my_data_path"]).is_file() and Path(roots[0]["golden_data_path"]).is_file()
    assert any(r["status"] == "unpaired" and r["cmp_fail_reason"] for r in rows)


def _ait_reference(g: torch.Tensor, m: torch.Tensor) -> dict:
    """The original tool's metric definitions, written out independently (spec section 5)."""
    g, m = g.reshape(-1).double(), m.reshape(-1).double()
    eps = torch.finfo(torch.float32).eps
    mask = g.abs() > eps
    rel = torch.where(mask, (m / torch.where(mask, g, torch.ones_like(g)) - 1).abs(), torch.zeros_like(g))
    kl = torch.nn.functional.kl_div(torch.log_softmax(m, 0), torch.softmax(g, 0), reduction="sum").clamp(min=0)
    return {
        "cosine_similarity": float(torch.cosine_similarity(g, m, dim=0)),
        "max_relative_error": float(rel.max()), "mean_relative_error": float(rel.mean()),
        # ours: absolute error over every element (ait masked it by |g| > eps), RED with the square root (msit)
        "max_absolute_error": float((m - g).abs().max()), "mean_absolute_error": float((m - g).abs().mean()),
        "kl_divergence": float(kl),
        "relative_euclidean_distance": float(((m - g) ** 2).sum().sqrt() / (g ** 2).sum().sqrt()),
    }


def _load(path: str) -> torch.Tensor:
    if path.endswith(".pth"):
        return torch.load(path, weights_only=True)
    raw = Path(path).read_bytes()
    payload = raw[raw.index(b"$End=1\n") + 7:]
    bits = np.frombuffer(payload, dtype=np.uint16).astype(np.uint32) << 16
    return torch.from_numpy(bits.view(np.float32).copy())


def test_leading_columns_carry_the_original_metric_values(healthy_result):
    with open(healthy_result.csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "compared"][:40:7]
    assert rows
    for row in rows:
        g, m = _load(row["golden_data_path"]), _load(row["my_data_path"])
        expected = _ait_reference(g, m)
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(value, rel=1e-6, abs=1e-9), name
        assert float(row["golden_max_value"]) == pytest.approx(float(g.max()))
        assert row["my_dtype"] == "torch.bfloat16" and row["golden_dtype"] == "torch.float32"


def test_tolerance_overrides_per_op_type(golden, tmp_path):
    root, _ = write_mirror(golden, tmp_path / "bad", num_layers=LAYERS, faults={FAULTY: 1.05})
    lenient = Tolerance.from_marker(ops={"RmsNormOperation": {"red": 0.2}})
    assert run_compare(golden, root, tolerance=lenient, write_csv=False).passed
    skipping = Tolerance.from_marker(skip=["*/7_RmsNormOperation"])
    result = run_compare(golden, root, tolerance=skipping, write_csv=False)
    assert result.passed and any(r.status == "skipped" for r in result.rows)


def test_two_reports_in_the_same_second_never_collide(golden, healthy, tmp_path):
    a = run_compare(golden, healthy[0], output_dir=tmp_path, tokens=[0])
    b = run_compare(golden, healthy[0], output_dir=tmp_path, tokens=[0])
    assert a.csv_path != b.csv_path and a.csv_path.is_file() and b.csv_path.is_file()
    assert a.csv_path.name.startswith("ait_cmp_report_") and a.csv_path.suffix == ".csv"


# --------------------------------------------------------------------------------------------------------- the CLI

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pytest_ait_llm", *map(str, args)], capture_output=True, text=True)


def test_cli_compares_and_prints_the_report_path_and_summary(golden, healthy, tmp_path):
    proc = _cli("compare", "-gp", golden.root, "-mp", healthy[0], "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    csv_path = Path(proc.stdout.splitlines()[0])
    assert csv_path.parent == tmp_path and csv_path.is_file()
    assert "pairs compared" in proc.stdout and "breaches: 0" in proc.stdout


def test_cli_token_dirs_and_fail_on_breach(golden, tmp_path):
    root, _ = write_mirror(golden, tmp_path / "bad", num_layers=LAYERS, faults={FAULTY: 1.05})
    token_golden, token_my = golden.token_dirs[0], next((root / "tensors").iterdir()) / "0"
    proc = _cli("--help") if False else _cli("compare", "--golden-path", token_golden, "--my-path", token_my,
                                             "--output", tmp_path, "--fail-on-breach")
    assert proc.returncode == 1, proc.stderr
    assert "first divergence" in proc.stdout and FAULTY in proc.stdout


@pytest.mark.parametrize("args, expected", [
    (["compare", "-gp", "/nonexistent/golden", "-mp", "/nonexistent/my"], "nonexistent"),
    (["compare", "-gp", ".", "-mp", ".", "-t", "cos=high"], "cos"),
    (["compare", "-gp", "."], "required"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, expected, tmp_path):
    proc = _cli(*args)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) <= 3


def test_cli_bad_mapping_file_names_the_key(golden, healthy, tmp_path):
    (tmp_path / "op_mapping_file.json").write_text('{"Bad Key": "Linear"}')
    proc = _cli("compare", "-gp", golden.root, "-mp", healthy[0], "--op-mapping-file", tmp_path, "-o", tmp_path)
    assert proc.returncode == 2 and "'Bad Key'" in proc.stderr and "Traceback" not in proc.stderr


def test_report_as_a_dataframe_matches_the_csv(healthy_result):
    import pandas as pd

    from pytest_ait_llm.report.csv_report import dataframe

    frame = dataframe(healthy_result)
    from_csv = pd.read_csv(healthy_result.csv_path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == list(from_csv.columns)
    assert frame.astype(str).equals(from_csv.astype(str))
    compared = frame[frame["status"] == "compared"]
    assert compared["cosine_similarity"].astype(float).min() > 0.999


def test_cli_custom_metric_becomes_a_csv_column(golden, healthy, tmp_path):
    metric = tmp_path / "my_metrics.py"
    metric.write_text("def peak_gap(golden, my):\n    return float(abs(golden.max() - my.max()))\n")
    proc = _cli("compare", "-gp", golden.root, "-mp", healthy[0], "-o", tmp_path, "--tokens", "0",
                "-alg", f"{metric}:peak_gap")
    assert proc.returncode == 0, proc.stderr
    with open(proc.stdout.splitlines()[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    compared = [r for r in rows if r["status"] == "compared"]
    assert compared and all(float(r["peak_gap"]) >= 0 for r in compared)
    assert any(float(r["peak_gap"]) > 0 for r in compared)  # bf16 rounding moves some maxima


# ----------------------------------------------------------------------------------------------- input error

def _by_key(result):
    return {(r.token_id, r.atb_op, r.data_id): r for r in result.compared}


def test_an_input_changed_after_its_producer_was_dumped_shows_in_the_input_error(golden, healthy, tmp_path):
    """The consumer's own intensor file differs from the producer's outtensor (an in-place write in between):
    its input error comes from its own files, i.e. shows the change."""
    from atb_mirror import rewritten_copy

    mine = tmp_path / "my"
    # the q_proj of layer 1 reads the output of that layer's input norm; spoil its copy of that tensor only
    target = rewritten_copy(healthy[0], mine, "intensor0.bin", lambda values: values * 1.5)
    result = run_compare(golden, mine, output_dir=tmp_path / "out")
    consumer = [r for r in result.compared if Path(r.my_path).parent.parent == target.parent.parent]
    assert consumer, "the spoiled op was compared"
    for row in consumer:
        assert row.input_metrics["relative_euclidean_distance"] > 0.3  # the 50 % error in its input file is seen


# ------------------------------------------------------------------ one bad file costs its row, never the report
# Each case damages one file of a copy of the healthy dumps; the comparison runs in worker processes (where an
# escaping error once aborted the whole run); the damaged row names the file and every other row is as healthy.

Q_PROJ = "root.model.layers.1.self_attn.q_proj"


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest, symlinks=True)
    return dest


def _golden_output(golden_root: Path, token: int, module: str) -> Path:
    return next(p for p in golden_root.rglob("output*.pth") if p.parent.name == module and p.parent.parent.name == str(token))


def _assert_only_row_damaged(result, healthy_result, damaged: Path) -> None:
    assert result.csv_path.is_file()
    bad = [r for r in result.compared if str(damaged) in r.reason]
    assert len(bad) == 1 and bad[0].passed is False and bad[0].metrics is None, [r.reason for r in result.compared]
    before, after = _by_key(healthy_result), _by_key(result)
    assert before.keys() == after.keys()
    key = (bad[0].token_id, bad[0].atb_op, bad[0].data_id)
    for k, row in after.items():
        if k != key:
            assert row.metrics is not None and row.metrics.values == before[k].metrics.values, k
    text = result.csv_path.read_text(encoding="utf-8")
    assert str(damaged) in text and len(text.splitlines()) == len(result.rows) + 1


def test_a_bin_whose_dims_numpy_cannot_hold_costs_only_its_row(golden, healthy, healthy_result, tmp_path,
                                                                monkeypatch):
    mine = _copy(healthy[0], tmp_path / "my")
    target = next(p for p in sorted(mine.rglob("outtensor0.bin"))
                  if p.parent.name == "after" and p.parts[-3] == "1_LinearOperation" and p.parts[-4] == "1_LlamaLayer"
                  and p.parts[-5] == "0")
    target.write_bytes(b"$Version=1.0\n$Object.Count=1\nformat=2\ndtype=0\ndims=0,4611686018427387904,"
                       b"4611686018427387904\n$End=1\n")
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "processes")
    result = run_compare(golden, mine, output_dir=tmp_path, workers=2)
    _assert_only_row_damaged(result, healthy_result, target)


def test_an_expanded_pth_view_is_refused_not_materialised(golden, healthy, healthy_result, tmp_path, monkeypatch):
    """torch.save of an .expand()ed tensor: a few KB on disk, terabytes as a dense array."""
    gold = _copy(Path(golden.root), tmp_path / "golden" / Path(golden.root).name)
    target = _golden_output(gold, 0, Q_PROJ)
    torch.save(torch.ones(1, 1, 64).expand(2**34, 8, 64), target)
    assert target.stat().st_size < 10_000
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "processes")
    result = run_compare(gold, healthy[0], output_dir=tmp_path, workers=2)
    _assert_only_row_damaged(result, healthy_result, target)
    assert "strided view" in next(r.reason for r in result.compared if str(target) in r.reason)


def _deflated(path: Path, dest: Path) -> None:
    """``path`` (a torch.save zip) rewritten with every member deflate-compressed: still a valid torch file."""
    import zipfile

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))


def test_a_deflate_compressed_pth_is_read_exactly(golden, healthy, healthy_result, tmp_path):
    gold = _copy(Path(golden.root), tmp_path / "golden" / Path(golden.root).name)
    target = _golden_output(gold, 0, Q_PROJ)
    _deflated(target, tmp_path / "c.pth")
    (tmp_path / "c.pth").replace(target)
    assert torch.equal(torch.load(target, weights_only=True), torch.load(_golden_output(Path(golden.root), 0, Q_PROJ)))
    result = run_compare(gold, healthy[0], output_dir=tmp_path)
    before, after = _by_key(healthy_result), _by_key(result)
    assert {k: r.metrics.values for k, r in after.items()} == {k: r.metrics.values for k, r in before.items()}


def test_a_compressed_pth_inflating_beyond_the_limit_is_refused(golden, healthy, healthy_result, tmp_path):
    """A zip bomb: 4 MB of zeros in a few KB. Never compared as if its compressed bytes were values."""
    gold = _copy(Path(golden.root), tmp_path / "golden" / Path(golden.root).name)
    target = _golden_output(gold, 0, Q_PROJ)
    torch.save(torch.zeros(1 << 20), tmp_path / "zeros.pth")
    _deflated(tmp_path / "zeros.pth", target)
    assert target.stat().st_size < 100_000
    result = run_compare(gold, healthy[0], output_dir=tmp_path, max_bin_bytes=1 << 20)
    _assert_only_row_damaged(result, healthy_result, target)
    assert "exceeds the limit" in next(r.reason for r in result.compared if str(target) in r.reason)


def test_names_csv_cannot_encode_are_written_escaped(golden, healthy, tmp_path):
    """An op name with a lone surrogate (from the topology's JSON) and a golden dump under a directory named in
    GBK bytes (as a zh_CN.GBK machine writes it): the report is written, the names escaped, nothing lost."""
    import json
    import os

    gbk = os.fsdecode("金丝".encode("gbk"))  # undecodable as UTF-8: surrogate-escaped by Python
    gold = _copy(Path(golden.root), tmp_path / gbk / Path(golden.root).name)
    mine = _copy(healthy[0], tmp_path / "my")
    topology = next(mine.rglob("*.json"))
    text = topology.read_text(encoding="utf-8")
    topology.write_text(text.replace('"LlamaLayer_2"', '"LlamaLayer_\\udcff2"', 1) if '"LlamaLayer_2"' in text
                        else text.replace('"opName": "', '"opName": "\\udcff', 1), encoding="utf-8")
    result = run_compare(gold, mine, output_dir=tmp_path / "out")
    csv_text = result.csv_path.read_text(encoding="utf-8")  # valid UTF-8
    assert "\\udcff" in csv_text and "\\udcbd\\udcf0" in csv_text
    assert len(list(csv.reader(csv_text.splitlines()))) == len(result.rows) + 1
    assert any("\udcff" in r.atb_op_name for r in result.rows)
    json.loads(text)  # the original topology was valid JSON (the test changed one name only)
