"""Pairing on five model families, each a tiny CPU model dumped by our hooks and an ATB port of it.

Llama and Qwen2 (tests/atb_mirror.py), Bloom with the real Bloom-7B layer (tests/bloom_mirror.py), GPT-NeoX with
a parallel residual and ChatGLM2-6B-style (tests/family_mirrors.py): pairing precision and recall against each port's
ground truth, and a unit fault in one module is the first divergence the comparison names.

The modules that are not one op: Bloom's MLP and attention return their output plus the residual (paired with the
residual add, in tests/test_bloom.py); NeoX's ``GPTNeoXMLP``/``GPTNeoXAttention`` and ChatGLM2's ``SelfAttention``
return their last Linear's output and have no ATB op of their own; ChatGLM2's ``Embedding`` wraps
``word_embeddings``, both of type ``Embedding``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import atb_mirror
import bloom_mirror
from chatglm2_model import tiny_chatglm2
from family_mirrors import GLM_CONTAINERS, NEOX_CONTAINERS, build_chatglm2, build_neox, write_port
from hf_models import input_ids, tiny_bloom, tiny_llama, tiny_qwen2
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.compare.metrics import shapes_compatible
from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
from pytest_ait_llm.formats.atb_bin import read_bin_header
from pytest_ait_llm.formats.atb_layout import op_files, open_atb_dump
from pytest_ait_llm.formats.torch_layout import open_torch_dump
from pytest_ait_llm.mapping.pairing import SAME_QUANTITY, pair_ops
from pytest_ait_llm.mapping.rules import mapping_table

LAYERS = 2


def tiny_neox(seed: int = 0):
    """A ``GPTNeoXForCausalLM`` with a parallel residual (attention and MLP both read the layer input)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, use_parallel_residual=True,
                           attn_implementation="eager", bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
        with torch.no_grad():  # biases and LayerNorm affine parameters away from their init (0 and 1)
            for name, p in model.named_parameters():
                if name.endswith(".bias") or "layernorm" in name or "layer_norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def dump(model, out: Path):
    with register_hook(model, DumpConfig(dump_path=out, token_range=(0,))) as handle, torch.no_grad():
        model(input_ids(seq=8))
    return open_torch_dump(handle.dump_dir)


class Family:
    """A model, its golden dump, and a writer of its ATB port: ``port(out, faults) -> (root, truth)``."""

    def __init__(self, factory, name: str):
        self.name = name
        self.model = self.make_model()
        self.golden = dump(self.model, factory.mktemp(f"{name}-golden"))
        self.factory = factory

    def make_model(self):
        return {"llama": lambda: tiny_llama(num_layers=LAYERS), "qwen2": lambda: tiny_qwen2(num_layers=LAYERS),
                "bloom": lambda: tiny_bloom(num_layers=LAYERS), "neox": tiny_neox, "chatglm2": tiny_chatglm2}[self.name]()

    def port(self, faults=None):
        out = self.factory.mktemp(f"{self.name}-port")
        if self.name in ("llama", "qwen2"):
            return atb_mirror.write_mirror(self.golden, out, num_layers=LAYERS, faults=faults)
        if self.name == "bloom":
            return bloom_mirror.write_mirror(self.golden, self.model, out, faults=faults)
        topology, sources, truth = (build_neox(LAYERS) if self.name == "neox" else build_chatglm2(self.model.config))
        return write_port(self.golden, out, topology, sources, pid=4545, faults=faults), truth


FAMILIES = ["llama", "qwen2", "bloom", "neox", "chatglm2"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    fam = Family(tmp_path_factory, request.param)
    fam.healthy = fam.port()
    fam.result = run_compare(fam.golden, fam.healthy[0], write_csv=False)
    return fam


def _paired(result) -> set[tuple[str, str]]:
    return {(r.atb_op, r.torch_module) for r in result.rows
            if r.status in ("compared", "mapping_suspect") and r.token_id == 0}


def _precision_recall(found: set, truth: set) -> tuple[float, float]:
    hits = len(found & truth)
    return (hits / len(found) if found else 1.0), hits / len(truth)


def test_pairing_precision_and_recall_on_every_family(family):
    _, truth = family.healthy
    precision, recall = _precision_recall(_paired(family.result), set(truth.items()))
    assert (precision, recall) == (1.0, 1.0), (family.name, sorted(_paired(family.result) ^ set(truth.items())))
    assert family.result.passed, family.result.failure_message()


def test_every_op_and_module_is_accounted_for(family):
    (rank,) = open_atb_dump(family.healthy[0]).ranks
    listed = {r.atb_op for r in family.result.rows if r.atb_op}
    assert listed == {op.rel_dir for op in rank.topology().walk()}
    modules = {r.torch_module for r in family.result.rows if r.torch_module}
    assert modules == {m.name for m in family.golden.tree.walk()}


def test_type_rules_match_whole_type_names(family):
    """The built-in ``Embedding`` rule pairs embeddings, never a ``*RotaryEmbedding``."""
    rotary = [r for r in family.result.rows if r.golden_op_type.endswith("RotaryEmbedding")]
    assert all(r.status == "unpaired" and "shape-compatible" not in r.reason for r in rotary)


# ------------------------------------------------------------------------------------ modules that are not one op

def _exact_shapes(golden, my_root):
    """The shape check a comparison makes: do the pair's first output files have compatible shapes?"""
    (rank,) = open_atb_dump(my_root).ranks
    token_dir = rank.token_dirs[0]

    def compatible(pair):
        stems = {"output", "output_0"} if pair.torch_stem in ("output", "output_0") else {pair.torch_stem}
        g = [f for f in golden.module_files(0, pair.module.name).outputs if pair.torch_stem is None or f.stem in stems]
        m = [f for f in op_files(token_dir, pair.files_op).outputs if pair.atb_stem in (None, f.stem)]
        if not g or not m:
            return None
        return shapes_compatible(torch.load(g[0], weights_only=True).shape, read_bin_header(m[0]).dims) is not None

    return rank.topology(), compatible


@pytest.mark.parametrize("name, containers", [("neox", NEOX_CONTAINERS), ("chatglm2", GLM_CONTAINERS)])
def test_containers_are_the_same_quantity_as_their_last_child(name, containers, tmp_path_factory):
    fam = Family(tmp_path_factory, name)
    root, truth = fam.port()
    topology, compatible = _exact_shapes(fam.golden, root)
    by_module = {module: op for op, module in truth.items()}
    expected = set(truth.items())
    for m in fam.golden.tree.walk():
        for container, child in containers.items():
            if m.name == container or m.name.endswith("." + container):
                expected.add((by_module[m.name[: len(m.name) - len(container)] + child], m.name))
    pairing = pair_ops(topology, fam.golden.tree, mapping_table(), compatible, containers=True)
    found = {(p.atb.rel_dir, p.module.name) for p in pairing.pairs}
    assert _precision_recall(found, expected) == (1.0, 1.0), sorted(found ^ expected)
    for pair in pairing.pairs:
        if (pair.atb.rel_dir, pair.module.name) not in truth.items():
            assert pair.note.startswith(SAME_QUANTITY)
    # by default a comparison lists them as compared in their child's row, not as "no mapping"
    result = run_compare(fam.golden, root, write_csv=False)
    reasons = {r.torch_module: r.reason for r in result.rows if r.status == "unpaired" and r.torch_module}
    for atb_op, module in expected - set(truth.items()):
        assert SAME_QUANTITY in reasons[module] and truth[atb_op] in reasons[module], reasons[module]


@pytest.mark.parametrize("family", ["chatglm2"], indirect=True)
def test_chatglm2_embedding_wrapper_pairs_the_gather_with_the_inner_embedding(family):
    rows = {r.torch_module: r for r in family.result.rows if r.token_id in (None, 0) and r.torch_module}
    inner = rows["root.transformer.embedding.word_embeddings"]
    assert inner.status == "compared" and inner.atb_op == "0_GatherOperation" and inner.passed
    wrapper = rows["root.transformer.embedding"]
    assert wrapper.status == "unpaired" and "ambiguous" not in wrapper.reason
    assert wrapper.reason.startswith(f"{SAME_QUANTITY} root.transformer.embedding.word_embeddings")


# ---------------------------------------------------------------------------------------------- faults named first

FAULTS = {
    "qwen2": ["root.model.layers.1.self_attn.k_proj", "root.model.layers.0.mlp.down_proj"],
    "neox": ["root.gpt_neox.layers.1.mlp.dense_4h_to_h", "root.gpt_neox.layers.0.attention.query_key_value",
             "root.gpt_neox.embed_in"],
    "chatglm2": ["root.transformer.encoder.layers.1.self_attention.core_attention",
                 "root.transformer.encoder.layers.0.mlp.dense_h_to_4h",
                 "root.transformer.embedding.word_embeddings"],
}


@pytest.mark.parametrize("name, module", [(n, m) for n, ms in FAULTS.items() for m in ms])
def test_injected_fault_is_named_first(name, module, tmp_path_factory):
    fam = Family(tmp_path_factory, name)
    root, truth = fam.port(faults={module: 1.05})
    result = run_compare(fam.golden, root, write_csv=False)
    first = result.first_divergence
    assert first is not None, result.failure_message()
    assert (first.torch_module, first.atb_op) == (module, {m: op for op, m in truth.items()}[module])
    assert [r.first_divergence for r in result.rows].count(True) == 1
