"""ATB-layout ports (mirrors) of a GPT-NeoX and a ChatGLM2-6B-style model, written from their torch dumps.

Each port is a topology as an ATB model writes it (layer graphs, fused Linear with bias, ops with no torch module:
SelfAttention/Rope/Split/Activation/residual adds), and every tensor is filled *by its name in the dataflow* from
the golden (torch) dump rounded to bf16, so each op's inputs are exactly the outputs of the op that wrote them.
``build_*`` return (topology, tensor name -> value source, ground truth rel_dir -> torch module for the ops that
have one); :func:`write_port` writes a dump. ``faults`` scales one module's golden outputs wherever the port uses
them, without propagation: a unit fault the verdict must pin to that module's op.

- GPT-NeoX (parallel residual): ``out = x + attention(ln1(x)) + mlp(ln2(x))``. There is no ATB graph op for
  ``GPTNeoXMLP`` nor ``GPTNeoXAttention``: their outputs are their last Linear's.
- ChatGLM2: the built-in table's own model (``CommonLayer``, ``MlpGateLayerV2``, ``SelfAttentionOperation`` ->
  ``CoreAttention``, ``RmsNormOperation``), sequence-first tensors, and the ``Embedding`` wrapper whose inner
  ``word_embeddings`` is the Gather.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from atb_mirror import _graph, _leaf, _Names  # one naming and node schema for every mirror
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.formats.atb_topology import parse_topology
from pytest_ait_llm.formats.torch_layout import TorchDump

Load = Callable[[str, str], torch.Tensor]  # (module, stem) -> the golden tensor, faults applied


def golden(module: str, stem: str = "output"):
    return lambda load: load(module, stem)


# ---------------------------------------------------------------------------------------------------- GPT-NeoX

def _embedding(model: str, module: str):
    """The port's start: its names, sources, truth and nodes with the token Gather of ``module``, and its output."""
    n = _Names(model)
    ids, hidden = f"{model}_input_0", n.tensor()
    src: dict[str, Callable] = {ids: golden(module, "input_0"), hidden: golden(module)}
    nodes = [_leaf("GatherOperation_0", "GatherOperation", {"axis": 0}, [n.weight(), ids], [hidden])]
    return n, src, {"0_GatherOperation": module}, nodes, hidden


NEOX = "GptNeoxModel"


def build_neox(num_layers: int) -> tuple[dict, dict, dict]:
    n, src, truth, nodes, hidden = _embedding(NEOX, "root.gpt_neox.embed_in")
    for i in range(num_layers):
        top, L = i + 1, f"root.gpt_neox.layers.{i}"
        t = {k: n.tensor() for k in ("ln1", "qkv", "ctx", "attn", "ln2", "h4", "act", "mlp", "sum", "out")}
        w = {k: n.weight() for k in ("ln1", "ln1b", "qkv", "qkvb", "dense", "denseb", "ln2", "ln2b",
                                     "up", "upb", "down", "downb")}
        p = f"_{top}"
        src.update({
            t["ln1"]: golden(f"{L}.input_layernorm"), t["qkv"]: golden(f"{L}.attention.query_key_value"),
            t["ctx"]: golden(f"{L}.attention.dense", "input_0"), t["attn"]: golden(f"{L}.attention.dense"),
            t["ln2"]: golden(f"{L}.post_attention_layernorm"), t["h4"]: golden(f"{L}.mlp.dense_h_to_4h"),
            t["act"]: golden(f"{L}.mlp.act"), t["mlp"]: golden(f"{L}.mlp.dense_4h_to_h"),
            t["sum"]: lambda load, L=L: load(f"{L}.attention.dense", "output") + load(f"{L}.mlp.dense_4h_to_h", "output"),
            t["out"]: golden(L),
        })
        linear = {"hasBias": True, "transposeB": True}
        children = [
            _leaf(f"LayerNormOperation{p}_0", "LayerNormOperation", {}, [hidden, w["ln1"], w["ln1b"]], [t["ln1"]]),
            _leaf(f"LinearOperation{p}_1", "LinearOperation", linear, [t["ln1"], w["qkv"], w["qkvb"]], [t["qkv"]]),
            _leaf(f"SelfAttentionOperation{p}_2", "SelfAttentionOperation", {"headNum": 4}, [t["qkv"]], [t["ctx"]]),
            _leaf(f"LinearOperation{p}_3", "LinearOperation", linear, [t["ctx"], w["dense"], w["denseb"]], [t["attn"]]),
            _leaf(f"LayerNormOperation{p}_4", "LayerNormOperation", {}, [hidden, w["ln2"], w["ln2b"]], [t["ln2"]]),
            _leaf(f"LinearOperation{p}_5", "LinearOperation", linear, [t["ln2"], w["up"], w["upb"]], [t["h4"]]),
            _leaf(f"ActivationOperation{p}_6", "ActivationOperation", {"activationType": 2}, [t["h4"]], [t["act"]]),
            _leaf(f"LinearOperation{p}_7", "LinearOperation", linear, [t["act"], w["down"], w["downb"]], [t["mlp"]]),
            _leaf(f"ElewiseOperation{p}_8", "ElewiseOperation", {"elewiseType": 8}, [t["attn"], t["mlp"]], [t["sum"]]),
            _leaf(f"ElewiseOperation{p}_9", "ElewiseOperation", {"elewiseType": 8}, [t["sum"], hidden], [t["out"]]),
        ]
        nodes.append(_graph(f"GptNeoxLayer{p}", "GptNeoxLayer", [hidden] + list(w.values()), [t["out"]], children))
        d = f"{top}_GptNeoxLayer"
        truth.update({d: L, f"{d}/0_LayerNormOperation": f"{L}.input_layernorm",
                      f"{d}/1_LinearOperation": f"{L}.attention.query_key_value",
                      f"{d}/3_LinearOperation": f"{L}.attention.dense",
                      f"{d}/4_LayerNormOperation": f"{L}.post_attention_layernorm",
                      f"{d}/5_LinearOperation": f"{L}.mlp.dense_h_to_4h",
                      f"{d}/7_LinearOperation": f"{L}.mlp.dense_4h_to_h"})
        hidden = t["out"]
    top = num_layers + 1
    norm, logits = n.tensor(), f"{NEOX}_output_0"
    src.update({norm: golden("root.gpt_neox.final_layer_norm"), logits: golden("root.lm_head")})
    nodes.append(_leaf(f"LayerNormOperation_{top}", "LayerNormOperation", {}, [hidden, n.weight(), n.weight()], [norm]))
    nodes.append(_leaf(f"LinearOperation_{top + 1}", "LinearOperation", {"hasBias": False}, [norm, n.weight()], [logits]))
    truth.update({f"{top}_LayerNormOperation": "root.gpt_neox.final_layer_norm",
                  f"{top + 1}_LinearOperation": "root.lm_head"})
    return {"modelName": NEOX, "nodes": nodes}, src, truth


#: modules whose output is their last child's (no ATB op of their own): module suffix -> that child's suffix
NEOX_CONTAINERS = {"attention": "attention.dense", "mlp": "mlp.dense_4h_to_h"}


# ---------------------------------------------------------------------------------------------------- ChatGLM2

GLM = "ChatGlm2Model"


def build_chatglm2(config) -> tuple[dict, dict, dict]:
    n, src, truth, nodes, hidden = _embedding(GLM, "root.transformer.embedding.word_embeddings")
    heads, groups, head_dim = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    sizes = [heads * head_dim, groups * head_dim, groups * head_dim]
    for i in range(config.num_layers):
        top, L = i + 1, f"root.transformer.encoder.layers.{i}"
        A = f"{L}.self_attention"
        t = {k: n.tensor() for k in ("ln1", "qkv", "q", "k", "v", "qr", "kr", "ctx", "attn", "res", "ln2",
                                      "h4", "act", "mlp", "out")}
        w = {k: n.weight() for k in ("ln1", "qkv", "qkvb", "dense", "ln2", "up", "down")}
        p = f"_{top}"

        def split(index, A=A):
            return lambda load: load(f"{A}.query_key_value", "output").split(sizes, dim=-1)[index]

        src.update({
            t["ln1"]: golden(f"{L}.input_layernorm"), t["qkv"]: golden(f"{A}.query_key_value"),
            t["q"]: split(0), t["k"]: split(1), t["v"]: split(2),
            t["qr"]: golden(f"{A}.core_attention", "input_0"), t["kr"]: golden(f"{A}.core_attention", "input_1"),
            t["ctx"]: golden(f"{A}.core_attention"), t["attn"]: golden(f"{A}.dense"),
            t["res"]: golden(f"{L}.post_attention_layernorm", "input_0"),
            t["ln2"]: golden(f"{L}.post_attention_layernorm"), t["h4"]: golden(f"{L}.mlp.dense_h_to_4h"),
            t["act"]: golden(f"{L}.mlp.dense_4h_to_h", "input_0"), t["mlp"]: golden(f"{L}.mlp"),
            t["out"]: golden(L, "output_0"),
        })
        children = [
            _leaf(f"RmsNormOperation{p}_0", "RmsNormOperation", {}, [hidden, w["ln1"]], [t["ln1"]]),
            _leaf(f"LinearOperation{p}_1", "LinearOperation", {"hasBias": True}, [t["ln1"], w["qkv"], w["qkvb"]], [t["qkv"]]),
            _leaf(f"SplitOperation{p}_2", "SplitOperation", {"splitDim": -1}, [t["qkv"]], [t["q"], t["k"], t["v"]]),
            _leaf(f"RopeOperation{p}_3", "RopeOperation", {}, [t["q"], t["k"], f"{GLM}_input_1"], [t["qr"], t["kr"]]),
            _leaf(f"SelfAttentionOperation{p}_4", "SelfAttentionOperation", {"headNum": heads, "kvHeadNum": groups},
                  [t["qr"], t["kr"], t["v"], f"{GLM}_input_2"], [t["ctx"]]),
            _leaf(f"LinearOperation{p}_5", "LinearOperation", {"hasBias": False}, [t["ctx"], w["dense"]], [t["attn"]]),
            _leaf(f"ElewiseOperation{p}_6", "ElewiseOperation", {"elewiseType": 8}, [t["attn"], hidden], [t["res"]]),
            _leaf(f"RmsNormOperation{p}_7", "RmsNormOperation", {}, [t["res"], w["ln2"]], [t["ln2"]]),
            _graph(f"MlpGateLayerV2{p}_8", "MlpGateLayerV2", [t["ln2"], w["up"], w["down"]], [t["mlp"]], [
                _leaf(f"LinearOperation{p}_8_0", "LinearOperation", {"hasBias": False}, [t["ln2"], w["up"]], [t["h4"]]),
                _leaf(f"ActivationOperation{p}_8_1", "ActivationOperation", {"activationType": 4}, [t["h4"]], [t["act"]]),
                _leaf(f"LinearOperation{p}_8_2", "LinearOperation", {"hasBias": False}, [t["act"], w["down"]], [t["mlp"]]),
            ]),
            _leaf(f"ElewiseOperation{p}_9", "ElewiseOperation", {"elewiseType": 8}, [t["mlp"], t["res"]], [t["out"]]),
        ]
        nodes.append(_graph(f"ChatGlm2CommonLayer{p}", "ChatGlm2CommonLayer", [hidden] + list(w.values()), [t["out"]],
                            children))
        d = f"{top}_ChatGlm2CommonLayer"
        truth.update({d: L, f"{d}/0_RmsNormOperation": f"{L}.input_layernorm",
                      f"{d}/1_LinearOperation": f"{A}.query_key_value",
                      f"{d}/4_SelfAttentionOperation": f"{A}.core_attention",
                      f"{d}/5_LinearOperation": f"{A}.dense",
                      f"{d}/7_RmsNormOperation": f"{L}.post_attention_layernorm",
                      f"{d}/8_MlpGateLayerV2": f"{L}.mlp",
                      f"{d}/8_MlpGateLayerV2/0_LinearOperation": f"{L}.mlp.dense_h_to_4h",
                      f"{d}/8_MlpGateLayerV2/2_LinearOperation": f"{L}.mlp.dense_4h_to_h"})
        hidden = t["out"]
    top = config.num_layers + 1
    norm, logits = n.tensor(), f"{GLM}_output_0"
    src.update({norm: golden("root.transformer.encoder.final_layernorm"), logits: golden("root.transformer.output_layer"),
                f"{GLM}_input_1": golden("root.transformer.rotary_pos_emb"),
                f"{GLM}_input_2": golden(f"root.transformer.encoder.layers.0.self_attention.core_attention", "input_3")})
    nodes.append(_leaf(f"RmsNormOperation_{top}", "RmsNormOperation", {}, [hidden, n.weight()], [norm]))
    nodes.append(_leaf(f"LinearOperation_{top + 1}", "LinearOperation", {"hasBias": False}, [norm, n.weight()], [logits]))
    truth.update({f"{top}_RmsNormOperation": "root.transformer.encoder.final_layernorm",
                  f"{top + 1}_LinearOperation": "root.transformer.output_layer"})
    return {"modelName": GLM, "nodes": nodes}, src, truth


#: the wrapper that returns its inner module's output (transposed to sequence-first): wrapper -> inner
GLM_CONTAINERS = {"root.transformer.embedding": "root.transformer.embedding.word_embeddings",
                  "self_attention": "self_attention.dense"}


# ------------------------------------------------------------------------------------------------------ writing

def write_port(golden_dump: TorchDump, out_dir: Path, topology: dict, sources: dict, *, pid: int,
               dtype=torch.bfloat16, faults: dict[str, float] | None = None) -> Path:
    """Write the ATB dump of ``topology`` for every token of ``golden_dump``; returns its root."""
    faults = faults or {}
    tokens = golden_dump.tokens
    writer = AtbDumpWriter(out_dir, model_name=topology["modelName"], pid=pid, device_id=0,
                           token_range=[(min(tokens), max(tokens))], time=3)
    writer.write_topology(topology)
    ops = list(parse_topology(topology).walk())
    for token in tokens:
        def load(module: str, stem: str) -> torch.Tensor:
            t = torch.load(golden_dump.module_dir(token, module) / f"{stem}.pth", weights_only=True)
            factor = faults.get(module, 1.0) if stem.startswith("output") else 1.0
            return t.float() * factor if t.is_floating_point() else t

        cache: dict[str, torch.Tensor] = {}

        def value(name: str) -> torch.Tensor:
            if name not in cache:
                if name not in sources and "_weight_" not in name:
                    raise KeyError(f"no value for the activation {name}")
                t = sources[name](load) if name in sources else torch.zeros(1)  # a weight: a placeholder
                cache[name] = t.to(dtype) if t.is_floating_point() else t
            return cache[name]

        for op in ops:
            writer.save_tensors(token, op.rel_dir, [value(x) for x in op.in_tensors], [value(x) for x in op.out_tensors])
    return writer.root
