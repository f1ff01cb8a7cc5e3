"""Write an ATB-layout dump that mirrors a torch dump of a HF Llama, op by op, in low precision.

Each ATB op's tensors are the golden module tensors rounded to bf16 (or fp16), laid out as the ATB dump probe lays
them out, with a realistic topology: fused layer graphs, a bias-less o_proj Linear followed by a *residual* add, an
MlpGateLayerV2 graph, ops with no torch module (SelfAttention, Rope-less here, Activation, Elewise). The mirror
returns the ground truth (ATB rel_dir -> torch module) so tests can check the pairing. ``faults`` scales one
module's output (no propagation: a unit fault the verdict must pin to that op); a key ``"module:input_0"`` scales
that module's input as the ATB side sees it (an error arising in the unpaired op that produced it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.formats.torch_layout import TorchDump

MODEL = "LlamaMirrorModel"


class _Names:
    """``{Model}_weight_i`` / ``{Model}_internal_i``: ATB's naming of a model's tensors."""

    def __init__(self, model: str = MODEL):
        self.model, self.weights, self.internal = model, 0, 0

    def weight(self) -> str:
        self.weights += 1
        return f"{self.model}_weight_{self.weights - 1}"

    def tensor(self) -> str:
        self.internal += 1
        return f"{self.model}_internal_{self.internal - 1}"


def _leaf(name, op_type, param, ins, outs):
    return {"opName": name, "opType": op_type, "param": param, "inTensors": ins, "outTensors": outs}


def _graph(name, op_type, ins, outs, nodes):
    return {"opName": name, "opType": op_type, "param": "", "inTensors": ins, "outTensors": outs,
            "internalTensors": [], "nodes": nodes}


def layer_children(p, hidden, t, ws, *, column=None, row=("LinearOperation", {"hasBias": False}), heads=4):
    """The ops of one Llama decoder layer graph (names suffixed ``p``) over tensor names ``t`` and weights ``ws``:
    ``column`` the q/k/v Linear params; ``row`` the op type and params of o_proj and down_proj (a tensor-parallel
    rank's LinearParallelOperation); ``heads`` SelfAttention's headNum."""
    column = column or {"hasBias": False}
    row_type, row_param = row
    plain = {"hasBias": False}
    return [
        _leaf(f"RmsNormOperation{p}_0", "RmsNormOperation", {"epsilon": 1e-6}, [hidden, ws["ln"]], [t["ln"]]),
        _leaf(f"LinearOperation{p}_1", "LinearOperation", column, [t["ln"], ws["q"]], [t["q"]]),
        _leaf(f"LinearOperation{p}_2", "LinearOperation", column, [t["ln"], ws["k"]], [t["k"]]),
        _leaf(f"LinearOperation{p}_3", "LinearOperation", column, [t["ln"], ws["v"]], [t["v"]]),
        _leaf(f"SelfAttentionOperation{p}_4", "SelfAttentionOperation", {"headNum": heads},
              [t["q"], t["k"], t["v"]], [t["ctx"]]),
        _leaf(f"{row_type}{p}_5", row_type, row_param, [t["ctx"], ws["o"]], [t["o"]]),
        _leaf(f"ElewiseOperation{p}_6", "ElewiseOperation", {"elewiseType": 8}, [t["o"], hidden], [t["res"]]),
        _leaf(f"RmsNormOperation{p}_7", "RmsNormOperation", {"epsilon": 1e-6}, [t["res"], ws["ln2"]], [t["ln2"]]),
        _graph(f"MlpGateLayerV2{p}_8", "MlpGateLayerV2", [t["ln2"], ws["gate"], ws["up"], ws["down"]], [t["mlp"]], [
            _leaf(f"LinearOperation{p}_8_0", "LinearOperation", plain, [t["ln2"], ws["gate"]], [t["gate"]]),
            _leaf(f"LinearOperation{p}_8_1", "LinearOperation", plain, [t["ln2"], ws["up"]], [t["up"]]),
            _leaf(f"ActivationOperation{p}_8_2", "ActivationOperation", {"activationType": 4}, [t["gate"]], [t["act"]]),
            _leaf(f"ElewiseOperation{p}_8_3", "ElewiseOperation", {"elewiseType": 9}, [t["act"], t["up"]], [t["mul"]]),
            _leaf(f"{row_type}{p}_8_4", row_type, row_param, [t["mul"], ws["down"]], [t["mlp"]]),
        ]),
        _leaf(f"ElewiseOperation{p}_9", "ElewiseOperation", {"elewiseType": 8}, [t["mlp"], t["res"]], [t["out"]]),
    ]


def build(golden: TorchDump, num_layers: int):
    """(topology dict, list of (rel_dir, [input sources], [output sources]), ground truth rel_dir -> module)."""
    n = _Names()
    plan, truth, nodes = [], {}, []
    W = "weight"  # a weight input: written as a small placeholder tensor

    def lin(i, path, name, src_in, module, bias=False):
        return name, "LinearOperation", {"hasBias": bias, "transposeB": True}, [src_in, W], [(module, "output")]

    embed_out = n.tensor()
    nodes.append(_leaf("GatherOperation_0", "GatherOperation", {"axis": 0}, [n.weight(), f"{MODEL}_input_0"], [embed_out]))
    plan.append(("0_GatherOperation", [W, ("root.model.embed_tokens", "input_0")], [("root.model.embed_tokens", "output")]))
    truth["0_GatherOperation"] = "root.model.embed_tokens"
    hidden = embed_out
    for i in range(num_layers):
        top = i + 1
        L = f"root.model.layers.{i}"
        layer_dir = f"{top}_LlamaLayer"
        t = {k: n.tensor() for k in ("ln", "q", "k", "v", "ctx", "o", "res", "ln2", "mlp", "out",
                                      "gate", "up", "act", "mul")}
        ws = {k: n.weight() for k in ("ln", "q", "k", "v", "o", "ln2", "gate", "up", "down")}
        p = f"_{top}"
        children = layer_children(p, hidden, t, ws)
        nodes.append(_graph(f"LlamaLayer_{top}", "LlamaLayer", [hidden] + list(ws.values()), [t["out"]], children))
        d = layer_dir
        m = lambda s: (f"{L}.{s}", "output")
        mi = lambda s: (f"{L}.{s}", "input_0")
        steps = [
            (f"{d}/0_RmsNormOperation", [mi("input_layernorm"), W], [m("input_layernorm")], f"{L}.input_layernorm"),
            (f"{d}/1_LinearOperation", [mi("self_attn.q_proj"), W], [m("self_attn.q_proj")], f"{L}.self_attn.q_proj"),
            (f"{d}/2_LinearOperation", [mi("self_attn.k_proj"), W], [m("self_attn.k_proj")], f"{L}.self_attn.k_proj"),
            (f"{d}/3_LinearOperation", [mi("self_attn.v_proj"), W], [m("self_attn.v_proj")], f"{L}.self_attn.v_proj"),
            (f"{d}/4_SelfAttentionOperation", [m("self_attn.q_proj"), m("self_attn.k_proj"), m("self_attn.v_proj")],
             [mi("self_attn.o_proj")], None),
            (f"{d}/5_LinearOperation", [mi("self_attn.o_proj"), W], [m("self_attn.o_proj")], f"{L}.self_attn.o_proj"),
            (f"{d}/6_ElewiseOperation", [m("self_attn.o_proj"), (L, "input_0")], [mi("post_attention_layernorm")], None),
            (f"{d}/7_RmsNormOperation", [mi("post_attention_layernorm"), W], [m("post_attention_layernorm")],
             f"{L}.post_attention_layernorm"),
            (f"{d}/8_MlpGateLayerV2/0_LinearOperation", [mi("mlp.gate_proj"), W], [m("mlp.gate_proj")], f"{L}.mlp.gate_proj"),
            (f"{d}/8_MlpGateLayerV2/1_LinearOperation", [mi("mlp.up_proj"), W], [m("mlp.up_proj")], f"{L}.mlp.up_proj"),
            (f"{d}/8_MlpGateLayerV2/2_ActivationOperation", [m("mlp.gate_proj")], [m("mlp.act_fn")], None),
            (f"{d}/8_MlpGateLayerV2/3_ElewiseOperation", [m("mlp.act_fn"), m("mlp.up_proj")], [mi("mlp.down_proj")], None),
            (f"{d}/8_MlpGateLayerV2/4_LinearOperation", [mi("mlp.down_proj"), W], [m("mlp.down_proj")], f"{L}.mlp.down_proj"),
            (f"{d}/8_MlpGateLayerV2", [mi("mlp"), W, W, W], [m("mlp")], f"{L}.mlp"),
            (f"{d}/9_ElewiseOperation", [m("mlp"), mi("post_attention_layernorm")], [(L, "output")], None),
            (d, [(L, "input_0")], [(L, "output")], L),
        ]
        for rel, ins, outs, module in steps:
            plan.append((rel, ins, outs))
            if module:
                truth[rel] = module
        hidden = t["out"]
    top = num_layers + 1
    norm_out, logits = n.tensor(), f"{MODEL}_output_0"
    nodes.append(_leaf(f"RmsNormOperation_{top}", "RmsNormOperation", {"epsilon": 1e-6}, [hidden, n.weight()], [norm_out]))
    nodes.append(_leaf(f"LinearOperation_{top + 1}", "LinearOperation", {"hasBias": False}, [norm_out, n.weight()], [logits]))
    plan.append((f"{top}_RmsNormOperation", [("root.model.norm", "input_0"), W], [("root.model.norm", "output")]))
    plan.append((f"{top + 1}_LinearOperation", [("root.lm_head", "input_0"), W], [("root.lm_head", "output")]))
    truth[f"{top}_RmsNormOperation"] = "root.model.norm"
    truth[f"{top + 1}_LinearOperation"] = "root.lm_head"
    return {"modelName": MODEL, "nodes": nodes}, plan, truth


def write_mirror(golden: TorchDump, out_dir: Path, *, num_layers: int, dtype=torch.bfloat16,
                 faults: dict[str, float] | None = None, tokens=None) -> tuple[Path, dict[str, str]]:
    """Write the mirror dump under ``out_dir``; return (ATB dump root, ground truth rel_dir -> module)."""
    topo, plan, truth = build(golden, num_layers)
    tokens = golden.tokens if tokens is None else tokens
    writer = AtbDumpWriter(out_dir, model_name=MODEL, pid=4242, device_id=0,
                           token_range=[(min(tokens), max(tokens))], time=3)
    writer.write_topology(topo)
    faults = faults or {}
    for token in tokens:
        def load(src):
            if src == "weight":
                return torch.zeros(1, dtype=dtype)
            module, stem = src
            path = golden.module_dir(token, module) / f"{stem}.pth"
            t = torch.load(path, weights_only=True).float()
            t = t * faults.get(f"{module}:{stem}", faults.get(module, 1.0) if stem == "output" else 1.0)
            return t.to(dtype) if t.is_floating_point() else t
        for rel, ins, outs in plan:
            writer.save_tensors(token, rel, [load(s) for s in ins], [load(s) for s in outs])
    return writer.root, truth


def golden_llama_dump(out_dir: Path, *, num_layers: int, seq: int = 8, new_tokens: int = 2) -> TorchDump:
    """A tiny HF Llama dumped by our hooks while generating ``new_tokens`` tokens (tokens 0..new_tokens-1)."""
    from hf_models import input_ids, tiny_llama
    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
    from pytest_ait_llm.formats.torch_layout import open_torch_dump

    model = tiny_llama(num_layers=num_layers, hidden=64)
    with register_hook(model, DumpConfig(dump_path=out_dir, token_range=range(new_tokens))) as handle:
        model.generate(input_ids(seq=seq), max_new_tokens=new_tokens, do_sample=False)
    return open_torch_dump(handle.dump_dir)


def mirror_pair(factory, *, num_layers: int = 2) -> tuple[TorchDump, Path]:
    """A golden Llama dump and its ATB mirror, in folders of pytest's ``tmp_path_factory`` (for module fixtures)."""
    golden = golden_llama_dump(factory.mktemp("golden"), num_layers=num_layers)
    my, _ = write_mirror(golden, factory.mktemp("my"), num_layers=num_layers)
    return golden, my


def report_text(result) -> str:
    """A comparison's CSV report without its file-path columns: equal for the same dumps compared from copies."""
    from pytest_ait_llm.report.csv_report import dataframe

    frame = dataframe(result)
    return frame.drop(columns=[c for c in frame.columns if "path" in c]).to_csv(index=False)


def rewritten_copy(my: Path, dest: Path, file_name: str, change) -> Path:
    """Copy the mirror dump ``my`` to ``dest`` and rewrite one file of layer 1's first LinearOperation (the q_proj):
    ``file_name`` ("intensor0.bin" in ``before/``, "outtensor0.bin" in ``after/``) gets ``change(values)``, float32
    values in the file's shape, stored as bf16. Returns the rewritten file."""
    import shutil

    from pytest_ait_llm.formats.atb_bin import read_bin, write_bin

    shutil.copytree(my, dest)
    folder = "before" if file_name.startswith("in") else "after"
    target = next(p for p in sorted(Path(dest).rglob(file_name))
                  if "LinearOperation" in str(p) and "1_" in p.parts[-4] and p.parent.name == folder)
    values = read_bin(target).to_float64().astype("float32")
    write_bin(target, change(values), dtype="bfloat16")
    return target
