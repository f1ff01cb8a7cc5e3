"""Pair ATB ops with torch modules: layers first, then ops within each layer, then the ops outside the layers.

The original zipped same-type ops per layer and skipped a type silently when the counts differed. Here:
- layers are detected for any number of layers (1 included) on both sides and paired by position;
- within a layer (and outside the layers) each mapping rule's candidates are aligned in execution order, and a
  candidate pair must be confirmed by the tensor shapes (a ``compatible`` callback supplied by the caller);
- when more than one alignment is equally good, the ops involved are reported as ambiguous, never guessed;
- a bias-less Linear whose output feeds an add of a *weight* (ATB's ParallelLinearBaseV2 = Linear + bias add) is
  paired through that add; an add of an *activation* is a residual add and is not folded (the original could not
  tell the two apart and paired o_proj with the residual sum);
- every ATB op and every torch module ends in the result: paired, or unpaired with the reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..formats.atb_topology import AtbOp, AtbTopology
from ..formats.torch_layout import TorchModule
from .rules import MappingRule, MappingTable

ELEWISE_ADD = 8


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
#: A Compatible may carry an ``exact`` attribute, another Compatible: then the first one may guess (the engine's
#: answers "unknown" without reading, and checks later), and ``exact`` answers wherever the guess could change the
#: outcome: an alignment of unequal candidate lists, or one whose one-to-one candidates do not all fit.


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


def bias_adds(topology: AtbTopology) -> dict[int, AtbOp]:
    """Map id(bias-less Linear) -> the Elewise add that adds a weight (a bias) to its output.

    Only an add whose every other input is a ``*_weight_*`` tensor counts; an add of an activation is a residual.
    """
    leaves = [op for op in topology.walk() if op.is_leaf]
    consumers: dict[str, list[AtbOp]] = {}
    for op in leaves:
        for name in op.in_tensors:
            consumers.setdefault(name, []).append(op)
    folded: dict[int, AtbOp] = {}
    for op in leaves:
        if "Linear" not in op.op_type or _param(op, "hasBias") is not False or len(op.out_tensors) != 1:
            continue
        users = consumers.get(op.out_tensors[0], [])
        if len(users) != 1:
            continue
        add = users[0]
        if "Elewise" not in add.op_type or _param(add, "elewiseType") != ELEWISE_ADD:
            continue
        others = [n for n in add.in_tensors if n != op.out_tensors[0]]
        if others and all(is_weight(n) for n in others):
            folded[id(op)] = add
    return folded


def _subtree(op):
    return list(op.walk())


# ------------------------------------------------------------------------------------------------------- alignment

def align(n_atb: int, n_torch: int, ok: Callable[[int, int], bool]) -> tuple[list[tuple[int, int]], set[int], set[int]]:
    """Order-preserving alignment of two candidate lists that maximises the confirmed pairs.

    Returns (pairs, ambiguous ATB indices, ambiguous torch indices). A pair is kept only if it is in *every* optimal
    alignment; the others are reported as ambiguous instead of being guessed.
    """
    if n_atb == n_torch and all(ok(i, i) for i in range(n_atb)):
        return [(i, i) for i in range(n_atb)], set(), set()

    def table(banned: tuple[int, int] | None, forward: bool) -> list[list[int]]:
        """best[i][j]: most pairs among A[i:], T[j:] (backward) or A[:i], T[:j] (forward)."""
        best = [[0] * (n_torch + 1) for _ in range(n_atb + 1)]
        rows = range(1, n_atb + 1) if forward else range(n_atb - 1, -1, -1)
        for i in rows:
            cols = range(1, n_torch + 1) if forward else range(n_torch - 1, -1, -1)
            for j in cols:
                if forward:
                    take = best[i - 1][j - 1] + 1 if (i - 1, j - 1) != banned and ok(i - 1, j - 1) else -1
                    best[i][j] = max(best[i - 1][j], best[i][j - 1], take)
                else:
                    take = best[i + 1][j + 1] + 1 if (i, j) != banned and ok(i, j) else -1
                    best[i][j] = max(best[i + 1][j], best[i][j + 1], take)
        return best

    back, fwd = table(None, False), table(None, True)
    optimum = back[0][0]
    # every pair that lies on at least one optimal alignment
    on_optimum = [(i, j) for i in range(n_atb) for j in range(n_torch)
                  if ok(i, j) and fwd[i][j] + 1 + back[i + 1][j + 1] == optimum]
    kept, amb_a, amb_t = [], set(), set()
    for pair in on_optimum:
        if table(pair, False)[0][0] < optimum:  # in every optimal alignment
            kept.append(pair)
        else:
            amb_a.add(pair[0])
            amb_t.add(pair[1])
    return kept, amb_a, amb_t


# --------------------------------------------------------------------------------------------------------- pairing

class _Scope:
    """Pairs the ATB ops and torch modules of one layer (or of the region outside the layers)."""

    def __init__(self, atb_ops: list[AtbOp], modules: list[TorchModule], table: MappingTable,
                 folded: dict[int, AtbOp], compatible: Compatible, order: dict[int, int]):
        self.atb_ops = sorted(atb_ops, key=lambda op: order[id(op)])
        self.modules = sorted(modules, key=lambda m: m.order)
        self.table, self.folded, self.compatible = table, folded, compatible
        self.pairs: list[OpPair] = []
        self.notes: dict[int, str] = {}  # id(op/module) -> reason it stayed unpaired
        self.paired_atb: set[int] = set()
        self.paired_torch: set[int] = set()

    def make_pair(self, op: AtbOp, module: TorchModule, rule: MappingRule | None) -> OpPair:
        add = self.folded.get(id(op))
        note = f"bias add {add.op_name} folded in (ATB Linear without bias + add of a weight)" if add else ""
        return OpPair(op, module, str(rule.atb) + " -> " + str(rule.torch) if rule else "layer",
                      rule.atb.stem if rule else None, rule.torch.stem if rule else None, add, note)

    def run(self) -> None:
        for rule in self.table.rules:
            atb = [op for op in self.atb_ops if id(op) not in self.paired_atb and rule.matches_atb(op.op_type, op.op_name)]
            if not atb:
                continue
            mods = [m for m in self.modules if id(m) not in self.paired_torch and rule.matches_torch(m.type)]
            if not mods:
                for op in atb:
                    self.notes.setdefault(id(op), f"no torch module of type ~{rule.torch.type!r} here (rule {rule.atb} -> {rule.torch})")
                continue
            self._align(atb, mods, rule)

    def _align(self, atb: list[AtbOp], mods: list[TorchModule], rule: MappingRule) -> None:
        cache: dict[tuple[int, int], bool] = {}
        # one-to-one candidates may be guessed; where the lists differ in length, which pairs fit decides the
        # alignment, so the answer must be exact
        compatible = self.compatible if len(atb) == len(mods) else getattr(self.compatible, "exact", self.compatible)

        def ok(i: int, j: int) -> bool:
            if (i, j) not in cache:
                cache[(i, j)] = compatible(self.make_pair(atb[i], mods[j], rule)) is not False
            return cache[(i, j)]

        pairs, amb_a, amb_t = align(len(atb), len(mods), ok)
        for i, j in pairs:
            self.pairs.append(self.make_pair(atb[i], mods[j], rule))
            self.paired_atb.add(id(atb[i]))
            self.paired_torch.add(id(mods[j]))
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


def pair_ops(topology: AtbTopology, tree: TorchModule, table: MappingTable,
             compatible: Compatible | None = None) -> Pairing:
    """Pair every ATB op of ``topology`` with the torch modules of ``tree`` (see the module docstring)."""
    compatible = compatible or (lambda pair: None)
    order = completion_order(topology)
    folded = bias_adds(topology)
    folded_adds = {id(add): op for op_id, add in folded.items() for op in topology.walk() if id(op) == op_id}
    a_layers, t_layers = atb_layers(topology), torch_layers(tree)
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
        scope = _Scope(a_ops, t_mods, table, folded, compatible, order)
        scope.run()
        if id(a_layer) not in scope.paired_atb and id(t_layer) not in scope.paired_torch:
            layer_pair = OpPair(a_layer, t_layer, "layer", "outtensor0", None, None, "layer output")
            if compatible(layer_pair) is not False:
                scope.pairs.append(layer_pair)
                scope.paired_atb.add(id(a_layer))
                scope.paired_torch.add(id(t_layer))
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
    containers = {id(m) for m in tree.walk() if id(m) not in layer_ids and any(id(d) in layer_ids for d in m.walk())}
    outside_atb = [op for op in topology.walk() if id(op) not in in_layer_atb]
    outside_torch = [m for m in tree.walk() if id(m) not in in_layer_torch and id(m) not in containers]
    outer = _Scope(outside_atb, outside_torch, table, folded, compatible, order)
    outer.run()
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
        if id(m) in containers:
            unpaired.append(Unpaired("torch", m.name, m.type, "model container: holds the layers; compared through its parts", m))
    pairs.sort(key=lambda p: order[id(p.atb)])
    return Pairing(pairs, unpaired, a_layers, t_layers)

