"""Write a tensor-parallel ATB dump (N rank dirs, Megatron layout) that mirrors a torch dump of a HF Llama or Qwen2.

Every rank runs the whole graph on its shard of the weights, as ATB-Models ports do:
- column-parallel ops (q/k/v projections, gate/up projections, the activation, the gate*up multiply, the attention
  output) hold rank r's contiguous slice of the last dim (heads are contiguous there; GQA kv heads are split too);
- row-parallel ops (o_proj, down_proj) are ``LinearParallelOperation`` with ``rank``/``rankSize``/``backend``
  params, their input the rank's slice and their output the full all-reduced tensor, the same on every rank;
- norms, residual adds, the embedding, layer outputs, the final norm and lm_head are replicated.
Values are the golden module tensors rounded to bf16 (no propagation: a fault stays where it is injected).

``faults`` maps ``"module"`` (every rank) or ``"module@r"`` (rank r only) to a scale factor of that module's output
as the rank holds it: ``{"root.model.layers.1.mlp.gate_proj@1": 1.05}`` is a 5 % error in rank 1's gate shard;
``{"root.model.layers.0.post_attention_layernorm@1": 1.01}`` a replicated tensor that differs between ranks.
The returned truth maps each ATB rel_dir to its torch module and distribution ("split" or "replicated").
"""
from __future__ import annotations

from pathlib import Path

import torch

from atb_mirror import _graph, _leaf, layer_children
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.formats.torch_layout import TorchDump

MODEL = "TpMirrorModel"
PID_BASE = 5000


def build(num_layers: int, rank: int, world: int, bias: bool):
    """(topology, plan, truth) of one rank. A plan step is (rel_dir, inputs, outputs, module or None); an input or
    output is "weight" or (module, stem, split?)."""
    counter = {"w": 0, "t": 0}

    def weight():
        counter["w"] += 1
        return f"{MODEL}_weight_{counter['w'] - 1}"

    def tensor():
        counter["t"] += 1
        return f"{MODEL}_internal_{counter['t'] - 1}"

    parallel = {"rank": rank, "rankSize": world, "backend": "hccl", "hasBias": False}
    nodes, plan, truth = [], [], {}
    W = "weight"
    embed_out = tensor()
    nodes.append(_leaf("GatherOperation_0", "GatherOperation", {"axis": 0}, [weight(), f"{MODEL}_input_0"], [embed_out]))
    plan.append(("0_GatherOperation", [W, ("root.model.embed_tokens", "input_0", False)],
                 [("root.model.embed_tokens", "output", False)], "root.model.embed_tokens"))
    hidden = embed_out
    for i in range(num_layers):
        top, L, p = i + 1, f"root.model.layers.{i}", f"_{i + 1}"
        t = {k: tensor() for k in ("ln", "q", "k", "v", "ctx", "o", "res", "ln2", "mlp", "out",
                                    "gate", "up", "act", "mul")}
        ws = {k: weight() for k in ("ln", "q", "k", "v", "o", "ln2", "gate", "up", "down")}
        linear = {"hasBias": bias, "transposeB": True}
        children = layer_children(p, hidden, t, ws, column=linear, row=("LinearParallelOperation", parallel),
                                  heads=0)
        nodes.append(_graph(f"DecoderLayer_{top}", "DecoderLayer", [hidden] + list(ws.values()), [t["out"]], children))
        d = f"{top}_DecoderLayer"
        full = lambda s: (f"{L}.{s}" if s else L, "output", False)  # noqa: E731
        full_in = lambda s: (f"{L}.{s}" if s else L, "input_0", False)  # noqa: E731
        shard = lambda s: (f"{L}.{s}", "output", True)  # noqa: E731
        shard_in = lambda s: (f"{L}.{s}", "input_0", True)  # noqa: E731
        steps = [
            (f"{d}/0_RmsNormOperation", [full_in("input_layernorm"), W], [full("input_layernorm")], "input_layernorm"),
            (f"{d}/1_LinearOperation", [full_in("self_attn.q_proj"), W], [shard("self_attn.q_proj")], "self_attn.q_proj"),
            (f"{d}/2_LinearOperation", [full_in("self_attn.k_proj"), W], [shard("self_attn.k_proj")], "self_attn.k_proj"),
            (f"{d}/3_LinearOperation", [full_in("self_attn.v_proj"), W], [shard("self_attn.v_proj")], "self_attn.v_proj"),
            (f"{d}/4_SelfAttentionOperation", [shard("self_attn.q_proj"), shard("self_attn.k_proj"),
                                               shard("self_attn.v_proj")], [shard_in("self_attn.o_proj")], None),
            (f"{d}/5_LinearParallelOperation", [shard_in("self_attn.o_proj"), W], [full("self_attn.o_proj")],
             "self_attn.o_proj"),
            (f"{d}/6_ElewiseOperation", [full("self_attn.o_proj"), full_in("")], [full_in("post_attention_layernorm")],
             None),
            (f"{d}/7_RmsNormOperation", [full_in("post_attention_layernorm"), W], [full("post_attention_layernorm")],
             "post_attention_layernorm"),
            (f"{d}/8_MlpGateLayerV2/0_LinearOperation", [full_in("mlp.gate_proj"), W], [shard("mlp.gate_proj")],
             "mlp.gate_proj"),
            (f"{d}/8_MlpGateLayerV2/1_LinearOperation", [full_in("mlp.up_proj"), W], [shard("mlp.up_proj")],
             "mlp.up_proj"),
            (f"{d}/8_MlpGateLayerV2/2_ActivationOperation", [shard("mlp.gate_proj")], [shard("mlp.act_fn")], None),
            (f"{d}/8_MlpGateLayerV2/3_ElewiseOperation", [shard("mlp.act_fn"), shard("mlp.up_proj")],
             [shard_in("mlp.down_proj")], None),
            (f"{d}/8_MlpGateLayerV2/4_LinearParallelOperation", [shard_in("mlp.down_proj"), W], [full("mlp.down_proj")],
             "mlp.down_proj"),
            (f"{d}/8_MlpGateLayerV2", [full_in("mlp"), W, W, W], [full("mlp")], "mlp"),
            (f"{d}/9_ElewiseOperation", [full("mlp"), full_in("post_attention_layernorm")], [full("")], None),
            (d, [full_in("")], [full("")], ""),
        ]
        for rel, ins, outs, module in steps:
            plan.append((rel, ins, outs, module))
            if module is not None:
                module_name = f"{L}.{module}" if module else L
                truth[rel] = (module_name, "split" if outs[0][2] else "replicated")
        hidden = t["out"]
    top = num_layers + 1
    norm_out = tensor()
    nodes.append(_leaf(f"RmsNormOperation_{top}", "RmsNormOperation", {"epsilon": 1e-6}, [hidden, weight()], [norm_out]))
    nodes.append(_leaf(f"LinearOperation_{top + 1}", "LinearOperation", {"hasBias": False}, [norm_out, weight()],
                       [f"{MODEL}_output_0"]))
    plan.append((f"{top}_RmsNormOperation", [("root.model.norm", "input_0", False), W],
                 [("root.model.norm", "output", False)], "root.model.norm"))
    plan.append((f"{top + 1}_LinearOperation", [("root.lm_head", "input_0", False), W],
                 [("root.lm_head", "output", False)], "root.lm_head"))
    truth[f"{top}_RmsNormOperation"] = ("root.model.norm", "replicated")
    truth[f"{top + 1}_LinearOperation"] = ("root.lm_head", "replicated")
    for rel, _, _, module in plan[:1]:
        truth[rel] = (module, "replicated")
    return {"modelName": MODEL, "nodes": nodes}, plan, truth


def write_tp_mirror(golden: TorchDump, out_dir: Path, *, num_layers: int, world: int, bias: bool = False,
                    dtype=torch.bfloat16, faults: dict[str, float] | None = None, tokens=None,
                    ranks=None) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Write ``world`` rank dirs (devices 0..world-1) under ``out_dir``; return (ATB dump root, truth).

    ``ranks``: write only these ranks (a dump whose other ranks died before writing); ``bias``: the q/k/v Linear
    ops say hasBias (Qwen2). Every split module's last dim must divide by ``world``.
    """
    tokens = golden.tokens if tokens is None else tokens
    faults = faults or {}
    truth: dict = {}
    root = None
    for rank in range(world) if ranks is None else ranks:
        topo, plan, truth = build(num_layers, rank, world, bias)
        writer = AtbDumpWriter(out_dir, model_name=MODEL, pid=PID_BASE + rank, device_id=rank,
                               token_range=[(min(tokens), max(tokens))], time=3)
        writer.write_topology(topo)
        root = writer.root
        cache: dict = {}
        for token in tokens:
            def load(src):
                if src == "weight":
                    return torch.zeros(1, dtype=dtype)
                module, stem, split = src
                key = (token, module, stem)
                if key not in cache:
                    cache[key] = torch.load(golden.module_dir(token, module) / f"{stem}.pth", weights_only=True)
                t = cache[key].float()
                if stem == "output":
                    t = t * faults.get(module, 1.0) * faults.get(f"{module}@{rank}", 1.0)
                if split:
                    width = t.shape[-1] // world
                    t = t[..., rank * width:(rank + 1) * width].contiguous()
                return t.to(dtype) if t.is_floating_point() else t
            for rel, ins, outs, _ in plan:
                writer.save_tensors(token, rel, [load(s) for s in ins], [load(s) for s in outs])
    return root, truth


def tiny_model(kind: str, num_layers: int):
    """A tiny HF model whose heads split evenly over 2, 4 or 8 ranks: "llama" (8 heads, 8 kv heads) or "qwen2"
    (GQA: 8 heads, 4 kv heads, q/k/v biases; at TP=2 its gate/up shards have o_proj's shape)."""
    from hf_models import _common, _seeded
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_type, model_type = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_type(**_common(128, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                                             num_attention_heads=8, num_key_value_heads=8 if kind == "llama" else 4)))
    return _seeded(0, lambda: model_type(config))


def golden_dump(kind: str, out_dir: Path, *, num_layers: int, seq: int = 8, new_tokens: int = 2) -> TorchDump:
    """The tiny model of ``kind`` dumped by our hooks while generating ``new_tokens`` tokens."""
    from hf_models import input_ids
    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
    from pytest_ait_llm.formats.torch_layout import open_torch_dump

    model = tiny_model(kind, num_layers)
    with register_hook(model, DumpConfig(dump_path=out_dir, token_range=range(new_tokens))) as handle:
        model.generate(input_ids(seq=seq), max_new_tokens=new_tokens, do_sample=False)
    return open_torch_dump(handle.dump_dir)
