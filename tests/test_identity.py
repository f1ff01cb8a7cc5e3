"""Pairing two dumps of one kind by identity (mapping/identity.py), on topologies and module trees as the dumps
describe them: the same graph, a quantized build with extra ops, a CANN that fuses two ops, a layer with one op
more, two versions of a torch model, and two different models."""
from __future__ import annotations

import pytest

from pytest_ait_llm.errors import MappingError
from pytest_ait_llm.formats.atb_topology import parse_topology
from pytest_ait_llm.formats.torch_layout import parse_model_tree
from pytest_ait_llm.mapping.identity import align_sequences, pair_same_kind, unit_name

HIDDEN, FFN = [1, 8, 64], [1, 8, 256]


def _layer(lid: int, ops: list[str]) -> dict:
    nodes = [{"opName": f"{t}_{lid}_{k}", "opType": t, "param": {}, "inTensors": [], "outTensors": []}
             for k, t in enumerate(ops)]
    return {"opName": f"LlamaLayer_{lid}", "opType": "LlamaLayer", "param": "", "inTensors": [], "outTensors": [],
            "nodes": nodes}


LAYER = ["RmsNormOperation", "LinearOperation", "LinearOperation", "LinearOperation", "RopeOperation",
         "SelfAttentionOperation", "LinearOperation", "ElewiseOperation"]


def _model(layers: list[list[str]]) -> object:
    nodes = [{"opName": "GatherOperation_0", "opType": "GatherOperation", "param": {}}]
    nodes += [_layer(i + 1, ops) for i, ops in enumerate(layers)]
    n = len(layers)
    nodes += [{"opName": f"RmsNormOperation_{n + 1}", "opType": "RmsNormOperation", "param": {}},
              {"opName": f"LinearOperation_{n + 2}", "opType": "LinearOperation", "param": {}}]
    return parse_topology({"modelName": "M", "nodes": nodes})


def _names(pairs) -> list[tuple[str, str]]:
    return [(unit_name(p.a), unit_name(p.b)) for p in pairs]


def test_same_graph_pairs_every_op_with_itself():
    a, b = _model([LAYER, LAYER]), _model([LAYER, LAYER])
    same = pair_same_kind(a, b)
    assert not same.leftovers
    assert len(same.pairs) == len(list(a.walk()))
    assert all(x == y for x, y in _names(same.pairs))
    assert {p.how for p in same.pairs} == {"identity"}


def test_quantized_build_lists_its_quant_ops_and_keeps_every_linear_with_its_counterpart():
    quant = LAYER[:1] + ["QuantPerChannelOperation"] + LAYER[1:6] + ["QuantPerChannelOperation"] + LAYER[6:]
    a, b = _model([LAYER, LAYER]), _model([LAYER, quant])
    same = pair_same_kind(a, b)
    inserted = [lo for lo in same.leftovers if lo.side == "b"]
    assert [lo.name for lo in inserted] == ["2_LlamaLayer/1_QuantPerChannelOperation",
                                            "2_LlamaLayer/7_QuantPerChannelOperation"]
    assert all("quantization op" in lo.reason for lo in inserted)
    assert not [lo for lo in same.leftovers if lo.side == "a"]
    pairs = dict(_names(same.pairs))
    # q/k/v and o projections moved one or two folders down in B: each still pairs with its own counterpart
    assert pairs["2_LlamaLayer/1_LinearOperation"] == "2_LlamaLayer/2_LinearOperation"
    assert pairs["2_LlamaLayer/3_LinearOperation"] == "2_LlamaLayer/4_LinearOperation"
    assert pairs["2_LlamaLayer/6_LinearOperation"] == "2_LlamaLayer/8_LinearOperation"
    assert pairs["1_LlamaLayer/6_LinearOperation"] == "1_LlamaLayer/6_LinearOperation"


def test_fused_ops_are_listed_on_both_sides_with_what_stands_in_their_place():
    fused = ["RmsNormOperation", "LinearOperation", "LinearOperation", "LinearOperation", "RopeAttentionOperation",
             "LinearOperation", "ElewiseOperation"]
    same = pair_same_kind(_model([LAYER]), _model([fused]))
    removed = {lo.name: lo.reason for lo in same.leftovers if lo.side == "a"}
    inserted = {lo.name: lo.reason for lo in same.leftovers if lo.side == "b"}
    assert set(removed) == {"1_LlamaLayer/4_RopeOperation", "1_LlamaLayer/5_SelfAttentionOperation"}
    assert set(inserted) == {"1_LlamaLayer/4_RopeAttentionOperation"}
    assert "RopeAttentionOperation here instead" in removed["1_LlamaLayer/4_RopeOperation"]
    assert "RopeOperation, SelfAttentionOperation here instead" in inserted["1_LlamaLayer/4_RopeAttentionOperation"]
    assert dict(_names(same.pairs))["1_LlamaLayer/6_LinearOperation"] == "1_LlamaLayer/5_LinearOperation"


def test_one_op_more_is_placed_by_output_shape():
    """B has a fourth Linear before o_proj; the shapes tell which A op each B Linear is."""
    more = LAYER[:6] + ["LinearOperation"] + LAYER[6:]
    a, b = _model([LAYER]), _model([more])
    shapes = {("b", "1_LlamaLayer/6_LinearOperation"): FFN}

    def shape_of(side, op):
        return shapes.get((side, op.rel_dir), HIDDEN)

    same = pair_same_kind(a, b, shape_of=shape_of)
    assert [lo.name for lo in same.leftovers] == ["1_LlamaLayer/6_LinearOperation"]
    assert "only in B" in same.leftovers[0].reason
    assert dict(_names(same.pairs))["1_LlamaLayer/6_LinearOperation"] == "1_LlamaLayer/7_LinearOperation"


def _tree(layers: int, extra: str | None = None, norm_type: str = "LlamaRMSNorm") -> object:
    def module(name, type_, children=()):
        return {"name": name, "type": type_, "children": list(children)}

    def layer(i):
        p = f"root.model.layers.{i}"
        kids = [module(f"{p}.input_layernorm", norm_type),
                module(f"{p}.self_attn", "LlamaAttention", [module(f"{p}.self_attn.{n}", "Linear")
                                                            for n in ("q_proj", "k_proj", "v_proj", "o_proj")]),
                module(f"{p}.mlp", "LlamaMLP")]
        if extra and i == 0:
            kids.insert(1, module(f"{p}.{extra}", "Dropout"))
        return module(p, "LlamaDecoderLayer", kids)

    model = module("root.model", "LlamaModel", [module("root.model.embed_tokens", "Embedding"),
                                                module("root.model.layers", "ModuleList",
                                                       [layer(i) for i in range(layers)])])
    return parse_model_tree(module("root", "LlamaForCausalLM", [model, module("root.lm_head", "Linear")]))


def test_torch_modules_pair_by_name_and_a_new_module_is_listed():
    same = pair_same_kind(_tree(2), _tree(2, extra="dropout"))
    assert [(lo.side, lo.name) for lo in same.leftovers] == [("b", "root.model.layers.0.dropout")]
    assert all(x == y for x, y in _names(same.pairs))
    assert len(same.pairs) == len(list(_tree(2).walk()))


def test_a_renamed_module_class_still_pairs_by_name_with_a_note():
    same = pair_same_kind(_tree(1), _tree(1, norm_type="RMSNorm"))
    assert not same.leftovers
    note = {unit_name(p.a): p.note for p in same.pairs}["root.model.layers.0.input_layernorm"]
    assert note == "type LlamaRMSNorm in A, RMSNorm in B"


@pytest.mark.parametrize("a, b, text", [
    (lambda: _model([LAYER] * 2), lambda: _model([LAYER] * 3), "A has 2 layer graph ops (LlamaLayer), B has 3"),
    (lambda: _tree(2), lambda: _tree(4), "A has 2 decoder layers (LlamaDecoderLayer), B has 4"),
    (lambda: _model([LAYER]), lambda: _tree(1), "A is an ATB dump and B is not"),
])
def test_two_different_models_are_refused_in_one_line(a, b, text):
    with pytest.raises(MappingError) as err:
        pair_same_kind(a(), b())
    assert text in str(err.value)
    assert "\n" not in str(err.value)


def test_graphs_with_almost_nothing_in_common_are_not_the_same_model():
    other = ["GatherOperation", "MatmulOperation", "SoftmaxOperation", "TransposeOperation", "AddOperation",
             "ConcatOperation", "SplitOperation", "CastOperation"]
    with pytest.raises(MappingError, match="not the same model: only"):
        pair_same_kind(_model([LAYER, LAYER]), _model([other, other]))


def test_alignment_keeps_order_and_prefers_the_better_evidence():
    a = ["x", "y", "z"]
    b = ["y", "x", "y", "z"]
    # x-x scores 3, y-y 1: the best order-preserving alignment takes x, the second y, and z
    scores = {("x", "x"): 3, ("y", "y"): 1, ("z", "z"): 1}
    assert align_sequences(a, b, lambda i, j: scores.get((a[i], b[j]), 0)) == [(0, 1), (1, 2), (2, 3)]
    assert align_sequences([], b, lambda i, j: 1) == []
