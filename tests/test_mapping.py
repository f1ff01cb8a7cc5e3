"""Op mapping rules and pairing, on the real Bloom-7B topology and its torch module tree."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from pytest_ait_llm.errors import MappingError
from pytest_ait_llm.formats.atb_topology import load_topology, parse_topology
from pytest_ait_llm.formats.torch_layout import load_model_tree, parse_model_tree
from pytest_ait_llm.mapping.pairing import align, atb_layers, bias_adds, pair_ops, torch_layers
from pytest_ait_llm.mapping.rules import (MappingTable, family_prefixes, load_mapping_file, mapping_table, parse_atb_side,
                                          parse_torch_side)

SAMPLE = Path(__file__).parent / "data" / "ait-sample"


@pytest.fixture(scope="module")
def bloom():
    return load_topology(SAMPLE / "Bloom7BFlashAttentionModel.json"), load_model_tree(SAMPLE / "model_tree.json")


def pairs_by_name(pairing):
    return {(p.atb.op_name, p.module.name) for p in pairing.pairs}


# ------------------------------------------------------------------------------------------------------------ rules

def test_rule_sides_parse_stems_and_keep_underscored_types():
    assert (parse_atb_side("CommonLayer_outtensor0").type, parse_atb_side("CommonLayer_outtensor0").stem) == ("CommonLayer", "outtensor0")
    assert (parse_torch_side("GLMBlock_output_0").type, parse_torch_side("GLMBlock_output_0").stem) == ("GLMBlock", "output_0")
    assert parse_torch_side("LlamaDecoderLayer_output").stem == "output"
    # the original split at the first "_" and could not express these
    assert parse_atb_side("Prefill_layer").type == "Prefill_layer" and parse_atb_side("Prefill_layer").stem is None


def test_user_mapping_file_merges_over_builtins_without_mutating_them(tmp_path):
    (tmp_path / "op_mapping_file.json").write_text(json.dumps({"LlamaLayer_outtensor0": "LlamaDecoderLayer_output",
                                                               "RopeOperation": ["RotaryEmbedding"]}))
    before = MappingTable.builtin()
    table = mapping_table(tmp_path)
    assert str(table.rules[0].atb) == "LlamaLayer_outtensor0" and str(table.rules[0].torch) == "LlamaDecoderLayer_output"
    # a string value is one type, not a list of characters (the original iterated it per character)
    assert [str(r.torch) for r in table.rules if r.atb.type == "LlamaLayer"] == ["LlamaDecoderLayer_output"]
    assert MappingTable.builtin() == before and mapping_table(None) == before


@pytest.mark.parametrize("content, named", [
    ('{"Linear Operation": "Linear"}', "'Linear Operation'"),
    ('{"LinearOperation": "Lin-ear"}', "'Lin-ear'"),
    ('{"LinearOperation": 5}', "'LinearOperation'"),
    ('{"LinearOperation": []}', "'LinearOperation'"),
    ('["LinearOperation"]', "top level"),
    ('{"LinearOperation": ', "invalid JSON"),
])
def test_invalid_mapping_file_is_an_error_naming_the_key(tmp_path, content, named):
    (tmp_path / "op_mapping_file.json").write_text(content)
    with pytest.raises(MappingError) as err:
        load_mapping_file(tmp_path)
    assert named in str(err.value) and "op_mapping_file.json" in str(err.value) and "\n" not in str(err.value)


def test_missing_mapping_file_is_an_error(tmp_path):
    with pytest.raises(MappingError, match="not found"):
        mapping_table(tmp_path)


# ---------------------------------------------------------------------------------------------------------- pairing

def test_single_layer_is_detected_on_both_sides(bloom):
    topo, tree = bloom
    assert [op.op_name for op in atb_layers(topo)] == ["Bloom7bCommonLayer_3"]
    assert [m.name for m in torch_layers(tree)] == ["root.transformer.h.2"]


def test_bias_add_is_told_from_residual_add_by_dataflow(bloom):
    topo, _ = bloom
    folded = {op.op_name: add.op_name for op in topo.walk() for k, add in bias_adds(topo).items() if id(op) == k}
    assert folded == {"LinearOperation_3_4_0": "ElewiseOperation_3_4_1",
                      "LinearOperation_3_7_0_0": "ElewiseOperation_3_7_0_1",
                      "LinearOperation_3_7_2_0": "ElewiseOperation_3_7_2_1"}
    # ElewiseOperation_3_5 adds the residual (an activation), so it is never a bias add
    assert "ElewiseOperation_3_5" not in folded.values()


def test_bloom_layer_pairs_every_module_backed_op(bloom):
    topo, tree = bloom
    pairing = pair_ops(topo, tree, mapping_table())
    assert pairs_by_name(pairing) == {
        ("Bloom7bCommonLayer_3", "root.transformer.h.2"),
        ("LayerNormOperation_3_0", "root.transformer.h.2.input_layernorm"),
        ("LinearOperation_3_1", "root.transformer.h.2.self_attention.query_key_value"),
        ("LinearOperation_3_4_0", "root.transformer.h.2.self_attention.dense"),
        # HF BloomAttention and BloomMLP return their output plus the residual: the residual adds' outputs
        ("ElewiseOperation_3_5", "root.transformer.h.2.self_attention"),
        ("LayerNormOperation_3_6", "root.transformer.h.2.post_attention_layernorm"),
        ("LinearOperation_3_7_0_0", "root.transformer.h.2.mlp.dense_h_to_4h"),
        ("LinearOperation_3_7_2_0", "root.transformer.h.2.mlp.dense_4h_to_h"),
        ("MlpGateLayerV2_3_7", "root.transformer.h.2.mlp"),
    }
    dense = next(p for p in pairing.pairs if p.atb.op_name == "LinearOperation_3_4_0")
    assert dense.files_op.op_name == "ElewiseOperation_3_4_1" and "bias add" in dense.note
    # ... their values: the MLP graph's own pair reads the residual add after it
    mlp = next(p for p in pairing.pairs if p.module.name == "root.transformer.h.2.mlp")
    assert mlp.files_op.op_name == "ElewiseOperation_3_8" and "plus the residual" in mlp.note
    attention = next(p for p in pairing.pairs if p.module.name == "root.transformer.h.2.self_attention")
    assert attention.files_op.op_name == "ElewiseOperation_3_5" and "ElewiseOperation_3_4_1" in attention.note


def test_every_op_and_module_is_accounted_for_with_a_reason(bloom):
    topo, tree = bloom
    pairing = pair_ops(topo, tree, mapping_table())
    paired_atb = {id(p.atb) for p in pairing.pairs}
    unpaired_atb = {u.name: u.reason for u in pairing.unpaired if u.side == "atb"}
    for op in topo.walk():
        assert (id(op) in paired_atb) != (op.rel_dir in unpaired_atb), op.rel_dir
    assert all(reason for reason in unpaired_atb.values())
    assert "CoreAttention" in unpaired_atb["3_BloomLayer/3_SelfAttentionOperation"]
    assert "no mapping rule" in unpaired_atb["3_BloomLayer/10_ElewiseOperation"]
    assert "folded" in unpaired_atb["3_BloomLayer/4_ParallelLinearBaseV2/1_ElewiseOperation"]
    paired_torch = {id(p.module) for p in pairing.pairs}
    unpaired_torch = {u.name for u in pairing.unpaired if u.side == "torch"}
    for m in tree.walk():
        assert (id(m) in paired_torch) != (m.name in unpaired_torch), m.name


def test_pairs_come_in_completion_order(bloom):
    topo, tree = bloom
    names = [p.atb.op_name for p in pair_ops(topo, tree, mapping_table()).pairs]
    # parts before the graph op that holds them; the layer last
    assert names.index("LinearOperation_3_7_2_0") < names.index("MlpGateLayerV2_3_7") < names.index("Bloom7bCommonLayer_3")
    assert names[0] == "LayerNormOperation_3_0"


def test_user_rule_wins_and_its_stems_are_kept(bloom, tmp_path):
    topo, tree = bloom
    (tmp_path / "op_mapping_file.json").write_text('{"SelfAttentionOperation": "BloomAttention_output_0"}')
    pairing = pair_ops(topo, tree, mapping_table(tmp_path))
    attn = next(p for p in pairing.pairs if p.atb.op_name == "SelfAttentionOperation_3_3")
    assert attn.module.name == "root.transformer.h.2.self_attention" and attn.torch_stem == "output_0"


# -------------------------------------------------------------------------------------- counts differ: use shapes

def _linear(name, i):
    return {"opName": f"LinearOperation_1_{i}", "opType": "LinearOperation", "param": {"hasBias": True},
            "inTensors": [f"M_internal_{i}", f"M_weight_{i}"], "outTensors": [f"M_internal_{i + 1}"]}


def _model(n_linear):
    layer = {"opName": "Layer_1", "opType": "MyLayer", "param": "", "inTensors": ["M_input_0"],
             "outTensors": [f"M_internal_{n_linear}"], "nodes": [_linear("l", i) for i in range(n_linear)]}
    return parse_topology({"modelName": "M", "nodes": [layer]})


def _tree(n_linear):
    return parse_model_tree({"name": "root", "type": "Block", "children": [
        {"name": f"root.fc{i}", "type": "Linear", "children": []} for i in range(n_linear)]})


def test_count_mismatch_is_resolved_by_shapes_not_skipped():
    topo, tree = _model(3), _tree(2)
    # ATB op 1 has no torch counterpart: its shape fits neither module
    shapes_atb = {"LinearOperation_1_0": (4, 8), "LinearOperation_1_1": (4, 5), "LinearOperation_1_2": (4, 16)}
    shapes_torch = {"root.fc0": (4, 8), "root.fc1": (4, 16)}

    def compatible(pair):
        if pair.atb.op_type != "LinearOperation":
            return None
        return shapes_atb[pair.atb.op_name] == shapes_torch[pair.module.name]

    pairing = pair_ops(topo, tree, mapping_table(), compatible)
    assert {(a, t) for a, t in pairs_by_name(pairing) if a.startswith("Linear")} == {
        ("LinearOperation_1_0", "root.fc0"), ("LinearOperation_1_2", "root.fc1")}
    lonely = next(u for u in pairing.unpaired if u.name.endswith("1_LinearOperation"))
    assert "no shape-compatible" in lonely.reason


def test_two_equally_good_alignments_are_reported_as_ambiguous_not_guessed():
    topo, tree = _model(3), _tree(2)
    pairing = pair_ops(topo, tree, mapping_table(), lambda pair: None if pair.atb.op_type != "LinearOperation" else True)
    linear_pairs = [p for p in pairing.pairs if p.atb.op_type == "LinearOperation"]
    reasons = [u.reason for u in pairing.unpaired if u.op_type == "LinearOperation"]
    assert not linear_pairs
    assert reasons and all("ambiguous" in r for r in reasons)


def test_align_keeps_only_pairs_common_to_every_optimal_alignment():
    pairs, amb_a, amb_t = align(3, 2, lambda i, j: (i, j) in {(0, 0), (1, 1), (2, 1)})
    assert pairs == [(0, 0)] and amb_a == {1, 2} and amb_t == {1}


def test_layer_count_mismatch_is_reported_per_op():
    layer = lambda i: {"opName": f"L_{i}", "opType": "MyLayer", "param": "", "inTensors": [], "outTensors": [],
                       "nodes": [{"opName": f"LinearOperation_{i}_0", "opType": "LinearOperation", "param": {},
                                  "inTensors": [], "outTensors": []}]}
    topo = parse_topology({"modelName": "M", "nodes": [layer(i) for i in range(3)]})
    tree = parse_model_tree({"name": "root", "type": "M", "children": [{"name": "root.layers", "type": "ModuleList", "children": [
        {"name": f"root.layers.{i}", "type": "Block", "children": [{"name": f"root.layers.{i}.fc", "type": "Linear", "children": []}]}
        for i in range(2)]}]})
    pairing = pair_ops(topo, tree, mapping_table())
    assert len(pairing.atb_layers) == 3 and len(pairing.torch_layers) == 2
    assert sum(1 for p in pairing.pairs if p.atb.op_type == "LinearOperation") == 2
    extra = [u for u in pairing.unpaired if u.name.startswith("2_MyLayer")]
    assert extra and all("layer count differs" in u.reason for u in extra)


def _brute_force_align(n, m, ok):
    """Every optimal alignment, enumerated: (pairs common to all, ambiguous ATB, ambiguous torch)."""
    cells = [(i, j) for i in range(n) for j in range(m) if ok(i, j)]
    best: list[list[tuple[int, int]]] = [[]]

    def extend(start, last, chosen):
        if len(chosen) > len(best[0]):
            best[:] = [list(chosen)]
        elif len(chosen) == len(best[0]) and chosen:
            best.append(list(chosen))
        for k in range(start, len(cells)):
            if cells[k][0] > last[0] and cells[k][1] > last[1]:
                extend(k + 1, cells[k], chosen + [cells[k]])

    extend(0, (-1, -1), [])
    common = set(best[0]).intersection(*map(set, best))
    ambiguous = set().union(*map(set, best)) - common
    return sorted(common), {i for i, _ in ambiguous}, {j for _, j in ambiguous}


def test_align_agrees_with_enumerating_every_alignment():
    rng = random.Random(3)
    for _ in range(1500):
        n, m, density = rng.randint(0, 6), rng.randint(0, 6), rng.random()
        fits = [[rng.random() < density for _ in range(m)] for _ in range(n)]
        pairs, amb_a, amb_t = align(n, m, lambda i, j: fits[i][j])
        assert (sorted(pairs), amb_a, amb_t) == _brute_force_align(n, m, lambda i, j: fits[i][j]), fits


# ------------------------------------------------------------------------------- large inputs (bench_pairing.py)

def _bench():
    spec = importlib.util.spec_from_file_location("bench_pairing", Path(__file__).parent.parent / "bench" / "bench_pairing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_400_linear_ops_against_401_modules_pair_by_shape_and_leave_the_router():
    text, tree, compatible = _bench().linear_layer(400)
    asked = []
    pairing = pair_ops(parse_topology(json.loads(text)), tree, mapping_table(),
                       lambda pair: asked.append(pair) or compatible(pair))
    linear = {(p.atb.op_name, p.module.name) for p in pairing.pairs if p.rule != "layer"}
    assert linear == {(f"LinearOperation_1_{k}", f"root.layers.0.expert{k}_proj") for k in range(400)}
    (router,) = [u for u in pairing.unpaired if u.side == "torch" and u.name.endswith("router")]
    assert "no shape-compatible" in router.reason
    assert len(asked) < 20 * 401  # a band around the diagonal was asked, not the 160k candidate pairs


def test_align_beyond_the_cell_limit_is_refused_with_the_reason(monkeypatch):
    from pytest_ait_llm.mapping import pairing as pairing_module

    monkeypatch.setattr(pairing_module, "MAX_ALIGN_CELLS", 1000)
    text, tree, compatible = _bench().linear_layer(400)
    pairing = pair_ops(parse_topology(json.loads(text)), tree, mapping_table(), compatible)
    assert not [p for p in pairing.pairs if p.rule != "layer"]
    reasons = {u.reason for u in pairing.unpaired if u.op_type in ("LinearOperation", "Linear")}
    assert len(reasons) == 1 and "need more than 1000 comparisons" in reasons.pop()


def test_200k_rule_mapping_file_pairs_as_the_rules_say(tmp_path):
    bench = _bench()
    bench.huge_mapping_file(tmp_path)
    table = mapping_table(tmp_path)
    assert len(table.rules) == 200_000 + len(MappingTable.builtin().rules)
    text, tree, compatible = bench.linear_layer(400)
    pairing = pair_ops(parse_topology(json.loads(text)), tree, table, compatible)
    (layer,) = [p for p in pairing.pairs if p.atb.op_name == "MoeLayer_1"]
    assert layer.module.name == "root.layers.0" and layer.rule == "MoeLayer_outtensor0 -> MoeDecoderLayer_output"
    assert sum(p.atb.op_type == "LinearOperation" for p in pairing.pairs) == 400
    assert [r.source for r in table.rules_for_atb("CustomFusedOp77Operation")] == [str(tmp_path / "op_mapping_file.json")]


# ------------------------------------------------------------------------------------------- type name matching

def test_rule_types_match_whole_names_or_behind_the_model_family():
    table = MappingTable.builtin()
    families = family_prefixes(["LlamaForCausalLM", "LlamaDecoderLayer"])
    assert families == {"Llama"}
    matched = lambda module_type: {str(table.rules[i].atb) for i in table.torch_rule_indices(module_type, families)}
    assert matched("Embedding") == {"GatherOperation", "WordEmbedding"}
    assert matched("LlamaRotaryEmbedding") == set() and matched("RotaryEmbedding") == set()
    assert matched("LlamaMLP") == {"MlpGateLayerV2"} and matched("LlamaRMSNorm") == {"RmsNormOperation"}
    assert matched("QwenMLP") == set()  # another family's prefix is not stripped
    assert matched("BloomMLP") == {"MlpGateLayerV2"}  # a built-in rule names it whole
    # ATB keys match an op whose type or name (without its indices) ends with them
    assert [str(r.atb) for r in table.rules_for_atb("BloomLayer", "Bloom7bCommonLayer_3")] == ["CommonLayer_outtensor0"] * 2
    assert table.rules_for_atb("LinearOperationX", "LinearOperationX_1") == []


def test_family_prefixes_come_from_model_and_layer_type_names():
    assert family_prefixes(["GPTNeoXForCausalLM", "GPTNeoXLayer"]) == {"GPTNeoX"}
    assert family_prefixes(["ChatGLMForConditionalGeneration", "GLMBlock"]) == {"ChatGLM", "GLM"}
    assert family_prefixes(["BloomLayer"]) == {"Bloom"}
    assert family_prefixes(["Block"]) == set() and family_prefixes(["MyNet"]) == set()
