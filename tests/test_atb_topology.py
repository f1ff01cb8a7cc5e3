"""ATB topology JSON: the real Bloom sample parses into the folders ATB writes, bad files fail with a JSON path."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pytest_ait_llm.errors import FormatError
from pytest_ait_llm.formats.atb_topology import (
    MAX_DEPTH,
    combine_topologies,
    load_topology,
    parse_topology,
    topology_to_json,
)

SAMPLE = Path(__file__).parent / "data/ait-sample/Bloom7BFlashAttentionModel.json"


@pytest.fixture(scope="module")
def bloom():
    return load_topology(SAMPLE)


@pytest.fixture
def bloom_json():
    return json.loads(SAMPLE.read_text())


def _count_nodes(nodes):
    return sum(1 + _count_nodes(n.get("nodes", [])) for n in nodes)


def test_sample_has_every_node_once(bloom, bloom_json):
    ops = list(bloom.walk())
    assert bloom.model_name == "Bloom7BFlashAttentionModel"
    assert len(ops) == _count_nodes(bloom_json["nodes"]) == 21
    assert len({op.op_name for op in ops}) == 21
    assert bloom.path == SAMPLE


def test_folder_paths_follow_the_atb_rule(bloom):
    assert bloom.find("Bloom7bCommonLayer_3").rel_dir == "3_BloomLayer"
    assert bloom.find("LinearOperation_3_4_0").rel_dir == "3_BloomLayer/4_ParallelLinearBaseV2/0_LinearOperation"
    assert bloom.find("ElewiseOperation_3_10").rel_dir == "3_BloomLayer/10_ElewiseOperation"
    assert (bloom.find("ElewiseOperation_3_7_2_1").rel_dir
            == "3_BloomLayer/7_MlpGateLayerV2/2_ParallelLinearBaseV2/1_ElewiseOperation")
    assert bloom.find("NoSuchOperation_1") is None


def test_order_is_pre_order_execution_order(bloom):
    ops = list(bloom.walk())
    assert [op.order for op in ops] == list(range(21))
    names = [op.op_name for op in ops]
    assert names.index("ParallelLinearBaseV2_3_4") < names.index("LinearOperation_3_4_0") \
        < names.index("ElewiseOperation_3_4_1") < names.index("ElewiseOperation_3_5")


def test_tree_links_params_and_tensors(bloom):
    layer = bloom.ops[0]
    assert layer.parent is None and layer.depth == 0 and not layer.is_leaf
    assert layer.param is None  # absent on the sample's layer node
    assert len(layer.children) == 11 and all(c.parent is layer for c in layer.children)
    linear = bloom.find("LinearOperation_3_4_0")
    assert linear.is_leaf and linear.depth == 2 and linear.parent.op_name == "ParallelLinearBaseV2_3_4"
    assert linear.param["hasBias"] is False
    assert bloom.find("ParallelLinearBaseV2_3_4").param == ""
    assert bloom.find("ElewiseOperation_3_4_1").param["elewiseType"] == 8
    assert "Bloom7BFlashAttentionModel_input_1" in layer.in_tensors
    assert layer.internal_tensors[0] == "Bloom7bCommonLayer_3_internal_0"


def test_same_type_siblings_are_numbered(bloom):
    norms = [op for op in bloom.ops[0].children if op.op_type == "LayerNormOperation"]
    assert [(op.type_index, op.type_count) for op in norms] == [(0, 2), (1, 2)]


def test_top_level_without_numeric_suffix_uses_sibling_index():
    topo = parse_topology({"modelName": "m", "nodes": [
        {"opName": "Embedding", "opType": "GatherOperation"},
        {"opName": "Layer_7", "opType": "DecoderLayer", "nodes": [{"opName": "x", "opType": "RmsNormOperation"}]},
    ]})
    assert [op.rel_dir for op in topo.walk()] == ["0_GatherOperation", "7_DecoderLayer",
                                                   "7_DecoderLayer/0_RmsNormOperation"]


def test_layer_file_holding_one_node_parses(bloom_json):
    layer = parse_topology(bloom_json["nodes"][0], "layer/1/Bloom7bCommonLayer_3.json")
    assert layer.model_name == "Bloom7bCommonLayer_3"
    assert layer.find("LinearOperation_3_4_0").rel_dir == "3_BloomLayer/4_ParallelLinearBaseV2/0_LinearOperation"


def test_json_round_trip_and_combination(bloom):
    again = parse_topology(topology_to_json(bloom))
    assert [(o.op_name, o.rel_dir, o.param) for o in again.walk()] == \
        [(o.op_name, o.rel_dir, o.param) for o in bloom.walk()]
    both = combine_topologies("two", [bloom, bloom])
    assert len(both) == 42 and [op.order for op in both.walk()] == list(range(42))
    assert bloom.ops[0].order == 0  # the inputs are untouched


def _error(obj, tmp_path: Path) -> str:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(FormatError) as info:
        load_topology(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_optype_names_the_json_path(bloom_json, tmp_path):
    del bloom_json["nodes"][0]["nodes"][7]["nodes"][1]["opType"]
    assert "nodes[0].nodes[7].nodes[1]: opType missing" in _error(bloom_json, tmp_path)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["nodes"][0]["nodes"][3].update(opName=5), "nodes[0].nodes[3]: opName must be a non-empty string"),
    (lambda d: d["nodes"][0]["nodes"][2].update(param=[1]), "nodes[0].nodes[2]: param must be an object or a string"),
    (lambda d: d["nodes"][0].update(nodes={"a": 1}), "nodes[0]: nodes must be a list"),
    (lambda d: d["nodes"][0]["nodes"][1]["inTensors"].append(3), "nodes[0].nodes[1].inTensors[3]: expected a string"),
    (lambda d: d["nodes"][0]["nodes"].append("oops"), "nodes[0].nodes[11]: expected an object"),
    (lambda d: d["nodes"][0].update(opType="../evil"), "cannot be a folder name"),
    (lambda d: d.pop("nodes"), "nodes missing"),
    (lambda d: d.update(modelName=["x"]), "modelName: expected a string"),
])
def test_schema_errors(bloom_json, tmp_path, mutate, fragment):
    mutate(bloom_json)
    assert fragment in _error(bloom_json, tmp_path)


def test_top_level_must_be_an_object(tmp_path):
    assert "top level must be a JSON object" in _error([1, 2], tmp_path)


def test_bad_json_and_bad_bytes(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"modelName": "m", "nodes": [')
    with pytest.raises(FormatError, match=r"broken.json: invalid JSON at line 1"):
        load_topology(broken)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"modelName": "\xff"}')
    with pytest.raises(FormatError, match="not UTF-8"):
        load_topology(binary)
    with pytest.raises(FormatError, match="no such file"):
        load_topology(tmp_path / "absent.json")


def test_depth_is_bounded(tmp_path):
    node = {"opName": "Leaf_0", "opType": "LeafOperation"}
    for i in range(MAX_DEPTH + 5):
        node = {"opName": f"G_{i}", "opType": "GraphOp", "nodes": [node]}
    message = _error({"modelName": "deep", "nodes": [node]}, tmp_path)
    assert f"deeper than {MAX_DEPTH}" in message


def test_absurd_json_nesting_is_a_format_error(tmp_path):
    path = tmp_path / "nested.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FormatError):
        load_topology(path)


def test_parse_does_not_modify_its_input(bloom_json):
    before = copy.deepcopy(bloom_json)
    parse_topology(bloom_json)
    assert bloom_json == before
