"""Pair two dumps of the same kind (ATB vs ATB, torch vs torch) by identity: no mapping table involved.

Two builds of one port (float vs quantized, CANN 8.0 vs 8.1, bf16 vs fp16) or two runs of one torch model share
their structure, so an op is its own counterpart: ATB ops pair on topology path, type and name, torch modules on
their name. Where the graphs differ (a quantized build inserts quant/dequant ops, a new CANN fuses two ops, a layer
has one op more), a path no longer names the same op on both sides (every sibling after an insertion shifts), so
within each layer the two op sequences are aligned instead: an edit-distance alignment over (op type, output
shape), quadratic in the ops of one layer at worst. Ops left over are listed as inserted (only in B) or removed
(only in A), with the reason.

Sides are called A and B here (A is the reference: ``-gp``, the first argument of ``compare_ops``). Nothing here
reads a file: output shapes, when wanted, come from a callback.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import MappingError
from ..formats.atb_topology import AtbOp, AtbTopology
from ..formats.torch_layout import TorchModule
from .pairing import atb_layers, torch_layers

#: The output shape of an op/module of side "a" or "b" (None when it has no output file to tell).
ShapeOf = Callable[[str, object], "tuple[int, ...] | None"]

_QUANT = re.compile(r"quant", re.IGNORECASE)


@dataclass
class SamePair:
    """An op (or module) of A and its counterpart in B."""

    a: object
    b: object
    how: str  # "identity" (same path/name and type) or "aligned" (placed by the per-layer alignment)
    note: str = ""


@dataclass
class Leftover:
    """An op (or module) present on one side only, and why."""

    side: str  # "a" (removed: only in A) or "b" (inserted: only in B)
    unit: object
    reason: str

    @property
    def name(self) -> str:
        return unit_name(self.unit)

    @property
    def op_type(self) -> str:
        return unit_type(self.unit)


@dataclass
class SamePairing:
    pairs: list[SamePair]
    leftovers: list[Leftover]
    kind: str  # "atb" or "torch"
    notes: list[str] = field(default_factory=list)  # run-level remarks (e.g. a mapping file that was ignored)


# ------------------------------------------------------------------------------------------------------ units

def unit_name(unit) -> str:
    """How a person names the unit: the ATB op's folder path, the torch module's name."""
    return unit.rel_dir if isinstance(unit, AtbOp) else unit.name


def unit_type(unit) -> str:
    return unit.op_type if isinstance(unit, AtbOp) else unit.type


def _label(unit) -> str:
    """What identifies a unit inside its scope besides its type: the ATB op name, the torch module's last name."""
    return unit.op_name if isinstance(unit, AtbOp) else unit.name


def _walk(root) -> list:
    return list(root.walk())


def _relative(unit, scope_root) -> str:
    """The unit's identity inside its scope: ATB path below the layer (types only: indices shift on insertion);
    torch name below the layer."""
    if isinstance(unit, AtbOp):
        parts = []
        op = unit
        while op is not None and op is not scope_root:
            parts.append(op.op_type)
            op = op.parent
        return "/".join(reversed(parts))
    if scope_root is None or unit is scope_root:
        return unit.name if scope_root is None else ""
    return unit.name[len(scope_root.name):]


# --------------------------------------------------------------------------------------------------- alignment

def align_sequences(a: Sequence, b: Sequence, score: Callable[[int, int], int]) -> list[tuple[int, int]]:
    """Order-preserving alignment of ``a`` and ``b`` maximising the summed ``score`` of matched items.

    ``score(i, j)`` is > 0 for items that may match (higher for better evidence), 0 for items that may not.
    Unmatched items cost nothing (an insertion or a removal). Ties prefer matching earlier items of ``a``
    to earlier items of ``b``, so repeated types pair in order. O(len(a) * len(b)) time and memory.
    """
    n, m = len(a), len(b)
    cell: dict[tuple[int, int], int] = {}

    def s(i: int, j: int) -> int:
        if (i, j) not in cell:
            cell[(i, j)] = score(i, j)
        return cell[(i, j)]

    # best[i][j]: best total over a[i:], b[j:]
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = best[i], best[i + 1]
        for j in range(m - 1, -1, -1):
            value = max(below[j], row[j + 1])
            sij = s(i, j)
            if sij > 0:
                value = max(value, below[j + 1] + sij)
            row[j] = value
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < n and j < m:
        sij = s(i, j)
        if sij > 0 and best[i][j] == best[i + 1][j + 1] + sij:
            out.append((i, j))
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return out


class _Scope:
    """One layer of A with its counterpart in B (or the region outside the layers): its units in execution
    order, and the alignment of the two lists."""

    def __init__(self, kind: str, a_root, b_root, a_units: list, b_units: list, shape_of: ShapeOf | None,
                 where: str):
        self.kind, self.a_root, self.b_root, self.where = kind, a_root, b_root, where
        self.a = sorted(a_units, key=lambda u: u.order)
        self.b = sorted(b_units, key=lambda u: u.order)
        self.shape_of = shape_of
        self._shapes: dict[tuple[str, int], object] = {}

    def shape(self, side: str, unit):
        key = (side, id(unit))
        if key not in self._shapes:
            self._shapes[key] = self.shape_of(side, unit) if self.shape_of else None
        return self._shapes[key]

    def keys(self, units: list, root) -> list[tuple[str, str]]:
        return [(_relative(u, root), unit_type(u)) for u in units]

    def pair(self) -> tuple[list[SamePair], list[Leftover]]:
        a_keys, b_keys = self.keys(self.a, self.a_root), self.keys(self.b, self.b_root)
        if a_keys == b_keys:  # the same graph: pair one to one
            return [SamePair(x, y, "identity", self._name_note(x, y)) for x, y in zip(self.a, self.b)], []
        if self.kind == "torch":
            matched = self._by_name(a_keys, b_keys)
        else:
            matched = align_sequences(self.a, self.b, lambda i, j: self._score(i, j, a_keys, b_keys))
        pairs = [SamePair(self.a[i], self.b[j], "identity" if a_keys[i] == b_keys[j] else "aligned",
                          self._name_note(self.a[i], self.b[j])) for i, j in matched]
        return pairs, self._leftovers(matched)

    def _by_name(self, a_keys, b_keys) -> list[tuple[int, int]]:
        """Torch modules keep their names when a module is added elsewhere: pair equal names (types may differ
        between two versions of the modeling code), then align what is left by type and shape."""
        b_index = {key[0]: j for j, key in enumerate(b_keys)}
        named = [(i, b_index[key[0]]) for i, key in enumerate(a_keys) if key[0] in b_index]
        named = [named[k] for k in _increasing(named)]
        used_a, used_b = {i for i, _ in named}, {j for _, j in named}
        rest_a = [i for i in range(len(self.a)) if i not in used_a]
        rest_b = [j for j in range(len(self.b)) if j not in used_b]
        extra = align_sequences(rest_a, rest_b, lambda x, y: self._score(rest_a[x], rest_b[y], a_keys, b_keys))
        return sorted(named + [(rest_a[x], rest_b[y]) for x, y in extra])

    def _score(self, i: int, j: int, a_keys, b_keys) -> int:
        x, y = self.a[i], self.b[j]
        if unit_type(x) != unit_type(y):
            return 0
        sa, sb = self.shape("a", x), self.shape("b", y)
        if sa is not None and sb is not None and tuple(sa) != tuple(sb):
            return 0
        score = 1
        if a_keys[i][0] == b_keys[j][0]:
            score += 2  # same place in the graph
        if _label(x) == _label(y):
            score += 1
        if sa is not None and sb is not None:
            score += 1  # shapes confirm it
        return score

    def _name_note(self, x, y) -> str:
        notes = []
        if unit_type(x) != unit_type(y):
            notes.append(f"type {unit_type(x)} in A, {unit_type(y)} in B")
        if isinstance(x, AtbOp) and x.op_name != y.op_name:
            notes.append(f"op name {x.op_name} in A, {y.op_name} in B")
        if isinstance(x, AtbOp) and x.rel_dir != y.rel_dir:
            notes.append(f"at {x.rel_dir} in A")
        if isinstance(x, TorchModule) and x.name != y.name:
            notes.append(f"module {x.name} in A")
        return "; ".join(notes)

    def _leftovers(self, matched: list[tuple[int, int]]) -> list[Leftover]:
        """Ops of one side only, each with a reason that says where it sits and what the other side has there."""
        out: list[Leftover] = []
        bounds = [(-1, -1)] + matched + [(len(self.a), len(self.b))]
        for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
            gap_a, gap_b = self.a[i0 + 1:i1], self.b[j0 + 1:j1]
            if not gap_a and not gap_b:
                continue
            after = unit_name(self.a[i0]) if i0 >= 0 else f"the start of {self.where}"
            types_a = [unit_type(u) for u in gap_a]
            types_b = [unit_type(u) for u in gap_b]
            for side, units, other_types, verb in (("a", gap_a, types_b, "removed"), ("b", gap_b, types_a, "inserted")):
                for u in units:
                    out.append(Leftover(side, u, self._reason(side, u, verb, after, other_types)))
        return out

    def _reason(self, side: str, unit, verb: str, after: str, other_types: list[str]) -> str:
        here, there = ("A", "B") if side == "a" else ("B", "A")
        t = unit_type(unit)
        if _QUANT.search(t):
            why = "a quantization op: only the quantized build has it"
        elif t in other_types:
            why = f"{there} has a {t} here too, but its output shape differs"
        elif other_types:
            why = f"{there} has {', '.join(other_types)} here instead (ops fused, split or replaced)"
        else:
            why = f"{there} has no op here"
        return f"{verb} ({t} only in {here}, after {after}): {why}"


def _increasing(pairs: list[tuple[int, int]]) -> list[int]:
    """Indices of a longest subsequence of ``pairs`` (sorted by first item) whose second items increase: equal
    names pair only where they keep both execution orders."""
    if not pairs:
        return []
    n = len(pairs)
    length, prev = [1] * n, [-1] * n
    for k in range(n):
        for p in range(k):
            if pairs[p][1] < pairs[k][1] and length[p] + 1 > length[k]:
                length[k], prev[k] = length[p] + 1, p
    k = max(range(n), key=lambda q: (length[q], -q))
    out = []
    while k >= 0:
        out.append(k)
        k = prev[k]
    return out[::-1]


# ------------------------------------------------------------------------------------------------------ pairing

def _layers(kind: str, root) -> list:
    return atb_layers(root) if kind == "atb" else torch_layers(root)


def _kind(root) -> str:
    if isinstance(root, AtbTopology):
        return "atb"
    if isinstance(root, TorchModule):
        return "torch"
    raise TypeError(f"expected an AtbTopology or a TorchModule tree, got {type(root).__name__}")


def pair_same_kind(a, b, *, shape_of: ShapeOf | None = None, a_label: str = "A", b_label: str = "B") -> SamePairing:
    """Pair the ops of two ATB topologies, or the modules of two torch trees (see the module docstring).

    Raises MappingError (one line) when the two are not dumps of the same model: another kind, another layer type
    or count, or too little in common to pair. ``shape_of(side, unit)`` ("a"/"b") gives output shapes, which
    the alignment uses where the graphs differ.
    """
    kind = _kind(a)
    if _kind(b) != kind:
        raise MappingError(f"{a_label} is a{'n ATB' if kind == 'atb' else ' torch'} dump and {b_label} is not: "
                           "pair_same_kind needs two dumps of one kind")
    a_layers, b_layers = _layers(kind, a), _layers(kind, b)
    what = "layer graph ops" if kind == "atb" else "decoder layers"
    if len(a_layers) != len(b_layers):
        raise MappingError(f"not the same model: {a_label} has {len(a_layers)} {what}"
                           f"{_types(a_layers)}, {b_label} has {len(b_layers)}{_types(b_layers)}")
    a_types, b_types = {unit_type(u) for u in a_layers}, {unit_type(u) for u in b_layers}
    notes = []
    if a_types != b_types:
        if kind == "atb":
            raise MappingError(f"not the same model: {a_label}'s layers are {', '.join(sorted(a_types))}, "
                               f"{b_label}'s are {', '.join(sorted(b_types))}")
        notes.append(f"layer type {', '.join(sorted(a_types))} in {a_label}, {', '.join(sorted(b_types))} in "
                     f"{b_label}: paired by name")
    pairs: list[SamePair] = []
    leftovers: list[Leftover] = []
    in_a: set[int] = set()
    in_b: set[int] = set()
    for k, (la, lb) in enumerate(zip(a_layers, b_layers)):
        ua, ub = _walk(la), _walk(lb)
        in_a.update(id(u) for u in ua)
        in_b.update(id(u) for u in ub)
        scope = _Scope(kind, la, lb, ua, ub, shape_of, f"layer {k} ({unit_name(la)})")
        p, lo = scope.pair()
        pairs += p
        leftovers += lo
    outer_a = [u for u in _walk(a) if id(u) not in in_a]
    outer_b = [u for u in _walk(b) if id(u) not in in_b]
    scope = _Scope(kind, None, None, outer_a, outer_b, shape_of, "the ops outside the layers")
    p, lo = scope.pair()
    pairs += p
    leftovers += lo
    total = min(len(_walk(a)), len(_walk(b)))
    if total and len(pairs) * 2 < total:
        raise MappingError(f"not the same model: only {len(pairs)} of {total} {'ops' if kind == 'atb' else 'modules'} "
                           f"have a counterpart by {'type and shape' if kind == 'atb' else 'name, type and shape'}")
    pairs.sort(key=lambda p: p.b.order)
    return SamePairing(pairs, leftovers, kind, notes)


def _types(layers: list) -> str:
    types = sorted({unit_type(u) for u in layers})
    return f" ({', '.join(types)})" if types else ""
