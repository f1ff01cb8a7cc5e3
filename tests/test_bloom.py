"""The engine on a real HF Bloom against a bf16 mirror with the real Bloom ATB topology (tests/bloom_mirror.py).

Two pairing claims, with real tensors:
- ATB's ParallelLinearBaseV2 is a bias-less Linear plus an Elewise add of a ``*_weight_*`` bias: the torch Linear
  (which includes its bias) is compared with the add's output; the residual adds (of activations) are not folded.
- HF ``BloomMLP`` and ``BloomAttention`` return their output plus the residual; ATB's MlpGateLayerV2 (and the
  attention's last Linear) do not: each module is compared with the residual add after its computation, found by
  dataflow, and agrees; a real fault inside the MLP is still the first divergence.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bloom_mirror import write_mirror
from hf_models import input_ids, tiny_bloom
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
from pytest_ait_llm.formats.atb_bin import read_bin
from pytest_ait_llm.formats.atb_layout import open_atb_dump
from pytest_ait_llm.formats.torch_layout import open_torch_dump

LAYERS = 3
FIRST_LAYER_DIR = 2  # top-level ids 0 and 1 are the word embedding and its LayerNorm
LINEARS_WITH_BIAS_ADD = ("self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
FAULTY = "root.transformer.h.1.mlp.dense_4h_to_h"
SAMPLE = Path(__file__).parent / "data/ait-sample/Bloom7BFlashAttentionModel.json"
SUSPECT = "mapping_suspect"


def _bloom_with_live_biases():
    """A tiny Bloom whose biases and LayerNorm affine parameters are not the HF init (zeros and ones).

    With zero biases "Linear minus its bias" equals the Linear, and folding the bias add would prove nothing.
    """
    model = tiny_bloom(num_layers=LAYERS, hidden=64)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "layernorm" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def model():
    return _bloom_with_live_biases()


@pytest.fixture(scope="module")
def golden(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    with register_hook(model, DumpConfig(dump_path=out, token_range=(0,))) as handle, torch.no_grad():
        model(input_ids(seq=8))
    return open_torch_dump(handle.dump_dir)


@pytest.fixture(scope="module")
def healthy(golden, model, tmp_path_factory):
    return write_mirror(golden, model, tmp_path_factory.mktemp("healthy"))


@pytest.fixture(scope="module")
def healthy_result(golden, healthy, tmp_path_factory):
    return run_compare(golden, healthy[0], output_dir=tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def faulty_result(golden, model, tmp_path_factory):
    root, _ = write_mirror(golden, model, tmp_path_factory.mktemp("faulty"), faults={FAULTY: 1.05})
    return run_compare(golden, root, write_csv=False)


def _row(result, module: str):
    (row,) = [r for r in result.rows if r.torch_module == module and r.status != "unpaired"]
    return row


def _load(path) -> torch.Tensor:
    path = Path(path)
    if path.suffix == ".bin":
        return torch.from_numpy(read_bin(path).to_float64().reshape(-1))
    return torch.load(path, weights_only=True).double().reshape(-1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _without_tiny_model_params(node: dict) -> dict:
    """The node with the params the mirror adapts to the tiny model (head count/size, LayerNorm epsilon) removed."""
    node = json.loads(json.dumps(node))
    stack = [node]
    while stack:
        n = stack.pop()
        if n["opType"] in ("SelfAttentionOperation", "LayerNormOperation"):
            n.pop("param")
        stack.extend(n.get("nodes", []))
    return node


def test_mirror_layer_is_the_real_bloom_layer(healthy):
    root, _ = healthy
    (model_json,) = (root / "model").glob("*/Bloom7BFlashAttentionModel.json")
    nodes = {n["opName"]: n for n in json.loads(model_json.read_text())["nodes"]}
    (sample,) = json.loads(SAMPLE.read_text())["nodes"]
    # layer k=1 sits where the sample's layer sits (top-level id 3), so it keeps every name of the sample
    assert _without_tiny_model_params(nodes["Bloom7bCommonLayer_3"]) == _without_tiny_model_params(sample)
    assert list(nodes)[:2] == ["GatherOperation_0", "LayerNormOperation_1"]


def test_healthy_bf16_bloom_passes_with_no_breach(healthy_result):
    assert healthy_result.passed, healthy_result.failure_message()
    assert healthy_result.breaches == []
    assert healthy_result.first_divergence is None


def test_every_module_backed_op_is_paired_with_its_module(healthy_result, healthy):
    root, truth = healthy
    paired = {(r.atb_op, r.torch_module) for r in healthy_result.rows if r.status in ("compared", SUSPECT)}
    assert paired == set(truth.items())
    # and every other ATB op is listed as unpaired: nothing silent
    (rank,) = open_atb_dump(root).ranks
    unpaired = {r.atb_op for r in healthy_result.rows if r.status == "unpaired" and r.atb_op}
    assert unpaired | set(truth) == {op.rel_dir for op in rank.topology().walk()}
    assert not unpaired & set(truth)


@pytest.mark.parametrize("linear", LINEARS_WITH_BIAS_ADD)
def test_linear_is_compared_through_its_bias_add(healthy_result, linear):
    rows = [_row(healthy_result, f"root.transformer.h.{k}.{linear}") for k in range(LAYERS)]
    for row in rows:
        my_path = Path(row.my_path)
        # paired op: the bias-less Linear; tensor read: the outtensor of the Elewise add after it
        assert row.atb_op.endswith("_ParallelLinearBaseV2/0_LinearOperation")
        assert my_path.parent.parent.name == "1_ElewiseOperation"
        assert my_path.parent.parent.parent.name.endswith("_ParallelLinearBaseV2")
        assert row.metric("cosine_similarity") > 0.999 and row.passed
        assert "bias add" in row.note
        # the fold is what makes it agree: the Linear's own output (before the bias) does not
        own = my_path.parents[2] / "0_LinearOperation" / "after" / "outtensor0.bin"
        assert _cos(_load(row.golden_path), _load(own)) < 0.99
    # the CSV a user reads says the same
    with open(healthy_result.csv_path, newline="") as fh:
        csv_rows = {r["torch_module"]: r for r in csv.DictReader(fh) if r["status"] == "compared"}
    for row in rows:
        assert Path(csv_rows[row.torch_module]["my_data_path"]).parent.parent.name == "1_ElewiseOperation"
    # the weight adds are accounted for as folded, not as unmapped ops
    adds = [r for r in healthy_result.rows if r.status == "unpaired"
            and r.atb_op in {str(Path(x.atb_op).parent / "1_ElewiseOperation") for x in rows}]
    assert len(adds) == LAYERS and all("bias add folded" in r.reason for r in adds)


def test_residual_adds_are_not_folded_and_hold_the_residual_inclusive_modules(healthy_result):
    for k in range(LAYERS):
        d = f"{FIRST_LAYER_DIR + k}_BloomLayer"
        attention = _row(healthy_result, f"root.transformer.h.{k}.self_attention")
        assert attention.atb_op == f"{d}/5_ElewiseOperation" and Path(attention.my_path).parts[-3] == "5_ElewiseOperation"
        mlp = _row(healthy_result, f"root.transformer.h.{k}.mlp")
        assert mlp.atb_op == f"{d}/7_MlpGateLayerV2" and Path(mlp.my_path).parts[-3] == "8_ElewiseOperation"
        (add,) = [r for r in healthy_result.rows if r.atb_op == f"{d}/8_ElewiseOperation"]
        assert add.status == "unpaired" and "compared as root.transformer.h" in add.reason
    assert not any("bias add" in r.reason for r in healthy_result.rows if r.atb_op.endswith(("5_ElewiseOperation", "8_ElewiseOperation")))


@pytest.mark.parametrize("module", ["mlp", "self_attention"])
def test_residual_inclusive_module_is_compared_with_the_residual_sum(healthy_result, module):
    for k in range(LAYERS):
        row = _row(healthy_result, f"root.transformer.h.{k}.{module}")
        assert row.status == "compared" and row.passed, row
        assert row.metric("cosine_similarity") > 0.999
        assert "plus the residual" in row.note
        # without the residual the ATB computation's output is far from what the module returns
        computed = Path(row.my_path).parents[2] / ("7_MlpGateLayerV2" if module == "mlp" else "4_ParallelLinearBaseV2")
        assert _cos(_load(row.golden_path), _load(computed / "after" / "outtensor0.bin")) < 0.9
    assert healthy_result.passed and SUSPECT not in {r.status for r in healthy_result.rows}


def test_fault_inside_the_mlp_is_the_first_divergence(faulty_result):
    assert not faulty_result.passed
    first = faulty_result.first_divergence
    assert (first.torch_module, first.token_id) == (FAULTY, 0)
    assert first.atb_op == "3_BloomLayer/7_MlpGateLayerV2/2_ParallelLinearBaseV2/0_LinearOperation"
    assert any(b.metric == "relative_euclidean_distance" for b in first.breaches)
    assert FAULTY in faulty_result.failure_message()
    # the mirror's unit fault does not reach the residual sum, which is what the MLP pairs compare: they pass
    assert all(_row(faulty_result, f"root.transformer.h.{k}.mlp").passed for k in range(LAYERS))
    assert [r.first_divergence for r in faulty_result.rows].count(True) == 1
    assert np.isclose(first.metric("relative_euclidean_distance"), 0.05, atol=0.005)


def test_fault_in_the_residual_add_after_the_mlp_does_not_blame_the_mlp(golden, model, tmp_path):
    # Bloom7BFlashAttentionModel_internal_3 is what layer 1's second residual add (3_BloomLayer/8_ElewiseOperation)
    # writes; its consumers read the faulty value too
    root, _ = write_mirror(golden, model, tmp_path, faults={"Bloom7BFlashAttentionModel_internal_3": 1.05})
    result = run_compare(golden, root, write_csv=False)
    assert _row(result, "root.transformer.h.1.mlp.dense_4h_to_h").passed  # the MLP computed the right thing
    first = result.first_divergence
    # the MLP pair reads that add's output; today's engine takes a graph op whose output is a part's and whose
    # parts pass for a mapping question, so the layer output (the same tensor) is named
    assert first is not None and first.torch_module == "root.transformer.h.1"
    assert _row(result, "root.transformer.h.1.mlp").status == SUSPECT
