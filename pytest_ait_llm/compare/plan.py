"""Step 1 of a comparison: the plan. Which tensor files are compared with which, as plain data.

Opening the two dumps, pairing the ops (mapping/) and listing each pair's files happens here, once. What comes out
is a :class:`Plan`: rows that need no comparing (unpaired ops, tokens on one side only, ranks that cannot be read)
and a list of :class:`Task`, each naming its files and the row it becomes (as far as the plan knows it). A task is small and
picklable: a worker (compare/engine.py) needs nothing else to compare it.

Read options are per side: the torch dump and the ATB dump may differ in what they allow (symlinks, size limits).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import AitLlmError
from ..formats.atb_bin import DEFAULT_MAX_BIN_BYTES, read_bin, read_bin_header
from ..formats.atb_layout import AtbDump, AtbRank, op_files
from ..formats.atb_topology import AtbOp
from ..formats.torch_layout import TorchDump, load_torch_tensor
from ..mapping.pairing import OpPair, Unpaired, completion_order, is_weight, pair_ops
from ..mapping.rules import mapping_table
from .metrics import shapes_compatible
from .result import UNPAIRED, Row
from .tolerance import Tolerance

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReadOptions:
    """How one side's files are read: the size limit of one tensor file and whether symlinks out of a dump root
    are followed (None: the AIT_LLM_ALLOW_SYMLINKS environment variable decides)."""

    max_bytes: int = DEFAULT_MAX_BIN_BYTES
    allow_symlinks: bool | None = None

    def load(self, path: Path):
        """A RawTensor from an ATB .bin or a torch .pth/.pt/.npy file."""
        path = Path(path)
        if path.suffix == ".bin":
            return read_bin(path, max_bytes=self.max_bytes, allow_symlinks=self.allow_symlinks)
        return load_torch_tensor(path, allow_symlinks=self.allow_symlinks, max_bytes=self.max_bytes)

    def shape(self, path: Path) -> tuple[int, ...] | None:
        """The shape of a dumped tensor without reading its payload; None when it cannot be read (the pair that
        needs it reports why)."""
        try:
            if Path(path).suffix == ".bin":
                return tuple(read_bin_header(path, max_bytes=self.max_bytes, allow_symlinks=self.allow_symlinks).dims)
            return tuple(self.load(path).shape)
        except Exception:  # noqa: BLE001 - any unreadable file only means "shape unknown" to pairing
            return None


@dataclass(frozen=True)
class CompareOptions:
    """Everything a comparison is asked to do, in one place (the API's keyword arguments, checked once).

    ``golden``/``my``: read options of the torch and the ATB side. ``tokens``/``ranks`` restrict what is compared
    (a rank by its dir name ``{device}_{pid}`` or its device id). ``workers``: processes for the comparing step.
    """

    mapping_dir: str | Path | None = None
    tolerance: Tolerance = field(default_factory=Tolerance)
    tokens: tuple[int, ...] | None = None
    ranks: frozenset[str] | None = None
    workers: int | None = None
    custom_metrics: tuple = ()
    golden: ReadOptions = ReadOptions()
    my: ReadOptions = ReadOptions()
    progress: Progress | None = field(default=None, compare=False)

    @classmethod
    def from_kwargs(cls, *, mapping_dir=None, tolerance: Tolerance | None = None, tokens=None, workers=None,
                    custom_metrics=(), max_bin_bytes: int | None = None, progress: Progress | None = None,
                    allow_symlinks: bool | None = None, ranks=None,
                    golden_allow_symlinks: bool | None = None, my_allow_symlinks: bool | None = None):
        """The options of ``api.run_compare``'s keyword arguments. ``allow_symlinks`` is both sides' default."""
        max_bytes = DEFAULT_MAX_BIN_BYTES if max_bin_bytes is None else int(max_bin_bytes)
        g_links = allow_symlinks if golden_allow_symlinks is None else golden_allow_symlinks
        m_links = allow_symlinks if my_allow_symlinks is None else my_allow_symlinks
        rank_set = None if ranks is None else frozenset(str(r) for r in ranks if r is not None) or None
        return cls(mapping_dir=mapping_dir, tolerance=tolerance or Tolerance(),
                   tokens=None if tokens is None else tuple(tokens), ranks=rank_set, workers=workers,
                   custom_metrics=tuple(custom_metrics or ()), golden=ReadOptions(max_bytes, g_links),
                   my=ReadOptions(max_bytes, m_links), progress=progress)


@dataclass(frozen=True)
class Task:
    """One output tensor pair to compare, and the input files that tell how much error the op received.

    ``golden_inputs``: the module's input files; ``my_inputs``: the ATB op's intensor files, named by
    ``input_names`` (the topology's tensor names, which tell weights from activations).
    ``skip``: why it is not compared (the tolerance's skip list, a missing output file), or "".
    """

    index: int
    row: Row  # the report row as far as the plan knows it (who it is about); never mutated, copied by the judge
    golden: Path | None
    my: Path | None
    golden_inputs: tuple[Path, ...] = ()
    my_inputs: tuple[Path, ...] = ()
    input_names: tuple[str, ...] = ()
    skip: str = ""
    skipped_by_tolerance: bool = False
    #: a split op of a tensor-parallel run: the ranks' files in rank order (``my`` is the first), compared as their
    #: concatenation along golden's dim ``split[0]``, starting at ``split[1]`` (compare/merged.py)
    shards: tuple[Path, ...] = ()
    split: tuple[int, int] | None = None


@dataclass
class RankGraph:
    """What the judge needs of one rank: its topology, and which task compares which op pair."""

    rank: str
    topology: object
    pair_of_task: dict[int, OpPair]


@dataclass
class Plan:
    tasks: list[Task]
    rows: list[Row]  # rows that need no comparing: unpaired ops, one-sided tokens, unreadable ranks
    unpaired: list[Unpaired]
    tokens: list[int]
    graphs: list[RankGraph]
    checked: set[tuple[str, str]]  # (rank, rel_dir) of graph ops whose output is one of their parts' (judge.py)
    notes: list[str] = field(default_factory=list)  # run-level remarks for the summary (e.g. pairing by identity)
    ranks_as_one: bool = False  # a tensor-parallel plan (compare/tensor_parallel.py): rows ordered across ranks

    def judge_ranks(self, task_rows: list[Row], results: Sequence, options: "CompareOptions") -> list[Row]:
        """Verdicts across ranks, once each row is judged: more rows (none here; see TensorParallelPlan)."""
        return []


# ------------------------------------------------------------------------------------------------- file selection

def _stem(path: Path) -> str:
    return Path(path).stem


def _pick(files: list[Path], stem: str | None) -> list[Path]:
    if stem is None:
        return files
    aliases = {"output", "output_0"} if stem in ("output", "output_0") else {stem}
    return [f for f in files if _stem(f) in aliases][:1]


def _output_pairs(pair: OpPair, golden_files, my_files) -> list[tuple[int, Path | None, Path | None]]:
    g = _pick(golden_files.outputs, pair.torch_stem)
    m = _pick(my_files.outputs, pair.atb_stem)
    if not g or not m:
        return [(0, g[0] if g else None, m[0] if m else None)]
    if len(g) == 1 or len(m) == 1:
        return [(0, g[0], m[0])]
    return [(i, gi, mi) for i, (gi, mi) in enumerate(zip(g, m))]


def tensor_name(path: Path, names: Sequence[str]) -> str | None:
    """The topology's name of an ATB tensor file ``intensor{k}``/``outtensor{k}``: ``names[k]``."""
    digits = "".join(ch for ch in _stem(path) if ch.isdigit())
    idx = int(digits) if digits else -1
    return names[idx] if 0 <= idx < len(names) else None


_FLOAT = ("float32", "float16", "bfloat16", "float64")


def primary_inputs(files: Sequence[Path]) -> list[Path]:
    """The module's activation inputs: its positional inputs, else its ``hidden_states`` keyword input."""
    positional = [f for f in files if re.fullmatch(r"input(_\d+)*|intensor\d+", _stem(f))]  # intensor: an ATB golden
    return positional or [f for f in files if _stem(f) == "input_hidden_states"]


def input_pairs(task: Task, options: CompareOptions, open_golden=None, open_my=None) -> list[tuple]:
    """Match the module's activation inputs to the op's float, non-weight intensors by shape, in order:
    ``(golden file, its tensor, my file, its tensor)``.

    These pairs measure the error an op *received*, so that its verdict can rest on the error it *adds*. Each
    side is opened with its own read options (``open_golden``/``open_my`` default to them); a file that cannot
    be read is left out, as its shape cannot be matched.
    """
    open_golden = open_golden or options.golden.load
    open_my = open_my or options.my.load
    mine = []
    for f in task.my_inputs:
        name = tensor_name(f, task.input_names)
        if name and is_weight(name):
            continue
        t = _try(open_my, f)
        if t is not None and t.dtype in _FLOAT and math.prod(t.shape) > 1:
            mine.append((f, t, name))
    used: set[int] = set()
    out = []
    for g in primary_inputs(task.golden_inputs):
        gt = _try(open_golden, g)
        if gt is None or gt.dtype not in _FLOAT:
            continue
        for k, (m, mt, name) in enumerate(mine):
            if k not in used and shapes_compatible(gt.shape, mt.shape):
                used.add(k)
                out.append((g, gt, m, mt))
                break
    return out


def _try(load, path):
    try:
        return load(path)
    except Exception:  # noqa: BLE001 - an unreadable input only leaves that input out
        return None


# ---------------------------------------------------------------------------------------------------- planning

class _Files:
    """The folder listings of one comparison: pairing and the tasks ask for the same folders."""

    def __init__(self, golden: TorchDump, my: AtbDump | None = None):
        self.golden = golden
        self.my_files = getattr(my, "op_files", op_files)  # a torch dump on the my side lists its own (sides.py)
        self.listed: dict[tuple, object] = {}

    def atb(self, token_dir: Path, op: AtbOp):
        key = ("atb", str(token_dir), op.rel_dir)
        if key not in self.listed:
            self.listed[key] = self.my_files(token_dir, op)
        return self.listed[key]

    def torch(self, token: int, name: str):
        key = ("torch", token, name)
        if key not in self.listed:
            self.listed[key] = self.golden.module_files(token, name)
        return self.listed[key]


def make_plan(golden: TorchDump, my: AtbDump, options: CompareOptions, *, same_kind: bool = False) -> Plan:
    """Pair the ops of every rank (from the evidence of the output shapes) and list the tasks of every token.

    ``same_kind``: sides shown as golden/my by compare/sides.py (two dumps of one kind, paired by identity; or an
    ATB dump as A and a torch dump as B, paired by the table)."""
    table = mapping_table(options.mapping_dir)  # once: every rank pairs with it (an ATB A with a torch B too)
    files = _Files(golden, my)
    plan = Plan([], [], [], [], [], set())
    tokens: set[int] = set()
    rank_errors: list[AitLlmError] = []
    for rank in my.ranks:
        rank_name = rank.path.name
        if options.ranks is not None and not ({rank_name, str(rank.device_id)} & options.ranks):
            continue
        try:
            topology = rank.topology()
        except AitLlmError as exc:  # e.g. a rank whose process died before writing its topology
            rank_errors.append(exc)
            plan.rows.append(Row(None, 0, -1, rank_name, status=UNPAIRED, reason=f"rank not compared: {exc}"))
            continue
        completion = completion_order(topology)
        g_tokens, m_tokens = set(golden.tokens), set(rank.token_dirs)
        wanted = set(options.tokens) if options.tokens is not None else g_tokens | m_tokens
        common = sorted(g_tokens & m_tokens & wanted)
        for t in sorted((g_tokens ^ m_tokens) & wanted):
            side = ("A" if t in g_tokens else "B") if same_kind else ("torch" if t in g_tokens else "ATB")
            plan.rows.append(Row(t, 0, -1, rank_name, status=UNPAIRED, reason=f"token {t} dumped only on the {side} side"))
        if not common:
            continue
        tokens.update(common)
        if same_kind:
            from .sides import pairing as side_pairing

            pairing = side_pairing(golden, rank, files, options, common[0], plan.notes, table)
        else:
            pairing = pair_ops(topology, golden.tree, table, _shapes_fit(rank, common[0], files, options))
        plan.unpaired.extend(pairing.unpaired)
        plan.checked.update((rank_name, rel) for rel in output_checked_by_a_part(pairing.pairs))
        plan.rows.extend(_unpaired_row(u, rank_name, completion) for u in pairing.unpaired)
        graph = RankGraph(rank_name, topology, {})
        for token in common:
            token_dir = rank.token_dirs[token]
            for pair in pairing.pairs:
                for task in _tasks(pair, token, token_dir, rank_name, completion[id(pair.atb)], files, options,
                                   len(plan.tasks)):
                    graph.pair_of_task[task.index] = pair
                    plan.tasks.append(task)
        plan.graphs.append(graph)
    if rank_errors and not plan.graphs:
        raise rank_errors[0]  # no rank could be read: the comparison as a whole is impossible
    plan.tokens = sorted(tokens)
    return plan


def _shapes_fit(rank: AtbRank, token: int, files: _Files, options: CompareOptions):
    """Whether a candidate pair's output shapes fit (None: unknown), from the headers of the first common token."""
    token_dir = rank.token_dirs[token]

    def compatible(pair: OpPair):
        g = _pick(files.torch(token, pair.module.name).outputs, pair.torch_stem)
        m = _pick(files.atb(token_dir, pair.files_op).outputs, pair.atb_stem)
        if not g or not m:
            return None
        g_shape, m_shape = options.golden.shape(g[0]), options.my.shape(m[0])
        if g_shape is None or m_shape is None:
            return None
        return shapes_compatible(g_shape, m_shape) is not None

    return compatible


def _unpaired_row(u: Unpaired, rank_name: str, completion: dict[int, int]) -> Row:
    atb = u.side == "atb"
    return Row(None, 0, completion.get(id(u.op), -1) if atb else -1, rank_name,
               atb_op=u.name if atb else "", atb_op_name=getattr(u.op, "op_name", "") if atb else "",
               my_op_type=u.op_type if atb else "", torch_module="" if atb else u.name,
               golden_op_type="" if atb else u.op_type, status=UNPAIRED, reason=u.reason)


def _tasks(pair: OpPair, token: int, token_dir: Path, rank_name: str, completion: int, files: _Files,
           options: CompareOptions, first_index: int) -> list[Task]:
    golden_files = files.torch(token, pair.module.name)
    my_files = files.atb(token_dir, pair.files_op)
    inputs = dict(golden_inputs=tuple(golden_files.inputs), my_inputs=tuple(files.atb(token_dir, pair.atb).inputs),
                  input_names=tuple(pair.atb.in_tensors))
    if pair.same_as is not None:  # a container's inputs are not its child op's: the judge takes the child's error
        inputs = {}
    skipped = options.tolerance.is_skipped(pair.atb.op_type, pair.atb.op_name, pair.atb.rel_dir, pair.module.name,
                                           pair.module.type)
    out = []
    for data_id, g, m in _output_pairs(pair, golden_files, my_files):
        row = Row(token, data_id, completion, rank_name, atb_op=pair.atb.rel_dir, atb_op_name=pair.atb.op_name,
                  my_op_type=pair.atb.op_type, torch_module=pair.module.name, golden_op_type=pair.module.type,
                  golden_path=str(g or ""), my_path=str(m or ""), rule=pair.rule, note=pair.note)
        skip = ""
        if skipped:
            skip = "skipped by the tolerance's skip= list"
        elif g is None or m is None:
            skip = f"no output tensor dumped for this {'torch module' if g is None else 'ATB op'}"
        out.append(Task(first_index + len(out), row, g, m, skip=skip, skipped_by_tolerance=skipped, **inputs))
    return out


def output_checked_by_a_part(pairs: Sequence[OpPair]) -> set[str]:
    """rel_dirs of paired graph ops whose compared output tensor is also the output of one of their own paired parts.

    Such a graph op's ATB value is already checked by that part: if the part agrees with its module and the graph
    op disagrees with *its* module, the two torch modules do not hold the same thing (a residual-inclusive module
    paired with the graph that ends before the residual add). The compared tensor is the one read
    (``files_op``): a BloomMLP row reads the residual add after MlpGateLayerV2, which no part of it outputs.
    """
    out = set()
    for pair in pairs:
        if pair.atb.is_leaf or not pair.files_op.out_tensors:
            continue
        inside = {id(op) for op in pair.atb.walk()}
        part_outputs = {name for p in pairs if p.atb is not pair.atb and id(p.atb) in inside
                        for name in p.files_op.out_tensors}
        if pair.files_op.out_tensors[0] in part_outputs:
            out.add(pair.atb.rel_dir)
    return out
