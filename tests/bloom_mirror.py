"""Write an ATB-layout dump that mirrors a torch dump of a HF Bloom with the REAL Bloom ATB topology.

The layer graph is not invented: each layer is the real ``Bloom7bCommonLayer_3`` node of
``data/ait-sample/Bloom7BFlashAttentionModel.json`` (LayerNorm, Linear with bias for qkv, Split, SelfAttention,
ParallelLinearBaseV2 = bias-less Linear + Elewise add of a ``*_weight_*`` bias, the residual Elewise add, LayerNorm,
MlpGateLayerV2 of two ParallelLinearBaseV2 around an Activation, the second residual add, two Muls copies),
renamed for its position with the real naming rules (``{Model}_weight_i``, ``{Model}_internal_i``,
``{Model}_input_i``, ``{Graph}_{id}_internal_i``); the embedding, its LayerNorm, ``ln_f`` and ``lm_head`` sit
outside the layers as in HF Bloom's module tree.

Every tensor is filled *by its name* in the dataflow, so each op's inputs are exactly the outputs of the op that
produced them. Values are the golden (torch) tensors rounded to bf16, except where ATB computes something no torch
module outputs: the bias-less Linear inside a ParallelLinearBaseV2 holds the golden Linear output minus its bias
(taken from the model's state_dict), and the q/k/v are the Split of the fused qkv output. The MlpGateLayerV2
outputs ``dense_4h_to_h``'s output, *before* the residual add, as ATB computes it, whereas HF ``BloomMLP`` returns
it plus the residual (so does ``BloomAttention``): those modules' values are the residual adds' outputs.

``faults`` scales one module's golden output wherever the mirror uses it (its bias-less Linear then holds
``factor * output - bias``), without propagating it downstream: a unit fault the verdict must pin to that op.
A key ``"module:stem"`` (e.g. ``"...dense:input_0"``) scales that one golden file instead, and a key that is an
ATB tensor name (``"Bloom7BFlashAttentionModel_internal_3"``) scales that tensor for the op that writes it and
every op that reads it: a fault in an op that has no torch module, such as a residual add.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
import torch

from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.formats.atb_topology import parse_topology
from pytest_ait_llm.formats.torch_layout import TorchDump

SAMPLE = Path(__file__).parent / "data/ait-sample/Bloom7BFlashAttentionModel.json"
MODEL = "Bloom7BFlashAttentionModel"
WEIGHTS_BEFORE_LAYERS = 3  # word embedding, its LayerNorm's weight and bias
OPS_BEFORE_LAYERS = 2  # GatherOperation_0 (word embedding), LayerNormOperation_1: layer k is op k + 2
WEIGHTS_PER_LAYER = 16  # Bloom7bCommonLayer_3 takes weight_19 .. weight_34
PID = 4343

# What each weight slot of a layer holds (offset from the layer's first weight). Slots 4, 7, 12, 15 are in the
# layer's inTensors but used by no op of the sample (quantisation scales left empty): they get a placeholder.
_LAYER_WEIGHTS = {
    0: "input_layernorm.weight", 1: "input_layernorm.bias",
    2: "self_attention.query_key_value.weight", 3: "self_attention.query_key_value.bias",
    5: "self_attention.dense.weight", 6: "self_attention.dense.bias",
    8: "post_attention_layernorm.weight", 9: "post_attention_layernorm.bias",
    10: "mlp.dense_h_to_4h.weight", 11: "mlp.dense_h_to_4h.bias",
    13: "mlp.dense_4h_to_h.weight", 14: "mlp.dense_4h_to_h.bias",
}

# Where the value of each tensor of the sample layer comes from, keyed by the sample's own names (module paths
# are relative to the torch layer, "" being the layer itself). Model-level names are relative to the sample layer:
# internal_2 is its input, internal_3 its output.
_LAYER_TENSORS: dict[str, tuple] = {
    f"{MODEL}_internal_2": ("golden", "", "input_0"),
    "Bloom7bCommonLayer_3_internal_0": ("golden", "input_layernorm", "output"),
    "Bloom7bCommonLayer_3_internal_1": ("golden", "self_attention.query_key_value", "output"),
    "Bloom7bCommonLayer_3_internal_2": ("split", "self_attention.query_key_value", 0),
    "Bloom7bCommonLayer_3_internal_3": ("split", "self_attention.query_key_value", 1),
    "Bloom7bCommonLayer_3_internal_4": ("split", "self_attention.query_key_value", 2),
    "Bloom7bCommonLayer_3_internal_5": ("golden", "self_attention.dense", "input_0"),
    "ParallelLinearBaseV2_3_4_internal_0": ("no_bias", "self_attention.dense"),
    "Bloom7bCommonLayer_3_internal_6": ("golden", "self_attention.dense", "output"),
    "Bloom7bCommonLayer_3_internal_7": ("golden", "post_attention_layernorm", "input_0"),  # first residual add
    "Bloom7bCommonLayer_3_internal_8": ("golden", "post_attention_layernorm", "output"),
    "ParallelLinearBaseV2_3_7_0_internal_0": ("no_bias", "mlp.dense_h_to_4h"),
    "MlpGateLayerV2_3_7_internal_0": ("golden", "mlp.dense_h_to_4h", "output"),
    "MlpGateLayerV2_3_7_internal_1": ("golden", "mlp.gelu_impl", "output"),
    "ParallelLinearBaseV2_3_7_2_internal_0": ("no_bias", "mlp.dense_4h_to_h"),
    # the MlpGateLayerV2 output: dense_4h_to_h's, before the residual add (HF BloomMLP's output includes it)
    "Bloom7bCommonLayer_3_internal_9": ("golden", "mlp.dense_4h_to_h", "output"),
    f"{MODEL}_internal_3": ("golden", "", "output_0"),  # second residual add = layer output
    f"{MODEL}_output_2": ("copy", f"{MODEL}_internal_3"),  # Muls by 1: copies of the layer output
    f"{MODEL}_output_3": ("copy", f"{MODEL}_internal_3"),
}


def _sample_layer() -> tuple[dict, int, int]:
    """(the sample's layer node, its top-level id, its layer index k derived from its first weight)."""
    (layer,) = json.loads(SAMPLE.read_text())["nodes"]
    top_id = int(layer["opName"].rsplit("_", 1)[1])
    first_weight = min(int(n.rsplit("_", 1)[1]) for n in layer["inTensors"] if "_weight_" in n)
    return layer, top_id, (first_weight - WEIGHTS_BEFORE_LAYERS) // WEIGHTS_PER_LAYER


class _Renamer:
    """Renames the sample layer's op and tensor names for layer ``k`` (top-level id ``k + OPS_BEFORE_LAYERS``)."""

    def __init__(self, sample_id: int, sample_k: int, k: int):
        self.top_id = k + OPS_BEFORE_LAYERS
        self.shift = {"weight": WEIGHTS_PER_LAYER * (k - sample_k), "internal": k - sample_k,
                      "output": 2 * (k - sample_k), "input": 0}
        self.local = re.compile(rf"^([A-Za-z0-9]+)_{sample_id}(?=(?:_\d+)*(?:_internal_\d+)?$)")

    def __call__(self, name: str) -> str:
        m = re.fullmatch(rf"{MODEL}_(weight|internal|output|input)_(\d+)", name)
        if m:
            return f"{MODEL}_{m[1]}_{int(m[2]) + self.shift[m[1]]}"
        return self.local.sub(rf"\g<1>_{self.top_id}", name)


def _rename_node(node: dict, rename: _Renamer, config) -> dict:
    out = copy.deepcopy(node)
    stack = [out]
    while stack:
        n = stack.pop()
        n["opName"] = rename(n["opName"])
        for key in ("inTensors", "outTensors", "internalTensors"):
            if key in n:
                n[key] = [rename(t) for t in n[key]]
        if n["opType"] == "SelfAttentionOperation":
            head_dim = config.hidden_size // config.n_head
            n["param"].update(headNum=config.n_head, headDim=head_dim, qScale=1 / math.sqrt(head_dim))
        if n["opType"] == "LayerNormOperation":
            n["param"]["normParam"]["epsilon"] = config.layer_norm_epsilon
        stack.extend(n.get("nodes", []))
    return out


def build(config) -> tuple[dict, dict[str, tuple], dict[str, str]]:
    """(topology dict, tensor name -> value source, ground truth rel_dir -> torch module) for ``config``."""
    sample, sample_id, sample_k = _sample_layer()
    n_layers = config.n_layer
    w = lambda i: f"{MODEL}_weight_{i}"  # noqa: E731
    internal = lambda i: f"{MODEL}_internal_{i}"  # noqa: E731
    ln_param = copy.deepcopy(sample["nodes"][0]["param"])
    ln_param["normParam"]["epsilon"] = config.layer_norm_epsilon
    sources: dict[str, tuple] = {
        f"{MODEL}_input_0": ("golden", "root.transformer.word_embeddings", "input_0"),
        w(0): ("param", "transformer.word_embeddings.weight", False),
        internal(0): ("golden", "root.transformer.word_embeddings", "output"),
        w(1): ("param", "transformer.word_embeddings_layernorm.weight", False),
        w(2): ("param", "transformer.word_embeddings_layernorm.bias", False),
        internal(1): ("golden", "root.transformer.word_embeddings_layernorm", "output"),
    }
    nodes = [
        {"opName": "GatherOperation_0", "opType": "GatherOperation", "param": {"axis": 0},
         "inTensors": [w(0), f"{MODEL}_input_0"], "outTensors": [internal(0)]},
        {"opName": "LayerNormOperation_1", "opType": "LayerNormOperation", "param": ln_param,
         "inTensors": [internal(0), w(1), w(2)], "outTensors": [internal(1)]},
    ]
    truth = {"0_GatherOperation": "root.transformer.word_embeddings",
             "1_LayerNormOperation": "root.transformer.word_embeddings_layernorm"}
    transposed = {n["inTensors"][1] for n in _leaves(sample)
                  if n["opType"] == "LinearOperation" and not n["param"].get("transposeB")}
    for k in range(n_layers):
        rename = _Renamer(sample_id, sample_k, k)
        nodes.append(_rename_node(sample, rename, config))
        layer = f"root.transformer.h.{k}"
        sample_first = WEIGHTS_BEFORE_LAYERS + WEIGHTS_PER_LAYER * sample_k
        for j in range(WEIGHTS_PER_LAYER):
            sample_name, param = w(sample_first + j), _LAYER_WEIGHTS.get(j)
            sources[rename(sample_name)] = (("param", f"transformer.h.{k}.{param}", sample_name in transposed)
                                            if param else ("placeholder",))
        for name, (kind, rel, *rest) in _LAYER_TENSORS.items():
            if kind == "copy":
                sources[rename(name)] = (kind, rename(rel))
            else:
                sources[rename(name)] = (kind, f"{layer}.{rel}" if rel else layer, *rest)
        t = rename.top_id
        d = f"{t}_BloomLayer"
        truth.update({
            d: layer,
            f"{d}/0_LayerNormOperation": f"{layer}.input_layernorm",
            f"{d}/1_LinearOperation": f"{layer}.self_attention.query_key_value",
            f"{d}/4_ParallelLinearBaseV2/0_LinearOperation": f"{layer}.self_attention.dense",
            f"{d}/5_ElewiseOperation": f"{layer}.self_attention",  # HF BloomAttention adds the residual
            f"{d}/6_LayerNormOperation": f"{layer}.post_attention_layernorm",
            f"{d}/7_MlpGateLayerV2": f"{layer}.mlp",
            f"{d}/7_MlpGateLayerV2/0_ParallelLinearBaseV2/0_LinearOperation": f"{layer}.mlp.dense_h_to_4h",
            f"{d}/7_MlpGateLayerV2/2_ParallelLinearBaseV2/0_LinearOperation": f"{layer}.mlp.dense_4h_to_h",
        })
    t = n_layers + OPS_BEFORE_LAYERS
    first = WEIGHTS_BEFORE_LAYERS + WEIGHTS_PER_LAYER * n_layers
    logits = f"{MODEL}_output_{2 * n_layers}"
    nodes += [
        {"opName": f"LayerNormOperation_{t}", "opType": "LayerNormOperation", "param": ln_param,
         "inTensors": [internal(n_layers + 1), w(first), w(first + 1)], "outTensors": [internal(n_layers + 2)]},
        {"opName": f"LinearOperation_{t + 1}", "opType": "LinearOperation",
         "param": {"hasBias": False, "transposeA": False, "transposeB": True},
         "inTensors": [internal(n_layers + 2), w(first + 2)], "outTensors": [logits]},
    ]
    sources.update({
        w(first): ("param", "transformer.ln_f.weight", False),
        w(first + 1): ("param", "transformer.ln_f.bias", False),
        internal(n_layers + 2): ("golden", "root.transformer.ln_f", "output"),
        w(first + 2): ("param", "lm_head.weight", False),
        logits: ("golden", "root.lm_head", "output"),
    })
    truth.update({f"{t}_LayerNormOperation": "root.transformer.ln_f", f"{t + 1}_LinearOperation": "root.lm_head"})
    return {"modelName": MODEL, "nodes": nodes}, sources, truth


def _leaves(node: dict):
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get("nodes"):
            stack.extend(n["nodes"])
        else:
            yield n


def _model_inputs(seq: int, hidden: int, dtype) -> dict[str, torch.Tensor]:
    """The runtime inputs of the flash-attention model that no torch module sees (mask, KV cache, lengths...)."""
    return {
        f"{MODEL}_input_1": torch.full((seq, seq), -10000.0).triu(1).to(dtype),  # attention mask
        f"{MODEL}_input_2": torch.zeros(1, seq, hidden, dtype=dtype),  # K cache
        f"{MODEL}_input_3": torch.zeros(1, seq, hidden, dtype=dtype),  # V cache
        f"{MODEL}_input_4": torch.tensor([seq], dtype=torch.int32),  # token offset
        f"{MODEL}_input_5": torch.tensor([seq], dtype=torch.int32),  # sequence length
        f"{MODEL}_input_6": torch.zeros(1, dtype=dtype),  # placeholder of the optional quantisation inputs
        f"{MODEL}_input_8": torch.zeros(1, dtype=torch.int32),  # layer id
    }


class _Values:
    """Resolves tensor names to the values ATB would hold, for one token."""

    def __init__(self, golden: TorchDump, model, token: int, sources: dict[str, tuple], faults: dict, dtype):
        self.golden, self.token, self.sources, self.faults, self.dtype = golden, token, sources, faults, dtype
        self.state = model.state_dict()
        self.n_head = model.config.n_head
        ids = self._golden("root.transformer.word_embeddings", "input_0")
        self.fixed = _model_inputs(ids.shape[-1], model.config.hidden_size, dtype)
        self.cache: dict[str, torch.Tensor] = {}

    def _golden(self, module: str, stem: str) -> torch.Tensor:
        t = torch.load(self.golden.module_dir(self.token, module) / f"{stem}.pth", weights_only=True)
        factor = self.faults.get(f"{module}:{stem}", self.faults.get(module, 1.0) if stem.startswith("output") else 1.0)
        return t.float() * factor if t.is_floating_point() else t

    def _exact(self, name: str) -> torch.Tensor:
        if name in self.fixed:
            return self.fixed[name]
        kind, *args = self.sources[name]
        if kind == "golden":
            return self._golden(*args)
        if kind == "no_bias":  # what ATB's bias-less Linear outputs before the Elewise add of the bias
            (module,) = args
            return self._golden(module, "output") - self.state[f"{module.removeprefix('root.')}.bias"].float()
        if kind == "split":  # SplitOperation splitDim 3 of the qkv output seen as [batch, seq, heads, 3 * head_dim]
            module, index = args
            qkv = self._golden(module, "output")
            return qkv.reshape(*qkv.shape[:-1], self.n_head, -1).chunk(3, dim=-1)[index]
        if kind == "param":
            key, transpose = args
            weight = self.state[key].float()
            return weight.t().contiguous() if transpose else weight
        if kind == "placeholder":
            return torch.zeros(1)
        if kind == "copy":
            return self._faulted(args[0])
        raise KeyError(name)

    def _faulted(self, name: str) -> torch.Tensor:
        t = self._exact(name)
        return t * self.faults[name] if name in self.faults else t

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            t = self._faulted(name)
            self.cache[name] = t.to(self.dtype) if t.is_floating_point() else t
        return self.cache[name]


def write_mirror(golden: TorchDump, model, out_dir: Path, *, dtype=torch.bfloat16,
                 faults: dict[str, float] | None = None, tokens=None) -> tuple[Path, dict[str, str]]:
    """Write the mirror of ``golden`` (a dump of ``model``) under ``out_dir``.

    Returns (ATB dump root, ground truth ATB rel_dir -> torch module for every op that has a torch counterpart).
    """
    topo, sources, truth = build(model.config)
    tokens = golden.tokens if tokens is None else tokens
    writer = AtbDumpWriter(out_dir, model_name=MODEL, pid=PID, device_id=0,
                           token_range=[(min(tokens), max(tokens))], time=3)
    writer.write_topology(topo)
    ops = list(parse_topology(topo).walk())
    for token in tokens:
        value = _Values(golden, model, token, sources, faults or {}, dtype)
        for op in ops:
            writer.save_tensors(token, op.rel_dir, [value(n) for n in op.in_tensors],
                                [value(n) for n in op.out_tensors])
    return writer.root, truth

