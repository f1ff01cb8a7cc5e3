"""How each op of a tensor-parallel run is distributed over its ranks: replicated, or split along one dim.

Decided per op from evidence, never from a list of op types:
- shapes: the N ranks' shard shapes concatenate along exactly one dim to the counterpart's shape (split), or each
  equals it (replicated);
- content: a sample of each rank's file agrees across ranks (one tensor, replicated) or differs (slices);
- topology params: an op that states ``rank``/``rankSize`` (a row-parallel ``LinearParallelOperation``) outputs
  the all-reduced, full tensor on every rank.
A shard whose shape happens to equal some full module's shape is *not* a fit for it: its content says slice, so
only the concatenation may match. What the evidence cannot decide is ``unknown``, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..formats.atb_topology import AtbOp

REPLICATED, SPLIT, UNKNOWN = "replicated", "split", "unknown"


@dataclass(frozen=True)
class Distribution:
    """One op output's layout over the ranks: ``kind``, the split ``dim`` of the counterpart's shape and each
    rank's extent along it (split only), and why (unknown: what did not fit)."""

    kind: str
    dim: int | None = None
    sizes: tuple[int, ...] = ()
    reason: str = ""


def _text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _trimmed(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape without leading size-1 dims ([1, s, h] and [s, h] are the same layout)."""
    out = tuple(int(d) for d in shape)
    while len(out) > 1 and out[0] == 1:
        out = out[1:]
    return out


def split_dim(full_shape: Sequence[int], shard_shapes: Sequence[Sequence[int]]) -> tuple[int, tuple[int, ...]] | None:
    """(dim of ``full_shape``, each shard's extent) when the shards, in order, concatenate along that one dim to
    ``full_shape``; None otherwise. Leading size-1 dims are ignored on both sides."""
    if len(shard_shapes) < 2:
        return None
    full = _trimmed(full_shape)
    shards = [_trimmed(s) for s in shard_shapes]
    offset = len(tuple(full_shape)) - len(full)
    found = None
    for dim in range(len(full)):
        if any(len(s) != len(full) for s in shards):
            return None
        if all(s[:dim] + s[dim + 1:] == full[:dim] + full[dim + 1:] for s in shards) \
                and sum(s[dim] for s in shards) == full[dim] and all(s[dim] > 0 for s in shards):
            if found is not None:
                return None  # two dims fit: the shapes cannot tell (never with N >= 2 and equal other dims)
            found = (dim + offset, tuple(s[dim] for s in shards))
    return found


def is_all_reduced(op: AtbOp) -> bool:
    """The op states its place in a parallel group (``rank`` and ``rankSize`` > 1): its output is the reduced,
    full tensor on every rank (a row-parallel linear)."""
    param = op.param if isinstance(op.param, dict) else {}
    size = param.get("rankSize")
    return isinstance(size, int) and not isinstance(size, bool) and size > 1 and "rank" in param


def decide(full_shape: Sequence[int], shard_shapes: Sequence[Sequence[int]], *, content: str,
           all_reduced: bool) -> Distribution:
    """The distribution of one op output over N ranks given its counterpart's ``full_shape``, the ranks' shapes
    (rank order), what their content said ("same", "distinct", "unknown") and whether the op states rank params."""
    full = _trimmed(full_shape)
    equal = all(_trimmed(s) == full for s in shard_shapes)
    split = split_dim(full_shape, shard_shapes)
    shapes = ", ".join(_text(s) for s in shard_shapes)
    if all_reduced:
        if equal:
            return Distribution(REPLICATED, reason="rank params: all-reduced output")
        return Distribution(UNKNOWN, reason=f"states rank params (all-reduced) but its outputs {shapes} are not "
                                            f"the counterpart's {_text(full_shape)}")
    if content == "distinct":
        if split is not None:
            return Distribution(SPLIT, split[0], split[1], "ranks hold different slices")
        if equal:
            return Distribution(UNKNOWN, reason=f"the ranks hold different values of the counterpart's shape "
                                                f"{_text(full_shape)}: a shard whose shape merely equals it, or "
                                                f"a replicated tensor the ranks disagree on")
        return Distribution(UNKNOWN, reason=f"shards {shapes} concatenate along no dim to {_text(full_shape)}")
    if equal:
        return Distribution(REPLICATED, reason="ranks hold the same tensor" if content == "same" else
                            "each rank holds the counterpart's shape")
    if split is not None:
        return Distribution(SPLIT, split[0], split[1], "shapes concatenate along one dim")
    return Distribution(UNKNOWN, reason=f"shards {shapes} concatenate along no dim to {_text(full_shape)}")


def decide_rank_to_rank(golden_shapes: Sequence[Sequence[int]], shapes: Sequence[Sequence[int]], *,
                        golden_content: str, content: str, all_reduced: bool) -> Distribution:
    """The distribution of one op output when the golden has ranks too: each rank's shape must equal the golden
    rank's, and both sides must hold the same kind (slices on both, or one tensor on both)."""
    if len(golden_shapes) != len(shapes) or any(_trimmed(g) != _trimmed(m) for g, m in zip(golden_shapes, shapes)):
        return Distribution(UNKNOWN, reason=f"rank shapes {', '.join(_text(s) for s in shapes)} differ from the golden "
                                            f"ranks' {', '.join(_text(s) for s in golden_shapes)}")
    kinds = {"same": REPLICATED, "distinct": SPLIT}
    mine = REPLICATED if all_reduced else kinds.get(content)
    golden = kinds.get(golden_content)
    if mine and golden and mine != golden:
        return Distribution(UNKNOWN, reason=f"the ATB ranks hold a {mine} tensor, the golden ranks a {golden} one")
    return Distribution(mine or golden or REPLICATED, reason="rank to rank")


def align_shared_targets(pairing, table, compatible, order: dict[int, int]):
    """Pair the ATB ops that their own rules left unpaired, aligning together, layer by layer, every op whose rule
    maps it to the same torch type (``LinearOperation`` and ``LinearParallelOperation`` both map to ``Linear``).

    Pairing aligns each rule's candidates alone. A TP port splits one torch type over two ATB types (the column-
    parallel projections stay ``LinearOperation``, the row-parallel ones become ``LinearParallelOperation``), so
    each list alone fits several modules (ambiguous); their union in execution order is the single-device list,
    and position in the layer decides. Pairs are confirmed by ``compatible`` (the rank evidence) and kept only
    when they lie in every best alignment. Returns ``pairing`` with those pairs moved out of ``unpaired``.
    """
    from .pairing import OpPair, align

    def layer_of(op) -> int:
        while op is not None:
            for i, layer in enumerate(pairing.atb_layers):
                if layer is op:
                    return i
            op = op.parent
        return -1

    def module_layer(module) -> int:
        for i, layer in enumerate(pairing.torch_layers):
            if module.name == layer.name or module.name.startswith(layer.name + "."):
                return i
        return -1

    groups: dict[tuple[int, str], tuple[list, list]] = {}
    torch_left = [u.op for u in pairing.unpaired if u.side == "torch" and u.op is not None]
    for u in pairing.unpaired:
        if u.side != "atb" or u.op is None:
            continue
        rules = table.rules_for_atb(u.op.op_type, u.op.op_name)
        if not rules:
            continue
        rule = rules[0]
        groups.setdefault((layer_of(u.op), rule.torch.type), ([], []))[0].append((u.op, rule))
    for (layer, torch_type), (ops, _) in groups.items():
        mods = [m for m in torch_left if module_layer(m) == layer and ops[0][1].matches_torch(m.type)]
        if not mods:
            continue
        ops.sort(key=lambda item: order.get(id(item[0]), 0))
        mods.sort(key=lambda m: m.order)

        def make(i: int, j: int):
            op, rule = ops[i]
            return OpPair(atb=op, module=mods[j], rule=f"{rule.atb} -> {rule.torch}", atb_stem=rule.atb.stem,
                          torch_stem=rule.torch.stem, note="aligned with the other ATB types mapped to "
                                                           f"{torch_type} in this layer")
        cache: dict = {}

        def ok(i: int, j: int) -> bool:
            if (i, j) not in cache:
                cache[(i, j)] = compatible(make(i, j)) is not False
            return cache[(i, j)]
        kept, _, _ = align(len(ops), len(mods), ok)
        if not kept:
            continue
        done_atb = {id(ops[i][0]) for i, _ in kept}
        done_torch = {id(mods[j]) for _, j in kept}
        pairing.pairs.extend(make(i, j) for i, j in kept)
        pairing.unpaired = [u for u in pairing.unpaired if id(u.op) not in done_atb | done_torch]
        torch_left = [m for m in torch_left if id(m) not in done_torch]
    pairing.pairs.sort(key=lambda p: order.get(id(p.atb), 0))
    return pairing

