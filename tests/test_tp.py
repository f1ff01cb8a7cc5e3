"""Tensor-parallel ports compared with the single-device golden: ranks as one comparison.

The dumps are Megatron-layout mirrors (tests/tp_mirror.py) of tiny HF Llama (MHA) and Qwen2 (GQA, q/k/v biases)
models, written as 2 or 4 rank dirs; the golden is the single-device model dumped by our hooks.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pytest_ait_llm.api import run_compare
from pytest_ait_llm.compare.engine import compare_dumps
from tp_mirror import golden_dump, write_tp_mirror

pytest_plugins = ["pytester"]

LAYERS = 3


@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    return {kind: golden_dump(kind, tmp_path_factory.mktemp(f"golden_{kind}"), num_layers=LAYERS)
            for kind in ("llama", "qwen2")}


def _mirror(goldens, tmp_path, kind, world, **kwargs):
    return write_tp_mirror(goldens[kind], tmp_path / "my", num_layers=LAYERS, world=world, bias=kind == "qwen2",
                           **kwargs)


def pairing_quality(result, truth) -> tuple[float, float]:
    """(precision of the ATB op -> module pairs, share of the modules with a counterpart that were compared)."""
    paired = {r.atb_op: r.torch_module for r in result.compared}
    correct = sum(1 for op, module in paired.items() if truth.get(op, ("",))[0] == module)
    covered = sum(1 for op, (module, _) in truth.items() if paired.get(op) == module)
    return correct / len(paired), covered / len(truth)


MODELS = [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen2", 4)]


@pytest.mark.parametrize("kind,world", MODELS, ids=[f"{k}-tp{w}" for k, w in MODELS])
def test_healthy_tp_port_passes_with_every_module_paired_right(goldens, tmp_path, kind, world):
    my, truth = _mirror(goldens, tmp_path, kind, world)
    result = compare_dumps(goldens[kind], my)
    precision, coverage = pairing_quality(result, truth)
    assert precision == 1.0
    assert coverage >= 0.95
    assert result.passed, result.failure_message()
    # split ops are one merged row over every rank's file; replicated ops one row per rank
    for op, (module, kind_of) in truth.items():
        rows = [r for r in result.compared if r.atb_op == op and r.token_id == 0 and r.torch_module == module]
        if kind_of == "split":
            assert [r.rank for r in rows] == ["merged"]
            assert len(rows[0].my_path.split(";")) == world
            assert "error shares: rank 0" in rows[0].note
        else:
            assert sorted(r.rank for r in rows) == [f"{r}_{5000 + r}" for r in range(world)]


def test_gate_shards_shaped_like_o_proj_are_never_paired_with_it(goldens, tmp_path):
    # Qwen2 at TP=2: each gate/up shard is [1, s, 64], the shape of o_proj's and down_proj's outputs
    my, _ = _mirror(goldens, tmp_path, "qwen2", 2)
    result = compare_dumps(goldens["qwen2"], my)
    gate = [r for r in result.compared if r.atb_op == "1_DecoderLayer/8_MlpGateLayerV2/0_LinearOperation"]
    assert {r.torch_module for r in gate} == {"root.model.layers.0.mlp.gate_proj"}
    o_proj = [r for r in result.compared if r.torch_module == "root.model.layers.0.self_attn.o_proj"]
    assert {r.atb_op for r in o_proj} == {"1_DecoderLayer/5_LinearParallelOperation"}


@pytest.mark.parametrize("kind,world", MODELS, ids=[f"{k}-tp{w}" for k, w in MODELS])
def test_five_percent_error_in_one_shard_is_the_first_divergence_with_its_rank(goldens, tmp_path, kind, world):
    bad_rank = world - 1
    my, _ = _mirror(goldens, tmp_path, kind, world, faults={f"root.model.layers.1.mlp.gate_proj@{bad_rank}": 1.05})
    result = compare_dumps(goldens[kind], my)
    first = result.first_divergence
    assert first is not None and first.torch_module == "root.model.layers.1.mlp.gate_proj"
    assert first.rank == "merged"
    assert f"rank {bad_rank}'s shard ({bad_rank}_{5000 + bad_rank}) carries" in first.reason
    assert f"in rank {bad_rank}'s shard" in result.failure_message()


def test_one_bad_shard_of_eight_is_not_averaged_away(goldens, tmp_path):
    # the merged distance is 0.05 / sqrt(8) = 0.018, under bf16's 0.02: the shard's own distance is what breaches
    my, _ = _mirror(goldens, tmp_path, "llama", 8, faults={"root.model.layers.1.mlp.up_proj@3": 1.05})
    result = compare_dumps(goldens["llama"], my)
    first = result.first_divergence
    assert first is not None and first.torch_module == "root.model.layers.1.mlp.up_proj"
    assert first.metric("relative_euclidean_distance") < 0.02
    assert any(b.where == "in rank 3's shard" for b in first.breaches)


def test_replicated_tensor_that_differs_between_ranks_is_a_finding(goldens, tmp_path):
    # rank 1's copy is 1 % off: within bf16's 2 % of the golden on each rank, but the ranks disagree
    my, _ = _mirror(goldens, tmp_path, "llama", 2, faults={"root.model.layers.0.post_attention_layernorm@1": 1.01})
    result = compare_dumps(goldens["llama"], my)
    per_rank = [r for r in result.compared if r.torch_module == "root.model.layers.0.post_attention_layernorm"
                and r.rank not in ("consistency",)]
    assert per_rank and all(r.passed for r in per_rank)
    first = result.first_divergence
    assert first is not None and first.rank == "consistency"
    assert first.torch_module == "root.model.layers.0.post_attention_layernorm"
    assert "differs between ranks: rank 1 vs rank 0" in first.reason


def test_a_rank_dir_gives_the_whole_run_and_the_csv_names_the_rank_files(goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "qwen2", 2)
    result = run_compare(goldens["qwen2"].root, my / "tensors" / "1_5001", output_dir=tmp_path)
    assert result.passed
    text = result.csv_path.read_text()
    q_rank0 = my / "tensors" / "0_5000" / "0" / "1_DecoderLayer" / "1_LinearOperation" / "after" / "outtensor0.bin"
    q_rank1 = str(q_rank0).replace("0_5000", "1_5001")
    assert f"{q_rank0};{q_rank1}" in text
    assert ",merged," in text


def test_a_rank_that_died_is_one_row_and_the_rest_is_compared(goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "llama", 4, ranks=[0, 2, 3])
    result = compare_dumps(goldens["llama"], my)
    problems = [r.reason for r in result.rows if r.status == "unpaired" and r.token_id is None
                and r.reason.startswith("rank 1 of 4: no readable rank dir")]
    assert len(problems) == 1 and str(my / "tensors") in problems[0]
    replicated = [r for r in result.compared if r.torch_module == "root.model.layers.0.input_layernorm"]
    assert len(replicated) == 2 * 3 and all(r.passed for r in replicated)  # 2 tokens x the 3 ranks left


def test_a_rank_without_topology_is_one_row_and_its_replicated_ops_are_compared_on_the_others(goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "qwen2", 2)
    shutil.rmtree(my / "model" / "5001")
    shutil.rmtree(my / "layer" / "5001")
    result = compare_dumps(goldens["qwen2"], my)
    lines = [r.reason for r in result.rows if r.status == "unpaired" and r.token_id is None and not r.atb_op
             and not r.torch_module]
    assert any(line.startswith(f"rank dir {my / 'tensors' / '1_5001'}: not compared") for line in lines), lines
    norms = [r for r in result.compared if r.torch_module == "root.model.layers.0.input_layernorm"]
    assert {r.rank for r in norms} == {"0_5000"} and all(r.passed for r in norms)
    q = [u for u in result.unpaired if u.name == "1_DecoderLayer/1_LinearOperation"]
    assert q and "tensor parallel" in q[0].reason  # a shard alone cannot be compared: said, not guessed


def test_a_rank_cut_short_is_one_row_naming_rank_and_folder(goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "llama", 2)
    shutil.rmtree(my / "tensors" / "1_5001" / "1" / "3_DecoderLayer")  # rank 1 died during token 1's layer 2
    shutil.rmtree(my / "tensors" / "1_5001" / "1" / "4_RmsNormOperation")
    shutil.rmtree(my / "tensors" / "1_5001" / "1" / "5_LinearOperation")
    result = compare_dumps(goldens["llama"], my)
    cut = [r for r in result.rows if r.token_id == 1 and r.atb_op == "3_DecoderLayer/1_LinearOperation"]
    assert len(cut) == 1 and cut[0].passed is False
    assert f"rank 1 ({my / 'tensors' / '1_5001' / '1'}): no output tensor" in cut[0].reason
    assert all(r.passed for r in result.compared if r.token_id == 0)


def test_ranks_with_different_token_sets_say_which_rank_lacks_which_token(goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "qwen2", 2)
    shutil.rmtree(my / "tensors" / "0_5000" / "1")
    result = compare_dumps(goldens["qwen2"], my)
    lines = [r.reason for r in result.rows if r.status == "unpaired" and r.token_id == 1 and not r.atb_op]
    assert any("token 1: missing on" in line and "0_5000" in line for line in lines)
    assert all(r.passed for r in result.compared if r.token_id == 0)


def test_a_shard_fitting_no_split_is_unpaired_with_the_reason(goldens, tmp_path):
    import torch

    from pytest_ait_llm.formats.atb_bin import write_bin

    my, _ = _mirror(goldens, tmp_path, "llama", 2)
    for rank in ("0_5000", "1_5001"):  # the q projection's shards came out 24 wide instead of 32
        for token in ("0", "1"):
            path = my / "tensors" / rank / token / "2_DecoderLayer" / "1_LinearOperation" / "after" / "outtensor0.bin"
            write_bin(path, torch.ones(1, 8 if token == "0" else 1, 24, dtype=torch.bfloat16))
    result = compare_dumps(goldens["llama"], my)
    unpaired = [u for u in result.unpaired if u.name == "2_DecoderLayer/1_LinearOperation"]
    assert len(unpaired) == 1 and "concatenate along no dim" in unpaired[0].reason
    # the rest of that layer, and the other layers, are compared
    assert [r for r in result.compared if r.torch_module == "root.model.layers.1.mlp.gate_proj"]
    assert [r for r in result.compared if r.torch_module == "root.model.layers.2.self_attn.q_proj"]


def test_per_rank_comparison_checks_that_ranks_shards_and_replicated_ops(goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "qwen2", 2, faults={"root.model.layers.1.mlp.gate_proj@1": 1.05})
    rank0 = compare_dumps(goldens["qwen2"], my, ranks=["0_5000"])
    rank1 = compare_dumps(goldens["qwen2"], my, ranks=[1])  # a device id works too
    assert rank0.passed
    assert not rank1.passed
    assert rank1.first_divergence.torch_module == "root.model.layers.1.mlp.gate_proj"
    assert {r.rank for r in rank1.compared} == {"1_5001"}
    assert rank1.first_divergence.my_path.endswith("1_5001/0/2_DecoderLayer/8_MlpGateLayerV2/0_LinearOperation/"
                                                   "after/outtensor0.bin")


def test_tp_golden_is_compared_rank_to_rank(goldens, tmp_path):
    """A golden dumped from a TP torch run (one rank dir per rank, shards on the split modules) is paired with the
    ATB run rank by rank."""
    import torch

    golden = goldens["llama"]
    my, truth = _mirror(goldens, tmp_path, "llama", 2)
    split = {module for module, kind in truth.values() if kind == "split"} | {
        f"root.model.layers.{i}.mlp.act_fn" for i in range(LAYERS)}
    for rank in range(2):
        dest = tmp_path / "golden_tp" / f"{700 + rank}_npu{rank}"
        shutil.copytree(golden.root, dest)
        for path in dest.rglob("output*.pth"):
            if path.parent.name in split:
                t = torch.load(path, weights_only=True)
                width = t.shape[-1] // 2
                torch.save(t[..., rank * width:(rank + 1) * width].clone(), path)
    result = compare_dumps(tmp_path / "golden_tp", my)
    assert result.passed, result.failure_message()
    assert pairing_quality(result, truth) == (1.0, 1.0)
    q = [r for r in result.compared if r.atb_op == "1_DecoderLayer/1_LinearOperation" and r.token_id == 0]
    assert [(r.rank, Path(r.golden_path).parents[2].name) for r in q] == [("0_5000", "700_npu0"), ("1_5001", "701_npu1")]

    bad, _ = write_tp_mirror(golden, tmp_path / "bad", num_layers=LAYERS, world=2,
                             faults={"root.model.layers.2.mlp.down_proj@0": 1.05})
    first = compare_dumps(tmp_path / "golden_tp", bad).first_divergence
    assert (first.torch_module, first.rank) == ("root.model.layers.2.mlp.down_proj", "0_5000")


PLUGIN_TEST = '''
def test_port(torch_dump, atb_dump, compare_ops):
    result = compare_ops(torch_dump, atb_dump)
    assert any(row.rank == "merged" for row in result.compared)


def test_piece(torch_dump, atb_dump, compare_ops, ait_rank):
    result = compare_ops(torch_dump, atb_dump, ranks=[ait_rank])
    assert {row.rank for row in result.compared} == {ait_rank}
'''


def test_plugin_compares_ranks_merged_by_default_and_per_rank_with_ait_rank(pytester, goldens, tmp_path):
    my, _ = _mirror(goldens, tmp_path, "qwen2", 2, faults={"root.model.layers.2.mlp.up_proj@1": 1.05})
    pytester.makepyfile(test_port=PLUGIN_TEST)
    result = pytester.runpytest("-v", f"--ait-golden-path={goldens['qwen2'].root}", f"--ait-my-path={my}",
                                "--ait-output=out", "--html=report.html")
    result.assert_outcomes(passed=1, failed=2)  # merged and rank 1 fail, rank 0 passes
    out = result.stdout.str()
    assert re.search(r"test_piece\[rank0_5000\] PASSED", out)
    assert re.search(r"test_piece\[rank1_5001\] FAILED", out)
    assert "rank 1's shard (1_5001) carries" in out
    assert "root.model.layers.2.mlp.up_proj (Linear), token 0 [merged]" in out  # the first line says which rank
    from html import unescape

    report = unescape((pytester.path / "report.html").read_text())  # pytest-html keeps extras as escaped JSON
    assert "first divergence: 3_DecoderLayer/8_MlpGateLayerV2/1_LinearOperation" in report and "[merged]" in report


def test_html_worst_ops_table_shows_each_rows_rank(goldens, tmp_path):
    from pytest_ait_llm.report.html import report_fragment

    my, _ = _mirror(goldens, tmp_path, "llama", 2, faults={"root.model.layers.0.mlp.up_proj@0": 1.05})
    fragment = report_fragment(compare_dumps(goldens["llama"], my))
    assert "(token 0) [merged]" in fragment  # the summary line
    assert "0<br><small>merged</small>" in fragment and "<small>1_5001</small>" in fragment


def test_cli_given_one_rank_dir_compares_the_whole_run_merged(goldens, tmp_path):
    import subprocess
    import sys

    my, _ = _mirror(goldens, tmp_path, "qwen2", 4, faults={"root.model.layers.0.mlp.gate_proj@2": 1.05})
    proc = subprocess.run([sys.executable, "-m", "pytest_ait_llm", "compare", "-gp", str(goldens["qwen2"].root),
                           "-mp", str(my / "tensors" / "2_5002"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    first = next(line for line in proc.stdout.splitlines() if line.startswith("first divergence:"))
    assert "root.model.layers.0.mlp.gate_proj (token 0) [merged]" in first
    assert "rank 2's shard (2_5002) carries" in first
    assert "Traceback" not in proc.stderr
