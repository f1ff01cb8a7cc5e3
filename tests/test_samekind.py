"""Comparing two ports, two builds, two torch runs: the example port (examples/llama_port) against itself.

The dumps are made as a team would make them: the port's bf16 build and its fp16 build (``PORT_DTYPE=float16``),
the port with a 5 % scale bug in one RmsNorm (``PORT_BUG=rmsnorm_scale``), the fp32 golden and the same golden in
bf16, and a port whose lm_head row for one token is 5 % off, which changes nothing a per-op tolerance sees but
flips a near-tie at one step of greedy decoding. No mapping file is given anywhere.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llama_example import EXAMPLE, golden, load, port
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.cli import main as cli
from pytest_ait_llm.compare.result import COMPARED, UNPAIRED
from pytest_ait_llm.dump.atb_writer import PART_OUT, AtbDumpWriter
from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
from pytest_ait_llm.formats.detect import dump_kind, open_dump
from pytest_ait_llm.report.html import report_fragment

pytest_plugins = ["pytester"]

#: The step at which the nudged lm_head picks another token: the healthy port's logits there are 85: 4.84 and
#: 34: 4.72 (a near-tie), and a 5 % larger row for token 34 puts 34 first. Earlier steps keep their winners.
NUDGED_TOKEN, NUDGE, FLIP_STEP = 34, 1.05, 4


port_fp16 = load("llama_port_port_fp16", EXAMPLE / "port.py", {"PORT_DTYPE": "float16"})


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Every dump the tests compare, made once: {name: dump root}."""
    base = tmp_path_factory.mktemp("samekind")
    model, input_ids = golden.build_golden()
    state = model.state_dict()
    roots: dict[str, Path] = {}

    def atb(name, module=port, *, bug=None, weights=state, tokens=2, part=None, layout="ait", config=None):
        extra = {"part": part} if part is not None else {}
        writer = AtbDumpWriter(base / name, model_name=module.MODEL_NAME, token_range=((0, tokens - 1),),
                               layout=layout, timestamp="20250101_120000", **extra)
        p = module.LlamaPort(weights, config or dict(golden.CONFIG), bug=bug, recorder=writer, max_seq_len=32)
        writer.write_topology(p.topology)
        p.generate(input_ids, tokens)
        roots[name] = writer.root

    def torch_run(name, m):
        with register_hook(m, DumpConfig(dump_path=base / name, token_range=range(2))) as handle, torch.no_grad():
            m.generate(input_ids, **golden.GENERATE_KWARGS)
        roots[name] = handle.dump_dir

    atb("bf16")
    atb("fp16", port_fp16, layout="msit")
    atb("rmsnorm_scale", bug="rmsnorm_scale")
    atb("two_layers", config=dict(golden.CONFIG, num_hidden_layers=2), tokens=1)
    nudged = dict(state)
    nudged["lm_head.weight"] = state["lm_head.weight"].clone()
    nudged["lm_head.weight"][NUDGED_TOKEN] *= NUDGE
    atb("outputs_bf16", tokens=FLIP_STEP + 1, part=PART_OUT)
    atb("outputs_nudged", weights=nudged, tokens=FLIP_STEP + 1, part=PART_OUT)
    torch_run("torch_fp32", model)
    torch_run("torch_bf16", golden.build_golden()[0].to(torch.bfloat16))
    return roots


def _compare(dumps, tmp_path, a, b, **kwargs):
    return run_compare(dumps[a], dumps[b], output_dir=tmp_path, workers=2, **kwargs)


def _output_tensors(root: Path, token: int) -> int:
    """How many output tensors the ops of one token dumped (each is one compared row)."""
    token_dir = next((root / "tensors").glob(f"*/{token}"))
    return sum(1 for _ in token_dir.rglob("after/outtensor*.bin"))


def test_bf16_and_fp16_builds_pair_every_op_and_pass_default_tolerances(dumps, tmp_path):
    result = _compare(dumps, tmp_path, "bf16", "fp16")
    assert result.passed, result.failure_message()
    assert not result.unpaired
    assert len(result.compared) == sum(_output_tensors(dumps["bf16"], t) for t in (0, 1))
    assert {r.atb_op for r in result.compared} == {r.torch_module for r in result.compared}
    dtypes = {(r.metrics.golden.dtype, r.metrics.my.dtype) for r in result.compared if r.metrics.golden.dtype != "int32"}
    assert dtypes == {("bfloat16", "float16")}
    assert result.output.passed and result.output.first_token_mismatch is None


def test_a_five_percent_scale_bug_in_one_rmsnorm_is_named_first_without_a_mapping_file(dumps, tmp_path):
    result = _compare(dumps, tmp_path, "bf16", "rmsnorm_scale")
    bug = port.BUGS["rmsnorm_scale"]
    assert not result.passed
    assert not [r for r in result.rows if r.status == UNPAIRED]
    assert len(result.compared) == sum(_output_tensors(dumps["bf16"], t) for t in (0, 1))
    first = result.first_divergence
    assert (first.atb_op, first.torch_module, first.token_id) == (bug.rel_dir, bug.rel_dir, 0)
    message = result.failure_message()
    assert message.splitlines()[0] == (f"first divergent op: {bug.rel_dir} ({bug.op_name}, RmsNormOperation) <-> A "
                                       f"{bug.rel_dir} (RmsNormOperation), token 0")
    assert "relative_euclidean_distance 0.05" in message
    # nothing before the bug breaches: every earlier op of both tokens passes
    assert all(r.passed for r in result.compared if r.token_id == 0 and r.order < first.order)


def test_torch_fp32_and_bf16_runs_pair_every_module_by_name(dumps, tmp_path):
    result = _compare(dumps, tmp_path, "torch_fp32", "torch_bf16")
    assert result.passed, result.failure_message()
    assert {r.torch_module for r in result.compared} == {r.atb_op for r in result.compared}
    assert "root.model.layers.11.mlp.down_proj" in {r.torch_module for r in result.compared}
    # the ModuleList is never called: listed, with the reason, not failed
    assert [(u.name, u.reason) for u in result.unpaired] == [
        ("root.model.layers", "no output dumped on either side (a container never called)")]
    assert result.output.steps[0].a_token == result.output.steps[0].b_token


def test_per_op_errors_inside_tolerance_but_a_different_greedy_token_fail_naming_the_step(dumps, tmp_path):
    result = _compare(dumps, tmp_path, "outputs_bf16", "outputs_nudged")
    assert not result.breaches  # every op, lm_head included, is inside the bf16 tolerance
    assert result.compared
    assert not result.passed
    mismatch = result.output.first_token_mismatch
    assert (mismatch.token, mismatch.a_token, mismatch.b_token) == (FLIP_STEP, 85, NUDGED_TOKEN)
    message = result.failure_message()
    assert message.splitlines()[0].startswith("output check (15_LinearOperation vs 15_LinearOperation, 5 step(s)): FAIL")
    assert f"greedy tokens differ first at step {FLIP_STEP}: A picks 85, B picks {NUDGED_TOKEN}" in message


def test_output_check_bounds_come_from_the_marker_keys(dumps, tmp_path):
    from pytest_ait_llm.compare.tolerance import Tolerance

    strict = _compare(dumps, tmp_path, "outputs_bf16", "outputs_nudged")
    # the nudged row moves token 34's probability by a quarter: the default KL bound (1e-3) sees that too
    assert [b for b in strict.output.breaches if "logits KL" in b]
    lenient = Tolerance.from_marker(top1=0.0, logits_kl=0.01)
    result = _compare(dumps, tmp_path, "outputs_bf16", "outputs_nudged", tolerance=lenient)
    assert result.passed, result.failure_message()
    assert result.output.first_token_mismatch.token == FLIP_STEP  # still shown, no longer failing


def test_cli_takes_either_kind_on_either_side_and_shows_the_output_check_first(dumps, tmp_path, capsys):
    assert cli(["compare", "-gp", str(dumps["bf16"]), "-mp", str(dumps["fp16"]), "-o", str(tmp_path),
                "-mf", str(EXAMPLE), "--fail-on-breach"]) == 0
    out = capsys.readouterr().out.splitlines()
    csv_path = Path(out[0])
    assert out[1].startswith("output check (15_LinearOperation vs 15_LinearOperation, 2 step(s)): PASS")
    assert f"note: op mapping file {EXAMPLE} ignored: two dumps of one kind pair by identity" in out
    header, first_row = csv_path.read_text().splitlines()[:2]
    columns = header.split(",")
    assert columns[:2] == ["token_id", "data_id"] and columns[-3:] == ["logits_kl", "golden_token", "my_token"]
    assert dict(zip(columns, first_row.split(",")))["status"] == "output_check"


@pytest.mark.parametrize("name, kind", [("bf16", "atb"), ("fp16", "atb"), ("torch_fp32", "torch")])
def test_each_side_is_detected_at_root_rank_and_token_level(dumps, name, kind):
    root = dumps[name]
    paths = [root]
    if kind == "atb":
        rank = next((root / "tensors").iterdir())
        paths += [rank, rank / "0", root.parent]
    else:
        paths += [root / "0", root.parent]
    assert {dump_kind(p) for p in paths} == {kind}
    assert type(open_dump(paths[-1])).__name__ == ("AtbDump" if kind == "atb" else "TorchDump")


def _one_line_error(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ait-llm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err  # the CLI may say which comparison pass it uses first
    return errors[0]


def test_two_different_models_are_refused_in_one_line(dumps, capsys, tmp_path):
    err = _one_line_error(capsys, ["compare", "-gp", str(dumps["bf16"]), "-mp", str(dumps["two_layers"]),
                                   "-o", str(tmp_path)])
    assert "not the same model: A has 12 layer graph ops (LlamaLayer), B has 2" in err


def test_an_atb_dump_without_its_topology_is_named(dumps, capsys, tmp_path):
    copy = tmp_path / "ait_dump"
    shutil.copytree(dumps["rmsnorm_scale"], copy)
    shutil.rmtree(copy / "model")
    shutil.rmtree(copy / "layer")
    err = _one_line_error(capsys, ["compare", "-gp", str(copy), "-mp", str(dumps["bf16"]), "-o", str(tmp_path)])
    assert "no topology found" in err and str(copy) in err


def test_token_sets_that_differ(dumps, capsys, tmp_path):
    rank = next((dumps["bf16"] / "tensors").iterdir())
    err = _one_line_error(capsys, ["compare", "-gp", str(rank / "0"), "-mp", str(dumps["fp16"] / "tensors"
                                   / rank.name / "1"), "-o", str(tmp_path)])
    assert "no token in common: A" in err and "has tokens [0], B" in err and "has [1]" in err
    # overlapping token sets: the common token is compared, the other one is listed with its reason
    result = run_compare(rank, dumps["outputs_bf16"], output_dir=tmp_path, workers=1)
    assert {r.token_id for r in result.compared} == {0, 1}
    assert sorted(r.reason for r in result.rows if r.status == UNPAIRED and r.token_id is not None) == [
        "token 2 dumped only on the B side", "token 3 dumped only on the B side",
        "token 4 dumped only on the B side"]
    assert {r.status for r in result.rows if r.token_id in (0, 1)} == {COMPARED, "output_check"}
    assert [r.token_id for r in result.rows if r.status == "output_check"] == [0, 1]


def test_an_atb_dump_as_a_and_a_torch_dump_as_b_pair_through_the_mapping_table(dumps, tmp_path):
    forward = _compare(dumps, tmp_path, "torch_fp32", "bf16", mapping_dir=EXAMPLE)
    turned = _compare(dumps, tmp_path, "bf16", "torch_fp32", mapping_dir=EXAMPLE)
    assert turned.passed, turned.failure_message()
    pairs = {(r.torch_module, r.atb_op, r.token_id) for r in turned.compared}
    assert pairs == {(r.atb_op, r.torch_module, r.token_id) for r in forward.compared}
    assert all(r.golden_path.endswith(".bin") and r.my_path.endswith(".pth") for r in turned.compared)
    assert turned.output.a_source == "15_LinearOperation" and turned.output.b_source == "root/output_logits"
    # the same ops left unpaired either way round, each named by the side it is on
    torch_left = sum(1 for r in forward.unpaired if r.side == "torch")
    atb_left = sum(1 for r in forward.unpaired if r.side == "atb")
    assert torch_left and atb_left
    assert f"unpaired ops: {torch_left} B, {atb_left} A" in turned.summary(), turned.summary()


def test_compare_ops_takes_two_atb_dumps_and_the_output_keys_of_the_marker(dumps, pytester):
    pytester.makepyfile(test_two_builds=f'''
import pytest

@pytest.mark.ait_tolerance(top1=1.0)
def test_buggy_build_against_healthy(compare_ops):
    compare_ops({str(dumps["bf16"])!r}, {str(dumps["rmsnorm_scale"])!r})

def test_flipped_token_let_by(compare_ops):
    result = compare_ops({str(dumps["outputs_bf16"])!r}, {str(dumps["outputs_nudged"])!r}, top1=0.0, logits_kl=0.01)
    assert result.output.first_token_mismatch.token == {FLIP_STEP}

@pytest.mark.ait_tolerance(logits_kl=0.01)
def test_flipped_token_fails(compare_ops):
    compare_ops({str(dumps["outputs_bf16"])!r}, {str(dumps["outputs_nudged"])!r})
''')
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*first divergent op: 4_LlamaLayer/8_RmsNormOperation (RmsNormOperation_4_8*",
                                 "*output check (15_LinearOperation vs 15_LinearOperation, 5 step(s)): FAIL*",
                                 f"*greedy tokens differ first at step {FLIP_STEP}: A picks 85, B picks 34*"])


def test_html_entry_starts_with_the_output_check(dumps, tmp_path):
    result = _compare(dumps, tmp_path, "outputs_bf16", "outputs_nudged")
    html = report_fragment(result)
    assert html.index("greedy tokens differ first at step") < html.index("<table")


def test_an_msit_root_holding_both_kinds_is_ambiguous(tmp_path, capsys):
    root = tmp_path / "msit_dump_20250101_120000"
    (root / "tensors" / "0_123" / "0").mkdir(parents=True)
    (root / "torch_tensors" / "123_cpu" / "0").mkdir(parents=True)
    err = _one_line_error(capsys, ["compare", "-gp", str(root), "-mp", str(root), "-o", str(tmp_path)])
    assert f"{root}: holds both an ATB dump (tensors/) and a torch dump (torch_tensors/)" in err


def test_a_path_that_is_no_dump_at_all_says_what_a_dump_looks_like(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["compare", "-gp", str(tmp_path / "empty"), "-mp", str(tmp_path / "empty"),
                                   "-o", str(tmp_path)])
    assert "neither an ATB dump" in err and "nor a torch dump" in err


def test_ranks_are_compared_one_rank_dir_at_a_time(dumps, tmp_path, capsys):
    """A two-rank dump: against one rank, the rank on the same device; against two ranks, a one-line refusal."""
    two = tmp_path / "two_ranks" / "ait_dump"
    shutil.copytree(dumps["bf16"], two)
    rank0 = next((two / "tensors").iterdir())
    pid = rank0.name.split("_")[1]
    shutil.copytree(rank0, two / "tensors" / "1_99999")
    shutil.copytree(two / "model" / pid, two / "model" / "99999")
    result = run_compare(two, dumps["bf16"], output_dir=tmp_path, workers=2)
    assert result.passed and {r.golden_path.split("/tensors/")[1].split("/")[0] for r in result.compared} == {rank0.name}
    assert all(r.metrics.values["relative_euclidean_distance"] == 0 for r in result.compared)
    err = _one_line_error(capsys, ["compare", "-gp", str(two), "-mp", str(two), "-o", str(tmp_path)])
    assert f"has rank(s) {rank0.name}, 1_99999 and B has {rank0.name}, 1_99999: compare one rank of each" in err
