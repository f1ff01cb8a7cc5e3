"""The example's "ATB port": the golden Llama re-implemented from ATB-style fused ops, in bfloat16, on the CPU.

A real port builds an ATB graph in C++ (word-embedding Gather, one ``LlamaLayer`` graph op per decoder layer made of
RmsNorm / Linear / Rope / SelfAttention / MlpGateLayerV2 / Elewise ops, final RmsNorm, lm_head) and runs it on an
NPU, where the ATB dump probe writes every op's tensors. Without an NPU, this file plays both parts:

- :func:`build_topology` writes the graph down in ATB's own topology schema, tensor names included
  (``LlamaPortModel_weight_i`` parameters, ``LlamaPortModel_input_i`` model inputs, ``*_internal_i`` intermediates,
  ``LlamaPortModel_output_i`` outputs), exactly as the dump probe would record it;
- :class:`LlamaPort` *executes that topology*: each op reads its ``inTensors`` by name and writes its
  ``outTensors``, so the names are the real dataflow, and every executed op's inputs (weights included, in
  ``inTensors`` order) and outputs are handed to an :class:`AtbDumpWriter`, which lays them out as ATB does.

Nothing here calls the HF modules: only the golden's weights are taken, cast to bfloat16.

``PORT_BUG`` (or ``--bug``) injects one of the porting bugs listed in :data:`BUGS`, or one of the precision drifts
of :data:`DRIFTS` that stay inside the tolerance.
Run it as ``bash run.sh`` (or ``python port.py``); with ``ATB_SAVE_TENSOR=1`` it dumps, per the ATB_* variables.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

MODEL_NAME = "LlamaPortModel"
HERE = Path(__file__).resolve().parent

# ATB enum values that appear in params.
ELEWISE_ADD, ELEWISE_MUL = 8, 9
ACTIVATION_SWISH = 4
RMS_NORM_NORM = 1

#: Epsilon the rmsnorm_eps bug passes to one RmsNorm (the golden's is 1e-6; activations here are ~1e-2, so the
#: variance is ~1e-4 and an epsilon of 1e-2 shrinks that norm's output about tenfold).
WRONG_EPSILON = 1e-2
SCALE_ERROR = 1.05


@dataclass(frozen=True)
class Bug:
    """A porting bug the example can inject, and where it first shows."""

    description: str
    op_name: str  # the ATB op whose output it changes first
    rel_dir: str  # that op's folder under a token dir
    torch_module: str  # the first paired golden module whose output differs (for the bugs in paired ops: that op)


BUGS: dict[str, Bug] = {
    "rmsnorm_scale": Bug(
        f"layer 3's post-attention RmsNorm output comes out {SCALE_ERROR:g}x too large (a 5 % scale error in a norm)",
        "RmsNormOperation_4_8", "4_LlamaLayer/8_RmsNormOperation", "root.model.layers.3.post_attention_layernorm"),
    "rmsnorm_eps": Bug(
        f"layer 5's post_attention RmsNorm uses epsilon {WRONG_EPSILON:g} instead of the config's rms_norm_eps",
        "RmsNormOperation_6_8", "6_LlamaLayer/8_RmsNormOperation", "root.model.layers.5.post_attention_layernorm"),
    "transposed_weight": Bug(
        "layer 2's o_proj LinearOperation is built with transposeB=false, so the weight is used transposed",
        "LinearOperation_3_6", "3_LlamaLayer/6_LinearOperation", "root.model.layers.2.self_attn.o_proj"),
    "rope_scaling": Bug(
        "the host code that builds the cos/sin tables forgets the config's linear RoPE scaling (factor 2)",
        "RopeOperation_1_4", "1_LlamaLayer/4_RopeOperation", "root.model.layers.0.self_attn.o_proj"),
    "scale": Bug(
        f"layer 3's MLP down projection output comes out {SCALE_ERROR:g}x too large (a 5 % scale error: "
        "cosine similarity stays 1.0)",
        "LinearOperation_4_9_4", "4_LlamaLayer/9_MlpGateLayerV2/4_LinearOperation",
        "root.model.layers.3.mlp.down_proj"),
}
_BUG_LAYER = {"rmsnorm_eps": 5, "transposed_weight": 2}


def load_sibling(name: str, filename: str):
    """A file beside this one, imported under ``name`` once (a bare ``import model`` could pick up another one)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass(frozen=True)
class Drift:
    """A precision change too small for any tolerance: one op's output scaled by ``factor`` before its bf16
    rounding. What a regression baseline (docs/baselines.md) is there to catch, or, below bf16's rounding, to let by."""

    description: str
    factor: float
    op_name: str
    rel_dir: str
    torch_module: str


_DRIFT_OP = ("RmsNormOperation_7_0", "7_LlamaLayer/0_RmsNormOperation", "root.model.layers.6.input_layernorm")

#: ``PORT_BUG`` values that pass every default tolerance (the bugs above all breach one).
DRIFTS: dict[str, Drift] = {
    "rmsnorm_scale_0.5pct": Drift("layer 6's input RmsNorm output comes out 1.005x too large (inside every "
                                  "tolerance, outside the accepted baseline)", 1.005, *_DRIFT_OP),
    "rmsnorm_scale_subrounding": Drift("layer 6's input RmsNorm output scaled by 1 + 2^-10 before rounding to bf16 "
                                       "(a quarter of bf16's unit roundoff 2^-8: a kernel change a baseline must "
                                       "let by)", 1.0 + 2.0 ** -10, *_DRIFT_OP),
}


def load_golden_module():
    """``model.py`` beside this file, imported under a name that cannot clash with anyone's ``model`` module."""
    return load_sibling("llama_port_model", "model.py")


# ----------------------------------------------------------------------------------------------------- topology

def _linear_param(transpose_b: bool = True) -> dict:
    return {"hasBias": False, "transposeA": False, "transposeB": transpose_b, "outDataType": -1}


def _rms_norm_param(epsilon: float) -> dict:
    return {"layerType": RMS_NORM_NORM,
            "normParam": {"quantType": 0, "epsilon": epsilon, "rstd": False, "precisionMode": 0, "modelType": 0},
            "preNormParam": {"quantType": 0, "epsilon": 1e-5, "hasBias": False},
            "postNormParam": {"quantType": 0, "epsilon": 1e-5, "hasBias": False}}


def _elewise_param(elewise_type: int) -> dict:
    return {"elewiseType": elewise_type, "mulsParam": {"varAttr": 0.0}, "outTensorType": -1,
            "quantParam": {"inputOffset": 0, "inputScale": 1.0}}


def _leaf(op_type: str, idpath: str, param: dict, inputs: list[str], outputs: list[str]) -> dict:
    return {"opName": f"{op_type}_{idpath}", "opType": op_type, "param": param,
            "inTensors": inputs, "outTensors": outputs}


def _graph(op_name: str, op_type: str, inputs: list[str], outputs: list[str], internals: list[str],
           nodes: list[dict]) -> dict:
    return {"opName": op_name, "opType": op_type, "param": "", "inTensors": inputs, "outTensors": outputs,
            "internalTensors": internals, "nodes": nodes}


class Names:
    """Tensor names of the model graph (ATB numbers weights, inputs and intermediates per model)."""

    model = MODEL_NAME

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def weight(self, i: int) -> str:
        return f"{self.model}_weight_{i}"

    def input(self, i: int) -> str:
        return f"{self.model}_input_{i}"

    def internal(self, i: int) -> str:
        return f"{self.model}_internal_{i}"

    def output(self, i: int) -> str:
        return f"{self.model}_output_{i}"

    # weights: 0 word embedding; 9 per layer; final norm; lm_head
    def layer_weights(self, layer: int) -> list[str]:
        return [self.weight(1 + 9 * layer + j) for j in range(9)]

    @property
    def final_norm_weight(self) -> str:
        return self.weight(1 + 9 * self.num_layers)

    @property
    def lm_head_weight(self) -> str:
        return self.weight(2 + 9 * self.num_layers)

    # inputs: ids, cos, sin, attention mask, k cache, v cache, token offset, seq len, one layer id per layer
    ids, cos, sin, mask, k_cache, v_cache, token_offset, seq_len = (f"{MODEL_NAME}_input_{i}" for i in range(8))

    def layer_id(self, layer: int) -> str:
        return self.input(8 + layer)


def build_topology(config: dict, bug: str | None = None) -> dict:
    """The model's ATB topology (the ``model/{pid}/LlamaPortModel.json`` the dump probe writes).

    Top level: ``GatherOperation_0`` (word embedding), ``LlamaLayer_1`` .. ``LlamaLayer_L``,
    ``RmsNormOperation_{L+1}`` (final norm), ``SliceOperation_{L+2}`` (keeps the last position, as the golden's
    ``generate`` computes logits for the last position only) and ``LinearOperation_{L+3}`` (lm_head).
    The bugs that live in an op's parameters show there too, as they would in a real dump.
    """
    num_layers = config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    n = Names(num_layers)
    nodes = [_leaf("GatherOperation", "0", {"axis": 0, "batchDims": 0}, [n.weight(0), n.ids], [n.internal(0)])]
    for layer in range(num_layers):
        lid = layer + 1
        name = f"LlamaLayer_{lid}"
        w_in_norm, w_q, w_k, w_v, w_o, w_post_norm, w_gate, w_up, w_down = n.layer_weights(layer)
        hidden_in, hidden_out = n.internal(layer), n.internal(layer + 1)
        t = [f"{name}_internal_{k}" for k in range(11)]
        mlp_name = f"MlpGateLayerV2_{lid}_9"
        m = [f"{mlp_name}_internal_{k}" for k in range(4)]
        post_eps = WRONG_EPSILON if bug == "rmsnorm_eps" and layer == _BUG_LAYER[bug] else eps
        o_transposed = not (bug == "transposed_weight" and layer == _BUG_LAYER[bug])
        attention_param = {"headNum": heads, "kvHeadNum": kv_heads, "headDim": head_dim, "qScale": 1.0,
                           "qkScale": 1.0 / math.sqrt(head_dim), "isTriuMask": 0, "maskType": 1, "calcType": 0,
                           "kernelType": 0, "batchRunStatusEnable": False, "isEncoder": False}
        mlp = _graph(mlp_name, "MlpGateLayerV2", [t[9], w_gate, w_up, w_down], [t[10]], m, [
            _leaf("LinearOperation", f"{lid}_9_0", _linear_param(), [t[9], w_gate], [m[0]]),
            _leaf("LinearOperation", f"{lid}_9_1", _linear_param(), [t[9], w_up], [m[1]]),
            _leaf("ActivationOperation", f"{lid}_9_2", {"activationType": ACTIVATION_SWISH, "scale": 1.0, "dim": -1},
                  [m[0]], [m[2]]),
            _leaf("ElewiseOperation", f"{lid}_9_3", _elewise_param(ELEWISE_MUL), [m[2], m[1]], [m[3]]),
            _leaf("LinearOperation", f"{lid}_9_4", _linear_param(), [m[3], w_down], [t[10]]),
        ])
        children = [
            _leaf("RmsNormOperation", f"{lid}_0", _rms_norm_param(eps), [hidden_in, w_in_norm], [t[0]]),
            _leaf("LinearOperation", f"{lid}_1", _linear_param(), [t[0], w_q], [t[1]]),
            _leaf("LinearOperation", f"{lid}_2", _linear_param(), [t[0], w_k], [t[2]]),
            _leaf("LinearOperation", f"{lid}_3", _linear_param(), [t[0], w_v], [t[3]]),
            _leaf("RopeOperation", f"{lid}_4", {"rotaryCoeff": 2, "cosFormat": 0},
                  [t[1], t[2], n.cos, n.sin, n.seq_len], [t[4], t[5]]),
            _leaf("SelfAttentionOperation", f"{lid}_5", attention_param,
                  [t[4], t[5], t[3], n.k_cache, n.v_cache, n.mask, n.token_offset, n.seq_len, n.layer_id(layer)],
                  [t[6]]),
            _leaf("LinearOperation", f"{lid}_6", _linear_param(o_transposed), [t[6], w_o], [t[7]]),
            _leaf("ElewiseOperation", f"{lid}_7", _elewise_param(ELEWISE_ADD), [hidden_in, t[7]], [t[8]]),
            _leaf("RmsNormOperation", f"{lid}_8", _rms_norm_param(post_eps), [t[8], w_post_norm], [t[9]]),
            mlp,
            _leaf("ElewiseOperation", f"{lid}_10", _elewise_param(ELEWISE_ADD), [t[8], t[10]], [hidden_out]),
        ]
        layer_inputs = [w_in_norm, w_q, w_k, w_v, w_o, w_post_norm, w_gate, w_up, w_down, hidden_in,
                        n.cos, n.sin, n.mask, n.k_cache, n.v_cache, n.token_offset, n.seq_len, n.layer_id(layer)]
        nodes.append(_graph(name, "LlamaLayer", layer_inputs, [hidden_out], t, children))
    last = n.internal(num_layers)
    nodes += [
        _leaf("RmsNormOperation", str(num_layers + 1), _rms_norm_param(eps), [last, n.final_norm_weight],
              [n.internal(num_layers + 1)]),
        _leaf("SliceOperation", str(num_layers + 2), {"offsets": [0, -1, 0], "size": [-1, 1, -1]},
              [n.internal(num_layers + 1)], [n.internal(num_layers + 2)]),
        _leaf("LinearOperation", str(num_layers + 3), _linear_param(), [n.internal(num_layers + 2), n.lm_head_weight],
              [n.output(0)]),
    ]
    return {"modelName": MODEL_NAME, "nodes": nodes}


def op_folders(topology: dict) -> list[tuple[str, dict]]:
    """``(rel_dir, node)`` for every op in execution (pre-order) order, with ATB's folder naming:
    top level ``{opName suffix}_{opType}``, nested ``{sibling index}_{opType}``."""
    found: list[tuple[str, dict]] = []

    def visit(node: dict, rel_dir: str) -> None:
        found.append((rel_dir, node))
        for k, child in enumerate(node.get("nodes", [])):
            visit(child, f"{rel_dir}/{k}_{child['opType']}")

    for node in topology["nodes"]:
        visit(node, f"{node['opName'].rsplit('_', 1)[1]}_{node['opType']}")
    return found


# ------------------------------------------------------------------------------------------------------ kernels
# Each kernel takes (param, inputs) and returns the outputs, computing in float32 and rounding the results to
# bfloat16 once, as ATB's fused kernels do.

#: The port's working dtype: bfloat16, or float16 with PORT_DTYPE=float16 (a second build of the same port, to
#: compare with the first). Read once at import: the port runs as its own process.
PORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BF16 = PORT_DTYPES.get(os.environ.get("PORT_DTYPE") or "bfloat16", torch.bfloat16)


def gather(param: dict, table: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    return [torch.index_select(table, param["axis"], ids.reshape(-1)).reshape(*ids.shape, table.shape[-1])]


def rms_norm(param: dict, x: torch.Tensor, weight: torch.Tensor, *, drift: float = 1.0) -> list[torch.Tensor]:
    xf = x.float()
    eps = param["normParam"]["epsilon"]
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return [(y * weight.float() * drift).to(BF16)]  # drift: a DRIFTS scale, applied before the one rounding


def linear(param: dict, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[torch.Tensor]:
    w = weight.float()
    y = x.float() @ (w.t() if param["transposeB"] else w)
    if param["hasBias"]:
        y = y + bias.float()
    return [y.to(BF16)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(param: dict, q, k, cos, sin, seq_len) -> list[torch.Tensor]:
    head_dim = cos.shape[-1]
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # [b, n, 1, d] broadcast over heads

    def apply(x: torch.Tensor) -> torch.Tensor:
        xh = x.float().reshape(*x.shape[:-1], -1, head_dim)
        return (xh * c + _rotate_half(xh) * s).reshape(x.shape).to(BF16)

    return [apply(q), apply(k)]


def self_attention(param: dict, q, k, v, k_cache, v_cache, mask, token_offset, seq_len, layer_id) -> list[torch.Tensor]:
    """Causal GQA attention over a KV cache: writes this step's k/v into the cache (in place, as ATB does), then
    attends over every cached position, the mask hiding the future and the unused tail of the cache."""
    heads, kv_heads, head_dim = param["headNum"], param["kvHeadNum"], param["headDim"]
    layer, end, n = int(layer_id.item()), int(token_offset.item()), int(seq_len.item())
    k_cache[layer, :, end - n:end] = k
    v_cache[layer, :, end - n:end] = v
    batch = q.shape[0]
    qh = q.float().reshape(batch, n, heads, head_dim).transpose(1, 2)  # [b, h, n, d]
    kh = k_cache[layer].float().reshape(batch, -1, kv_heads, head_dim).transpose(1, 2)  # [b, kvh, S, d]
    vh = v_cache[layer].float().reshape(batch, -1, kv_heads, head_dim).transpose(1, 2)
    group = heads // kv_heads
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    scores = (qh * param["qScale"]) @ kh.transpose(-1, -2) * param["qkScale"] + mask.float().unsqueeze(1)
    out = torch.softmax(scores, dim=-1) @ vh  # [b, h, n, d]
    return [out.transpose(1, 2).reshape(batch, n, heads * head_dim).to(BF16)]


def elewise(param: dict, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    kind = param["elewiseType"]
    if kind == ELEWISE_ADD:
        return [(a.float() + b.float()).to(BF16)]
    if kind == ELEWISE_MUL:
        return [(a.float() * b.float()).to(BF16)]
    raise ValueError(f"elewiseType {kind} is not implemented by this port")


def activation(param: dict, x: torch.Tensor) -> list[torch.Tensor]:
    if param["activationType"] != ACTIVATION_SWISH:
        raise ValueError(f"activationType {param['activationType']} is not implemented by this port")
    xf = x.float()
    return [(xf * torch.sigmoid(xf * param["scale"])).to(BF16)]


def slice_op(param: dict, x: torch.Tensor) -> list[torch.Tensor]:
    index = []
    for dim, (offset, size) in enumerate(zip(param["offsets"], param["size"])):
        start = offset % x.shape[dim] if offset < 0 else offset
        index.append(slice(start, None if size == -1 else start + size))
    return [x[tuple(index)].contiguous()]


KERNELS: dict[str, Callable[..., list[torch.Tensor]]] = {
    "GatherOperation": gather, "RmsNormOperation": rms_norm, "LinearOperation": linear, "RopeOperation": rope,
    "SelfAttentionOperation": self_attention, "ElewiseOperation": elewise, "ActivationOperation": activation,
    "SliceOperation": slice_op,
}


# ------------------------------------------------------------------------------------------------------ the port

def rope_tables(config: dict, positions: torch.Tensor, *,
                apply_scaling: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for ``positions`` ([batch, n]), as the host side of an ATB model computes them before each step."""
    rope_params = config["rope_parameters"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (rope_params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = positions.float()
    if apply_scaling and rope_params.get("rope_type") == "linear":
        pos = pos / rope_params["factor"]
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(BF16), emb.sin().to(BF16)


def weights_from_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> list[torch.Tensor]:
    """The golden's parameters in ATB weight order (``LlamaPortModel_weight_i``), cast to bfloat16."""
    per_layer = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{p}" for i in range(num_layers) for p in per_layer]
    names += ["model.norm.weight", "lm_head.weight"]
    return [state_dict[name].detach().to(BF16).contiguous() for name in names]


class LlamaPort:
    """Runs the topology of :func:`build_topology` op by op, handing each op's tensors to ``recorder``.

    ``recorder`` is an :class:`AtbDumpWriter` (or anything with ``wants_token(token_id)`` and
    ``save_tensors(token_id, rel_dir, inputs, outputs)``); ``None`` runs without dumping.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], config: dict, *, bug: str | None = None,
                 recorder: Any = None, max_seq_len: int = 32):
        if bug is not None and bug not in BUGS and bug not in DRIFTS:
            raise ValueError(f"unknown bug {bug!r}; known: {', '.join([*BUGS, *DRIFTS])}")
        self.config, self.bug, self.recorder, self.max_seq_len = config, bug, recorder, max_seq_len
        self.num_layers = config["num_hidden_layers"]
        self.names = Names(self.num_layers)
        self.topology = build_topology(config, bug if bug in BUGS else None)
        self.ops = op_folders(self.topology)
        weights = weights_from_state_dict(state_dict, self.num_layers)
        self.weights = {self.names.weight(i): w for i, w in enumerate(weights)}
        kv_hidden = config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"])
        self.k_cache = torch.zeros(self.num_layers, 1, max_seq_len, kv_hidden, dtype=BF16)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.token_offset = 0
        self.rounds = 0
        self.kernels = KERNELS  # the TP mode (port_tp.py) adds its row-parallel linear

    def _step_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        n = input_ids.shape[1]
        start, end = self.token_offset, self.token_offset + n
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache ({self.max_seq_len})")
        positions = torch.arange(start, end).unsqueeze(0)
        cos, sin = rope_tables(self.config, positions, apply_scaling=self.bug != "rope_scaling")
        visible = torch.arange(self.max_seq_len)[None, :] <= positions[0][:, None]  # [n, S]
        mask = torch.where(visible, 0.0, torch.finfo(BF16).min).to(BF16).unsqueeze(0)  # [1, n, S]
        names = self.names
        values = {names.ids: input_ids, names.cos: cos, names.sin: sin, names.mask: mask,
                  names.k_cache: self.k_cache, names.v_cache: self.v_cache,
                  names.token_offset: torch.tensor([end], dtype=torch.int32),
                  names.seq_len: torch.tensor([n], dtype=torch.int32)}
        for layer in range(self.num_layers):
            values[names.layer_id(layer)] = torch.tensor([layer], dtype=torch.int32)
        return values

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One execution round (prefill or one decode step): the last position's logits, [1, 1, vocab]."""
        token_id = self.rounds
        recording = self.recorder is not None and self.recorder.wants_token(token_id)
        env = dict(self.weights)
        env.update(self._step_inputs(input_ids))
        mutable = {self.names.k_cache, self.names.v_cache}
        pending: list[tuple[str, dict, list]] = []  # graph ops waiting for their children, with input snapshots

        def snapshot(node: dict) -> list:
            return [env[t].clone() if t in mutable else env[t] for t in node["inTensors"]]

        def finish_graphs_until(depth: int) -> None:
            while len(pending) > depth:
                rel_dir, node, inputs = pending.pop()
                self.recorder.save_tensors(token_id, rel_dir, inputs, [env[t] for t in node["outTensors"]])

        for rel_dir, node in self.ops:
            depth = rel_dir.count("/")
            if recording:
                finish_graphs_until(depth)
            if "nodes" in node:
                if recording:
                    pending.append((rel_dir, node, snapshot(node)))
                continue
            inputs = [env[t] for t in node["inTensors"]]
            saved_inputs = snapshot(node) if recording else None
            drift = DRIFTS.get(self.bug)
            if drift is not None and node["opName"] == drift.op_name:
                outputs = rms_norm(node["param"], *inputs, drift=drift.factor)
            else:
                outputs = self.kernels[node["opType"]](node["param"], *inputs)
            if self.bug == "scale" and node["opName"] == BUGS["scale"].op_name:
                outputs = [(out.float() * SCALE_ERROR).to(BF16) for out in outputs]
            if self.bug == "rmsnorm_scale" and node["opName"] == BUGS["rmsnorm_scale"].op_name:
                outputs = [(out.float() * SCALE_ERROR).to(BF16) for out in outputs]
            env.update(zip(node["outTensors"], outputs))
            if recording:
                self.recorder.save_tensors(token_id, rel_dir, saved_inputs, outputs)
        if recording:
            finish_graphs_until(0)
        self.token_offset += input_ids.shape[1]
        self.rounds += 1
        return env[self.names.output(0)]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy decoding: prefill, then one round per new token (the last one is not fed back)."""
        new_tokens: list[int] = []
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits = self.forward(step_ids)
            token = int(torch.argmax(logits[0, -1].float()))
            new_tokens.append(token)
            step_ids = torch.tensor([[token]], dtype=input_ids.dtype)
        return new_tokens


def build_port(seed: int | None = None, *, bug: str | None = None, recorder: Any = None,
               max_new_tokens: int | None = None):
    """``(port, input_ids, max_new_tokens)`` for the golden of ``model.golden_weights(seed)``."""
    golden = load_golden_module()
    weights, input_ids = golden.golden_weights(golden.DEFAULT_SEED if seed is None else seed)
    config = dict(golden.CONFIG)
    max_new = max_new_tokens or golden.GENERATE_KWARGS["max_new_tokens"]
    port = LlamaPort(weights, config, bug=bug, recorder=recorder,
                     max_seq_len=max(32, input_ids.shape[1] + max_new))
    return port, input_ids, max_new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", choices=sorted([*BUGS, *DRIFTS]), default=os.environ.get("PORT_BUG") or None,
                        help="inject a porting bug (default: $PORT_BUG, unset = healthy port)")
    parser.add_argument("--seed", type=int, default=None, help="golden weight seed (default: model.DEFAULT_SEED)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: model.GENERATE_KWARGS")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: $PORT_TP, else 1)")
    parser.add_argument("--tp-bug", default=os.environ.get("PORT_TP_BUG") or None,
                        help="a TP-only bug of port_tp.TP_BUGS (default: $PORT_TP_BUG)")
    args = parser.parse_args(argv)
    if str(args.tp or os.environ.get("PORT_TP") or "1").strip() != "1":
        return load_sibling("llama_port_port_tp", "port_tp.py").main(sys.modules[__name__], args)
    if args.bug is not None and args.bug not in BUGS and args.bug not in DRIFTS:
        parser.error(f"PORT_BUG={args.bug!r}: expected one of {', '.join(sorted([*BUGS, *DRIFTS]))}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if (os.environ.get("PORT_DTYPE") or "bfloat16") not in PORT_DTYPES:
        parser.error(f"PORT_DTYPE={os.environ['PORT_DTYPE']!r}: expected one of {', '.join(PORT_DTYPES)}")

    from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
    from pytest_ait_llm.errors import AitLlmError

    try:
        writer = AtbDumpWriter.from_env(model_name=MODEL_NAME)
    except AitLlmError as err:  # a malformed ATB_* variable: say which, no traceback
        print(f"port.py: {err}", file=sys.stderr)
        return 2
    port, input_ids, max_new = build_port(args.seed, bug=args.bug, recorder=writer,
                                          max_new_tokens=args.max_new_tokens)
    if writer is not None:
        writer.write_topology(port.topology)
    tokens = port.generate(input_ids, max_new)
    print(f"prompt ids: {input_ids[0].tolist()}")
    print(f"generated token ids: {tokens}" + (f"  (PORT_BUG={args.bug})" if args.bug else ""))
    if writer is not None:
        print(f"ATB dump: {writer.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
