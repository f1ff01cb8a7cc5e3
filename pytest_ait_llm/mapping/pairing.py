"""Pair ATB ops with torch modules: layers first, then ops within each layer, then the ops outside the layers.

The original zipped same-type ops per layer and skipped a type silently when the counts differed. Here:
- layers are detected for any number of layers (1 included) on both sides and paired by position;
- within a layer (and outside the layers) each mapping rule's candidates are aligned in execution order, and a
  candidate pair must be confirmed by the tensor shapes (a ``compatible`` callback supplied by the caller);
- when more than one alignment is equally good, the ops involved are reported as ambiguous, never guessed;
- a bias-less Linear whose output feeds an add of a *weight* (ATB's ParallelLinearBaseV2 = Linear + bias add) is
  paired through that add; an add of an *activation* is a residual add and is not folded (the original could not
  tell the two apart and paired o_proj with the residual sum);
- modules that are not one op (see docs/model_families.md):
  - a module whose output includes its residual (:data:`RESIDUAL_INCLUSIVE`: HF ``BloomMLP``, ``BloomAttention``)
    is paired with the residual add found by dataflow: the Elewise add that consumes the output of the module's ATB
    computation and a tensor that computation was derived from (its residual input);
  - a container with no ATB op of its own whose output is its last child's (``GPTNeoXMLP``) is the same quantity
    as that child: listed so, or (``containers=True``) paired with the child's op too, a row per module;
  - when a rule's candidates nest (ChatGLM2's ``Embedding`` wrapper around ``word_embeddings``, both
    ``Embedding``), the op is aligned with the innermost, and the wrapper is paired as the container of it;
- every ATB op and every torch module ends in the result: paired, or unpaired with the reason.

Cost: rules are found through the table's type index; each rule's candidates in a scope are aligned in a band
around the diagonal (:func:`align`), near-linear when most candidates fit, at most :data:`MAX_ALIGN_CELLS` candidate
pairs (beyond that the candidates are reported unpaired with the limit as the reason).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..formats.atb_topology import AtbOp, AtbTopology
from ..formats.torch_layout import TorchModule
from .rules import MappingRule, MappingTable, family_prefixes, torch_type_keys

ELEWISE_ADD = 8
#: HF module types whose output is their computation *plus their residual input* (HF Bloom's dropout_add).
RESIDUAL_INCLUSIVE = frozenset({"BloomMLP", "BloomAttention"})
#: Most candidate pairs one rule's alignment may ask about in one layer: beyond, seconds per rule.
MAX_ALIGN_CELLS = 4_000_000
SAME_QUANTITY = "same quantity as"  # starts the note of a container's pair


@dataclass
class OpPair:
    """One ATB op and the torch module it is compared with."""

    atb: AtbOp
    module: TorchModule
    rule: str  # the mapping rule (or "layer") that made the pair
    atb_stem: str | None = None  # a specific ATB file stem ("outtensor0") or None for all outputs
    torch_stem: str | None = None  # a specific torch file stem ("output_0") or None for all outputs
    output_op: AtbOp | None = None  # op whose files hold the outputs (the bias add when folded); None = atb
    note: str = ""

    @property
    def files_op(self) -> AtbOp:
        return self.output_op or self.atb


@dataclass
class Unpaired:
    """An ATB op or torch module that has no counterpart, and why."""

    side: str  # "atb" or "torch"
    name: str  # ATB rel_dir or torch module name
    op_type: str
    reason: str
    op: AtbOp | TorchModule | None = field(default=None, repr=False)


@dataclass
class Pairing:
    pairs: list[OpPair]
    unpaired: list[Unpaired]
    atb_layers: list[AtbOp]
    torch_layers: list[TorchModule]


Compatible = Callable[[OpPair], "bool | None"]  # True/False from shapes; None when a side has no tensor to tell


# ---------------------------------------------------------------------------------------------------------- layers

def atb_layers(topology: AtbTopology) -> list[AtbOp]:
    """The layer ops: in the shallowest sibling list that holds graph ops, those of the most frequent graph type.

    Works for one layer as for eighty (the original needed more than ten same-type children).
    """
    siblings: list[AtbOp] = list(topology.ops)
    while siblings:
        graphs = [op for op in siblings if not op.is_leaf]
        if not graphs:
            return []
        counts = Counter(op.op_type for op in graphs)
        if len(siblings) == 1 and len(graphs) == 1 and _looks_like_wrapper(graphs[0]):
            siblings = list(graphs[0].children)
            continue
        layer_type = max(counts, key=lambda t: (counts[t], -_first_index(graphs, t)))
        return [op for op in graphs if op.op_type == layer_type]
    return []


def _looks_like_wrapper(op: AtbOp) -> bool:
    """A single graph op whose children repeat a graph type (a whole-model graph), not a single layer."""
    counts = Counter(c.op_type for c in op.children if not c.is_leaf)
    return bool(counts) and max(counts.values()) > 1


def _first_index(ops: Sequence[AtbOp], op_type: str) -> int:
    return next(i for i, op in enumerate(ops) if op.op_type == op_type)


def torch_layers(tree: TorchModule) -> list[TorchModule]:
    """The decoder layers: the largest run of same-type children named ``<parent>.<int>`` (an nn.ModuleList).

    A tree without such a list (a dumped single block, like the ait sample) is one layer: its root.
    """
    best: list[TorchModule] = []
    for module in tree.walk():
        numbered = [c for c in module.children if c.name.rsplit(".", 1)[-1].isdigit()]
        if not numbered:
            continue
        counts = Counter(c.type for c in numbered)
        layer_type, n = counts.most_common(1)[0]
        if n > len(best):
            best = [c for c in numbered if c.type == layer_type]
    if best:
        return best
    return [tree] if tree.children else []


# --------------------------------------------------------------------------------------------------------- helpers

def completion_order(topology: AtbTopology) -> dict[int, int]:
    """Post-order index of every op, keyed by id(op): when its outputs exist (a graph op finishes after its parts)."""
    order: dict[int, int] = {}

    def visit(op: AtbOp) -> None:
        for child in op.children:
            visit(child)
        order[id(op)] = len(order)

    for op in topology.ops:
        visit(op)
    return order


def _param(op: AtbOp, key: str):
    return op.param.get(key) if isinstance(op.param, dict) else None


def is_weight(name: str) -> bool:
    return "_weight_" in name


def is_add(op: AtbOp) -> bool:
    return op.is_leaf and "Elewise" in op.op_type and _param(op, "elewiseType") == ELEWISE_ADD


class Dataflow:
    """The leaves' tensor names as a graph: who writes a tensor, who reads it."""

    def __init__(self, topology: AtbTopology):
        self.producer: dict[str, AtbOp] = {}
        self.consumers: dict[str, list[AtbOp]] = {}
        for op in topology.walk():
            if not op.is_leaf:
                continue
            for name in op.out_tensors:
                self.producer.setdefault(name, op)
            for name in op.in_tensors:
                self.consumers.setdefault(name, []).append(op)

    def derived_from(self, tensor: str, source: str, within: set[int]) -> bool:
        """Whether ``tensor`` is computed from ``source``, following the writers of activations among ``within``."""
        seen, stack = {tensor}, [tensor]
        while stack:
            op = self.producer.get(stack.pop())
            if op is None or id(op) not in within:
                continue
            for name in op.in_tensors:
                if name == source:
                    return True
                if name not in seen and not is_weight(name):
                    seen.add(name)
                    stack.append(name)
        return False

    def residual_adds(self, tensor: str, within: set[int]) -> list[AtbOp]:
        """The Elewise adds of ``tensor`` and a tensor it was computed from: residual connections around it."""
        return [add for add in self.consumers.get(tensor, ()) if is_add(add) and id(add) in within
                and (others := [n for n in add.in_tensors if n != tensor])
                and all(not is_weight(n) and self.derived_from(tensor, n, within) for n in others)]


def bias_adds(topology: AtbTopology, flow: Dataflow | None = None) -> dict[int, AtbOp]:
    """Map id(bias-less Linear) -> the Elewise add that adds a weight (a bias) to its output.

    Only an add whose every other input is a ``*_weight_*`` tensor counts; an add of an activation is a residual.
    """
    flow = flow or Dataflow(topology)
    folded: dict[int, AtbOp] = {}
    for op in topology.walk():
        if (not op.is_leaf or "Linear" not in op.op_type or _param(op, "hasBias") is not False
                or len(op.out_tensors) != 1):
            continue
        users = flow.consumers.get(op.out_tensors[0], [])
        if len(users) != 1 or not is_add(users[0]):
            continue
        others = [n for n in users[0].in_tensors if n != op.out_tensors[0]]
        if others and all(is_weight(n) for n in others):
            folded[id(op)] = users[0]
    return folded


def _subtree(op):
    return list(op.walk())


# ------------------------------------------------------------------------------------------------------- alignment

def align(n_atb: int, n_torch: int, ok: Callable[[int, int], bool],
          max_cells: int | None = None) -> tuple[list[tuple[int, int]], set[int], set[int]] | None:
    """Order-preserving alignment of two candidate lists that maximises the confirmed pairs.

    Returns (pairs, ambiguous ATB indices, ambiguous torch indices). A pair is kept only if it is in *every* optimal
    alignment; the others are reported as ambiguous instead of being guessed. None when the search would need more
    than ``max_cells`` candidate pairs.

    A confirmed pair (i, j) lies on an optimal alignment when the best prefix before it, plus one, plus the best
    suffix after it, is the optimum; it is then the k-th pair (k = best prefix + 1) of every optimal alignment it
    lies on. Every optimal alignment has one k-th pair, taken among those, so (i, j) is in all of them exactly when
    it is the only one of its rank. The search runs in a band around the diagonal, widened until no alignment
    leaving the band can be as good: O((n + m) * band), ``ok`` asked only inside the band.
    """
    if n_atb == n_torch and all(ok(i, i) for i in range(n_atb)):
        return [(i, i) for i in range(n_atb)], set(), set()
    low, high = min(0, n_torch - n_atb), max(0, n_torch - n_atb)  # offsets j - i of the diagonal's two ends
    fits: dict[tuple[int, int], bool] = {}
    extra = 4
    while True:
        lo, hi = low - extra, high + extra
        whole = lo <= -n_atb and hi >= n_torch
        cells = (n_atb + 1) * (min(hi, n_torch) - max(lo, -n_atb) + 1)
        if max_cells is not None and cells > max_cells:
            return None
        result = _align_in_band(n_atb, n_torch, ok, fits, lo, hi)
        # an alignment leaving the band skips at least (high - low) + 2 * extra + 2 candidates: when the band's
        # best skips fewer, every optimal alignment is inside the band
        skipped = n_atb + n_torch - 2 * result[0]
        if whole or skipped < 2 * extra + (high - low):
            return result[1:]
        extra *= 2


def _align_in_band(n_atb: int, n_torch: int, ok, fits: dict, lo: int, hi: int):
    """(optimum, pairs, ambiguous ATB, ambiguous torch) over the alignments whose cells keep lo <= j - i <= hi."""
    neg = -(n_atb + n_torch + 1)  # outside the band: never the max

    def cols(i: int) -> range:
        return range(max(0, i + lo), min(n_torch, i + hi) + 1)

    def fit(i: int, j: int) -> bool:
        if (i, j) not in fits:
            fits[(i, j)] = ok(i, j)
        return fits[(i, j)]

    fwd = [[neg] * (n_torch + 2) for _ in range(n_atb + 2)]  # fwd[i][j]: most pairs among A[:i], T[:j]
    for i in range(n_atb + 1):
        row, prev = fwd[i], fwd[i - 1] if i else None
        for j in cols(i):
            if i == 0 or j == 0:
                row[j] = 0
            else:
                row[j] = max(prev[j], row[j - 1], prev[j - 1] + 1 if fit(i - 1, j - 1) else neg)
    back = [[neg] * (n_torch + 2) for _ in range(n_atb + 2)]  # back[i][j]: most pairs among A[i:], T[j:]
    for i in range(n_atb, -1, -1):
        row, nxt = back[i], back[i + 1]
        for j in reversed(cols(i)):
            if i == n_atb or j == n_torch:
                row[j] = 0
            else:
                row[j] = max(nxt[j], row[j + 1], nxt[j + 1] + 1 if fit(i, j) else neg)
    optimum = back[0][0]
    by_rank: dict[int, list[tuple[int, int]]] = {}
    for i in range(n_atb):
        for j in cols(i):
            if j < n_torch and fit(i, j) and fwd[i][j] + 1 + back[i + 1][j + 1] == optimum:
                by_rank.setdefault(fwd[i][j], []).append((i, j))
    kept, amb_a, amb_t = [], set(), set()
    for rank in sorted(by_rank):
        if len(by_rank[rank]) == 1:
            kept.append(by_rank[rank][0])
        else:
            amb_a.update(i for i, _ in by_rank[rank])
            amb_t.update(j for _, j in by_rank[rank])
    return optimum, kept, amb_a, amb_t


# --------------------------------------------------------------------------------------------------------- pairing

class _Scope:
    """Pairs the ATB ops and torch modules of one layer (or of the region outside the layers)."""

    def __init__(self, atb_ops: list[AtbOp], modules: list[TorchModule], table: MappingTable,
                 folded: dict[int, AtbOp], compatible: Compatible, order: dict[int, int], families: frozenset[str]):
        self.atb_ops = sorted(atb_ops, key=lambda op: order[id(op)])
        self.modules = sorted(modules, key=lambda m: m.order)
        self.table, self.folded, self.compatible, self.families = table, folded, compatible, families
        self.pairs: list[OpPair] = []
        self.notes: dict[int, str] = {}  # id(op/module) -> reason it stayed unpaired
        self.paired_atb: set[int] = set()
        self.paired_torch: set[int] = set()

    def make_pair(self, op: AtbOp, module: TorchModule, rule: MappingRule | None) -> OpPair:
        add = self.folded.get(id(op))
        note = f"bias add {add.op_name} folded in (ATB Linear without bias + add of a weight)" if add else ""
        return OpPair(op, module, str(rule.atb) + " -> " + str(rule.torch) if rule else "layer",
                      rule.atb.stem if rule else None, rule.torch.stem if rule else None, add, note)

    def _add(self, pair: OpPair) -> None:
        self.pairs.append(pair)
        self.paired_atb.add(id(pair.atb))
        self.paired_torch.add(id(pair.module))

    def run(self) -> None:
        by_rule: dict[int, list[AtbOp]] = {}
        for op in self.atb_ops:
            for index in self.table.atb_rule_indices(op.op_type, op.op_name):
                by_rule.setdefault(index, []).append(op)
        by_type: dict[str, list[TorchModule]] = {}
        for m in self.modules:
            for key in torch_type_keys(m.type, self.families):
                by_type.setdefault(key, []).append(m)
        done: set[tuple] = set()
        for index in sorted(by_rule):
            rule = self.table.rules[index]
            if (rule.atb, rule.torch) in done:  # a rule given twice pairs nothing new
                continue
            done.add((rule.atb, rule.torch))
            atb = [op for op in by_rule[index] if id(op) not in self.paired_atb]
            if not atb:
                continue
            mods = [m for m in by_type.get(rule.torch.type, ()) if id(m) not in self.paired_torch]
            if not mods:
                for op in atb:
                    self.notes.setdefault(id(op), f"no torch module of type {rule.torch.type!r} here (rule {rule.atb} -> {rule.torch})")
                continue
            self._align(atb, self._innermost(mods, rule), rule)

    def _innermost(self, mods: list[TorchModule], rule: MappingRule) -> list[TorchModule]:
        """The candidates without those that wrap another candidate (ChatGLM2's ``Embedding`` around
        ``word_embeddings``): the inner one computes the op; the wrapper is paired later as its container."""
        ids = {id(m) for m in mods}
        wrappers: dict[int, TorchModule] = {}
        for m in mods:
            parent = m.parent
            while parent is not None:
                if id(parent) in ids:
                    wrappers.setdefault(id(parent), m)
                parent = parent.parent
        for m in mods:
            if id(m) in wrappers:
                self.notes[id(m)] = (f"wraps {wrappers[id(m)].name}, also a {rule.torch.type}: the ATB "
                                     f"{rule.atb.type} is paired with the innermost")
        return [m for m in mods if id(m) not in wrappers]

    def _align(self, atb: list[AtbOp], mods: list[TorchModule], rule: MappingRule) -> None:
        def ok(i: int, j: int) -> bool:
            return self.compatible(self.make_pair(atb[i], mods[j], rule)) is not False

        aligned = align(len(atb), len(mods), ok, MAX_ALIGN_CELLS)
        if aligned is None:
            reason = (f"not aligned: {len(atb)} ATB {rule.atb.type} and {len(mods)} torch {rule.torch.type} candidates "
                      f"in one layer need more than {MAX_ALIGN_CELLS} comparisons (rule {rule.atb} -> {rule.torch})")
            for x in atb + mods:
                self.notes.setdefault(id(x), reason)
            return
        pairs, amb_a, amb_t = aligned
        for i, j in pairs:
            self._add(self.make_pair(atb[i], mods[j], rule))
        names = ", ".join(m.name for k, m in enumerate(mods) if k in amb_t)
        for i, op in enumerate(atb):
            if id(op) in self.paired_atb:
                continue
            if i in amb_a:
                self.notes[id(op)] = f"ambiguous: shapes fit more than one of {names} (rule {rule.atb} -> {rule.torch}); add a mapping"
            else:
                self.notes.setdefault(id(op), f"no shape-compatible {rule.torch.type} among {len(mods)} candidate(s) "
                                              f"({len(atb)} ATB {rule.atb.type} vs {len(mods)} torch)")
        for j, m in enumerate(mods):
            if id(m) not in self.paired_torch:
                self.notes[id(m)] = (f"ambiguous: shapes fit more than one {rule.atb.type}" if j in amb_t else
                                     f"no shape-compatible ATB {rule.atb.type} ({len(atb)} ATB vs {len(mods)} torch)")

    def _pair_of(self) -> dict[int, OpPair]:
        out: dict[int, OpPair] = {}
        for pair in self.pairs:
            out.setdefault(id(pair.module), pair)
        return out

    def pair_residual_inclusive(self, flow: Dataflow) -> None:
        """Re-pair each :data:`RESIDUAL_INCLUSIVE` module with the residual add after its ATB computation (its own
        graph op's output, else its last child's): that add's output is the quantity the module returns."""
        within = {id(op) for op in self.atb_ops}
        pair_of = self._pair_of()
        for m in self.modules:
            if m.type not in RESIDUAL_INCLUSIVE:
                continue
            own = pair_of.get(id(m))
            source = own if own is not None else (pair_of.get(id(m.children[-1])) if m.children else None)
            if source is None or not source.files_op.out_tensors:
                self.notes.setdefault(id(m), f"{m.type} returns its output plus the residual, and neither it nor "
                                             f"its last child is paired: no ATB tensor to start the dataflow from")
                continue
            computed = source.files_op.out_tensors[0]
            adds = [a for a in flow.residual_adds(computed, within) if id(a) not in self.paired_atb]
            if len(adds) != 1:
                found = "no" if not adds else f"{len(adds)}"
                self.notes.setdefault(id(m), f"{m.type} returns its output plus the residual, and {found} residual "
                                             f"add of {source.files_op.op_name}'s output was found")
                continue
            add = adds[0]
            note = (f"{m.type} returns its output plus the residual: compared with the residual add {add.op_name} "
                    f"of {source.files_op.op_name}'s output and {_other(add, computed)}")
            # a graph op of its own stays the paired op (its inputs are the module's); its files are the add's
            pair = OpPair(add, m, f"{m.type} = its computation + residual", None, "output_0", None, note)
            if own is not None and not own.atb.is_leaf:
                pair = OpPair(own.atb, m, own.rule, None, "output_0", add, note)
            if self.compatible(pair) is False:
                self.notes.setdefault(id(m), f"output shape differs from that of the residual add {add.op_name}")
                continue
            if own is not None:
                self.pairs.remove(own)
                self.paired_atb.discard(id(own.atb))
                self.paired_torch.discard(id(m))
                if own.atb.is_leaf:
                    self.notes[id(own.atb)] = (f"its output ({computed}) is not what {m.name} returns: {m.type} adds "
                                               f"the residual, so {m.name} is compared with {add.op_name}")
            if pair.atb is not add:
                self.notes[id(add)] = f"residual add: its output is compared as {m.name}'s (with {pair.atb.op_name})"
            self._add(pair)

    def pair_containers(self, skip: set[int], emit: bool) -> None:
        """Each unpaired module with children whose last child is paired returns that child's output
        (``GPTNeoXMLP``): with ``emit``, pair it with the child's op too; else say so in its unpaired reason.
        Children first, so nested containers chain."""
        pair_of = self._pair_of()
        for m in sorted(self.modules, key=lambda m: -m.order):
            if (id(m) in self.paired_torch or not m.children or id(m) in skip or m.type in RESIDUAL_INCLUSIVE):
                continue
            last = m.children[-1]
            child = pair_of.get(id(last))
            if child is None:
                continue
            note = f"{SAME_QUANTITY} {last.name}: {m.type} returns its last child's output"
            pair = OpPair(child.atb, m, f"{m.type} returns {last.name.rsplit('.', 1)[-1]}'s output",
                          child.atb_stem, "output_0", child.output_op, note)
            if self.compatible(pair) is False:
                self.notes.setdefault(id(m), f"its output's shape differs from that of its last child {last.name}")
                continue
            pair_of[id(m)] = pair
            if emit:
                self.pairs.append(pair)
                self.paired_torch.add(id(m))
            else:
                self.notes[id(m)] = f"{note}, compared in that child's row (with {child.atb.op_name})"


def _other(add: AtbOp, tensor: str) -> str:
    return ", ".join(n for n in add.in_tensors if n != tensor)


def pair_ops(topology: AtbTopology, tree: TorchModule, table: MappingTable,
             compatible: Compatible | None = None, *, containers: bool = False) -> Pairing:
    """Pair every ATB op of ``topology`` with the torch modules of ``tree`` (see the module docstring).

    ``containers``: also pair each container with its last child's op (a second pair of that op, its note starting
    with :data:`SAME_QUANTITY`). Off by default (the container is then listed as compared in its child's row): such
    a pair's ATB inputs are the child's, not the container's, so a comparer must not match the container's inputs
    against them, and must name the child's pair, not the container's, when that op diverges first.
    """
    compatible = compatible or (lambda pair: None)
    order = completion_order(topology)
    flow = Dataflow(topology)
    folded = bias_adds(topology, flow)
    by_id = {id(op): op for op in topology.walk()}
    folded_adds = {id(add): by_id[op_id] for op_id, add in folded.items()}
    a_layers, t_layers = atb_layers(topology), torch_layers(tree)
    families = family_prefixes([tree.type] + [layer.type for layer in t_layers[:1]])
    pairs: list[OpPair] = []
    unpaired: list[Unpaired] = []
    scopes: list[_Scope] = []

    n = min(len(a_layers), len(t_layers))
    in_layer_atb: set[int] = set()
    in_layer_torch: set[int] = set()
    for a_layer, t_layer in zip(a_layers[:n], t_layers[:n]):
        a_ops, t_mods = _subtree(a_layer), _subtree(t_layer)
        in_layer_atb.update(id(op) for op in a_ops)
        in_layer_torch.update(id(m) for m in t_mods)
        scope = _Scope(a_ops, t_mods, table, folded, compatible, order, families)
        scope.run()
        scope.pair_residual_inclusive(flow)
        scope.pair_containers({id(t_layer)}, containers)
        if id(a_layer) not in scope.paired_atb and id(t_layer) not in scope.paired_torch:
            layer_pair = OpPair(a_layer, t_layer, "layer", "outtensor0", None, None, "layer output")
            if compatible(layer_pair) is not False:
                scope._add(layer_pair)
            else:
                scope.notes[id(a_layer)] = f"layer output shape differs from {t_layer.name}"
        scopes.append(scope)
    for a_layer in a_layers[n:]:
        reason = f"layer count differs: ATB has {len(a_layers)} {a_layer.op_type}, torch has {len(t_layers)} layers"
        for op in _subtree(a_layer):
            in_layer_atb.add(id(op))
            unpaired.append(Unpaired("atb", op.rel_dir, op.op_type, reason, op))
    for t_layer in t_layers[n:]:
        reason = f"layer count differs: torch has {len(t_layers)} layers, ATB has {len(a_layers)}"
        for m in _subtree(t_layer):
            in_layer_torch.add(id(m))
            unpaired.append(Unpaired("torch", m.name, m.type, reason, m))

    layer_ids = {id(m) for layer in t_layers for m in _subtree(layer)}
    holders = _layer_containers(tree, layer_ids)
    outside_atb = [op for op in topology.walk() if id(op) not in in_layer_atb]
    outside_torch = [m for m in tree.walk() if id(m) not in in_layer_torch and id(m) not in holders]
    outer = _Scope(outside_atb, outside_torch, table, folded, compatible, order, families)
    outer.run()
    outer.pair_residual_inclusive(flow)
    outer.pair_containers(set(), containers)
    scopes.append(outer)

    for scope in scopes:
        pairs.extend(scope.pairs)
        for op in scope.atb_ops:
            if id(op) in scope.paired_atb:
                continue
            if id(op) in folded_adds:
                reason = f"bias add folded into the pair of {folded_adds[id(op)].op_name}"
            else:
                reason = scope.notes.get(id(op)) or f"no mapping rule for ATB type {op.op_type} (add one to op_mapping_file.json)"
            unpaired.append(Unpaired("atb", op.rel_dir, op.op_type, reason, op))
        for m in scope.modules:
            if id(m) not in scope.paired_torch:
                reason = scope.notes.get(id(m)) or f"no ATB op is mapped to torch type {m.type}"
                unpaired.append(Unpaired("torch", m.name, m.type, reason, m))
    for m in tree.walk():
        if id(m) in holders:
            unpaired.append(Unpaired("torch", m.name, m.type, "model container: holds the layers; compared through its parts", m))
    pairs.sort(key=lambda p: order[id(p.atb)])
    return Pairing(pairs, unpaired, a_layers, t_layers)


def _layer_containers(tree: TorchModule, layer_ids: set[int]) -> set[int]:
    """ids of the modules outside the layers that hold a layer (the model, its ModuleList...)."""
    out: set[int] = set()
    for m in tree.walk():
        if id(m) in layer_ids:
            parent = m.parent
            while parent is not None and id(parent) not in out and id(parent) not in layer_ids:
                out.add(id(parent))
                parent = parent.parent
    return out
