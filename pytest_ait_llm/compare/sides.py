"""Either kind of dump on either side of a comparison: the "side" the engine reads.

The engine reads a golden side as a torch dump (modules by name, ``module_files(token, name)``) and a my side as
an ATB dump (ranks, each with a topology and token dirs, files per op). To compare ATB with ATB or torch with
torch, an ATB dump on the golden side is shown to the engine as modules named by op path, and a torch dump on the
my side as a rank whose "topology" is its module tree. Two dumps of one kind pair by identity
(:mod:`..mapping.identity`); an ATB dump as A and a torch dump as B pair through the mapping table, each pair turned
around. The engine itself does not care which kinds it compares; the CSV's golden columns describe side A.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import LayoutError
from ..formats.atb_layout import AtbDump, AtbRank, op_files
from ..formats.atb_topology import AtbOp, AtbTopology
from ..formats.files import OpFiles
from ..formats.torch_layout import TorchDump, TorchModule
from ..mapping.identity import pair_same_kind
from ..mapping.pairing import OpPair, Pairing, Unpaired, is_weight
from .plan import primary_inputs, tensor_name


class AtbGolden:
    """An ATB dump (one rank of it) on the golden side: each op is a "module" named by its op path."""

    def __init__(self, dump: AtbDump, rank: AtbRank | None = None):
        self.dump = dump
        self.rank = rank or dump.ranks[0]
        self.root = dump.root
        self.allow_symlinks = dump.allow_symlinks
        self.native = self.rank.topology()  # LayoutError naming the dump when its topology is missing
        self.token_dirs = self.rank.token_dirs
        self._ops: dict[str, AtbOp] = {}
        self._units: dict[int, TorchModule] = {}
        for op in self.native.walk():
            self._ops[op.rel_dir] = op
            self._units[id(op)] = TorchModule(name=op.rel_dir, type=op.op_type, order=op.order, depth=op.depth)
        self.tree = None  # the mapping table's pairing never sees this side

    @property
    def tokens(self) -> list[int]:
        return sorted(self.token_dirs)

    def unit(self, op: AtbOp) -> TorchModule:
        return self._units[id(op)]

    def module_files(self, token: int, name: str) -> OpFiles:
        """The op's files; its inputs without the weights (an op's inputs are matched to the other side's by
        shape, and a weight must not stand in for an activation)."""
        op = self._ops.get(name)
        if op is None or token not in self.token_dirs:
            return OpFiles()
        files = op_files(self.token_dirs[token], op)
        inputs = [f for f in files.inputs if not is_weight(tensor_name(f, op.in_tensors) or "")]
        return OpFiles(inputs=inputs, outputs=files.outputs)


class TorchRank:
    """A torch dump on the my side, as the one rank the engine walks: its topology is the module tree."""

    def __init__(self, dump: TorchDump):
        self.dump = dump
        self.path = dump.root
        self.device_id = 0
        self.pid = 0
        self.token_dirs = dump.token_dirs
        self.native = dump.tree
        self._units: dict[int, AtbOp] = {}
        self._by_dir = {str(d): t for t, d in dump.token_dirs.items()}
        tops = [self._op(dump.tree, None)]
        self._topology = AtbTopology(model_name=dump.tree.name, ops=tops)

    def _op(self, module: TorchModule, parent: AtbOp | None) -> AtbOp:
        op = AtbOp(op_name=module.name, op_type=module.type, parent=parent, rel_dir=module.name,
                   order=module.order, depth=module.depth)
        self._units[id(module)] = op
        op.children = [self._op(c, op) for c in module.children]
        return op

    @property
    def tokens(self) -> list[int]:
        return sorted(self.token_dirs)

    def topology(self) -> AtbTopology:
        return self._topology

    def unit(self, module: TorchModule) -> AtbOp:
        return self._units[id(module)]

    def op_files(self, token_dir: Path, op: AtbOp) -> OpFiles:
        token = self._by_dir.get(str(token_dir))
        if token is None:
            return OpFiles()
        files = self.dump.module_files(token, op.rel_dir)
        # the activation inputs only: keyword inputs such as masks and rotary tables would be matched by shape
        return OpFiles(inputs=primary_inputs(files.inputs), outputs=files.outputs)


class TorchMy:
    """A torch dump on the my side: the engine's ``my`` (root, ranks, allow_symlinks)."""

    def __init__(self, dump: TorchDump):
        self.dump = dump
        self.root = dump.root
        self.allow_symlinks = dump.allow_symlinks
        self.ranks = [TorchRank(dump)]

    @property
    def tokens(self) -> list[int]:
        return self.dump.tokens

    def op_files(self, token_dir: Path, op: AtbOp) -> OpFiles:
        return self.ranks[0].op_files(token_dir, op)


# ------------------------------------------------------------------------------------------------------- sides

def sides(a, b, tokens=None, ranks=None):
    """(golden side, my side) the engine reads for dumps ``a`` and ``b`` of any kinds: an ATB dump as A, a torch
    dump as B are shown through AtbGolden/TorchMy. One line when they cannot be compared at all (no token in
    common, ranks that cannot be told apart)."""
    golden = AtbGolden(a, _one_rank(a, b, ranks)) if isinstance(a, AtbDump) else a
    my = TorchMy(b) if isinstance(b, TorchDump) else b
    check_tokens(golden, my, tokens)
    return golden, my


def _one_rank(a: AtbDump, b, ranks) -> AtbRank:
    """The rank of A that B's rank is compared with: A's only one, or the one on B's device. Several ranks on
    both sides (tensor parallel) are compared one rank dir at a time: guessing which rank of A goes with which of
    B would compare unrelated shards."""
    b_ranks = [r for r in getattr(b, "ranks", ()) if ranks is None or {r.path.name, str(r.device_id)} & ranks]
    if len(a.ranks) == 1 and len(b_ranks) <= 1:
        return a.ranks[0]
    devices = {r.device_id for r in b_ranks}
    same_device = [r for r in a.ranks if r.device_id in devices]
    if len(b_ranks) == 1 and len(same_device) == 1:
        return same_device[0]
    names = ", ".join(r.path.name for r in a.ranks)
    b_names = ", ".join(r.path.name for r in b_ranks) or "one"
    raise LayoutError(f"A ({a.root}) has rank(s) {names} and B has {b_names}: compare one rank of each, "
                      "passing its rank dir (tensors/{device}_{pid})")


def pairing(golden, rank, files, options, token: int, notes: list[str], table) -> Pairing:
    """The pairs of a golden side and one rank of a my side as sides() made them: by identity for two dumps of
    one kind, by the mapping ``table`` for an ATB dump as A and a torch dump as B."""
    if isinstance(golden, AtbGolden) and isinstance(rank, TorchRank):
        return _reversed_table_pairing(golden, rank, files, options, token, table)
    return same_kind_pairing(golden, rank, files, options, token, notes)


def _reversed_table_pairing(golden: "AtbGolden", rank: "TorchRank", files, options, token: int, table) -> Pairing:
    """The mapping table pairs ATB ops with torch modules whichever side each is on: pair A's ops with B's
    modules as usual, then turn every pair around (A's op is the golden "module", B's module the my "op")."""
    from ..mapping.pairing import pair_ops
    from .metrics import shapes_compatible
    from .plan import _pick

    token_dir = rank.token_dirs[token]

    def outputs(pair: OpPair):
        a = _pick(files.torch(token, golden.unit(pair.files_op).name).outputs, pair.atb_stem)
        b = _pick(files.atb(token_dir, rank.unit(pair.module)).outputs, pair.torch_stem)
        return a, b

    def compatible(pair: OpPair):
        a, b = outputs(pair)
        shapes = (options.golden.shape(a[0]), options.my.shape(b[0])) if a and b else (None, None)
        return None if None in shapes else shapes_compatible(*shapes) is not None

    found = pair_ops(golden.native, rank.native, table, compatible)
    pairs = [OpPair(rank.unit(p.module), golden.unit(p.files_op), p.rule, atb_stem=p.torch_stem,
                    torch_stem=p.atb_stem, note=p.note) for p in found.pairs]
    unpaired = []
    for u in found.unpaired:
        if u.side == "atb":
            unit = golden.unit(u.op)
            unpaired.append(Unpaired("torch", unit.name, unit.type, u.reason, unit))
        else:
            op = rank.unit(u.op)
            unpaired.append(Unpaired("atb", op.rel_dir, op.op_type, u.reason, op))
    return Pairing(pairs, unpaired, [], [])


def native_root(side, rank=None):
    """The tree a side's ops come from: an AtbTopology or a TorchModule tree."""
    if isinstance(side, AtbGolden):
        return side.native
    if isinstance(side, TorchDump):
        return side.tree
    if isinstance(rank, TorchRank):
        return rank.native
    return rank.topology()


def _golden_unit(side, native):
    return side.unit(native) if isinstance(side, AtbGolden) else native


def _my_unit(rank, native):
    return rank.unit(native) if isinstance(rank, TorchRank) else native


def same_kind_pairing(golden, rank, files, options, token: int, notes: list[str]) -> Pairing:
    """Pair a golden side with one rank of a my side of the same kind by identity (mapping/identity.py), as the
    engine's Pairing: pairs of (my-side op, golden-side module); unpaired "atb" is side B, "torch" side A.

    ``files`` lists a token's files per op/module (plan.py), ``options`` reads shapes, for graphs that differ."""
    token_dir = rank.token_dirs[token]

    def shape_of(side: str, unit):
        if side == "a":
            outputs = files.torch(token, _golden_unit(golden, unit).name).outputs
            return options.golden.shape(outputs[0]) if outputs else None
        outputs = files.atb(token_dir, _my_unit(rank, unit)).outputs
        return options.my.shape(outputs[0]) if outputs else None

    same = pair_same_kind(native_root(golden), native_root(None, rank), shape_of=shape_of)
    notes.extend(n for n in same.notes if n not in notes)
    pairs, unpaired = [], []
    for p in same.pairs:
        pair = OpPair(_my_unit(rank, p.b), _golden_unit(golden, p.a), p.how, note=p.note)
        if not files.torch(token, pair.module.name).outputs and not files.atb(token_dir, pair.atb).outputs:
            # a module list is in the tree but never called: nothing to compare on either side, nothing wrong
            unpaired.append(Unpaired("atb", pair.atb.rel_dir, pair.atb.op_type,
                                     "no output dumped on either side (a container never called)", pair.atb))
        else:
            pairs.append(pair)
    for left in same.leftovers:
        if left.side == "a":
            unit = _golden_unit(golden, left.unit)
            unpaired.append(Unpaired("torch", unit.name, unit.type, left.reason, unit))
        else:
            op = _my_unit(rank, left.unit)
            unpaired.append(Unpaired("atb", op.rel_dir, op.op_type, left.reason, op))
    return Pairing(pairs, unpaired, [], [])


def check_tokens(golden, my, tokens=None) -> None:
    """Two dumps with no token in common (after ``tokens``) cannot be compared at all: one line saying so."""
    g = set(golden.tokens)
    m = {t for r in my.ranks for t in r.token_dirs} if hasattr(my, "ranks") else set(my.tokens)
    wanted = set(tokens) if tokens is not None else g | m
    if g and m and not (g & m & wanted):
        raise LayoutError(f"no token in common: A ({golden.root}) has tokens {_ids(g)}, B ({my.root}) has "
                          f"{_ids(m)}" + (f", asked for {_ids(wanted)}" if tokens is not None else ""))


def _ids(ids) -> str:
    ids = sorted(ids)
    return "[" + ", ".join(map(str, ids[:12])) + (", ...]" if len(ids) > 12 else "]")
