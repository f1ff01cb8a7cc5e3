"""The comparison engine: open both dumps, pair the ops, compare every tensor pair, judge, find the first divergence.

Comparing never knows how the dumps were made; it asks formats/ for tensors and mapping/ for pairs.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import AitLlmError
from ..formats.atb_bin import read_bin, read_bin_header
from ..formats.atomic import as_path
from ..formats.dtypes import ACL_DTYPES
from ..formats.atb_layout import AtbDump, AtbRank, open_atb_dump, op_files
from ..formats.torch_layout import TorchDump, load_torch_tensor, open_torch_dump
from ..formats.atb_topology import AtbOp
from ..mapping.pairing import OpPair, completion_order, is_weight, pair_ops
from ..mapping.rules import mapping_table
from .metrics import compare_tensors, shapes_compatible, similarity
from .result import COMPARED, SKIPPED, SUSPECT, UNPAIRED, CompareResult, Row
from .tolerance import Breach, Tolerance, default_bounds, effective_metrics, judge

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReadOptions:
    """How dumped files are read: the .bin size limit and whether symlinks out of a dump root are followed."""

    max_bin_bytes: int | None = None
    allow_symlinks: bool | None = None

    def load(self, path: Path):
        """A RawTensor from an ATB .bin or a torch .pth/.pt/.npy file."""
        path = as_path(path)
        if path.suffix == ".bin":
            if self.max_bin_bytes is None:
                return read_bin(path, allow_symlinks=self.allow_symlinks)
            return read_bin(path, max_bytes=self.max_bin_bytes, allow_symlinks=self.allow_symlinks)
        return load_torch_tensor(path, allow_symlinks=self.allow_symlinks)

    def try_load(self, path: Path):
        """:meth:`load`, or None when the file cannot be read (the pair that needs it reports why)."""
        try:
            return self.load(path)
        except (AitLlmError, OSError):
            return None

    def meta(self, path: Path) -> tuple[tuple[int, ...], str] | None:
        """(shape, logical dtype) of a dumped tensor without reading its payload; None when it cannot be read."""
        try:
            if as_path(path).suffix == ".bin":
                kwargs = {} if self.max_bin_bytes is None else {"max_bytes": self.max_bin_bytes}
                header = read_bin_header(path, allow_symlinks=self.allow_symlinks, **kwargs)
                dtype = ACL_DTYPES.get(header.dtype_code)
                return tuple(header.dims), dtype.name if dtype else f"acl{header.dtype_code}"
            t = load_torch_tensor(path, allow_symlinks=self.allow_symlinks)
            return tuple(t.shape), t.dtype
        except (AitLlmError, OSError):
            return None


# ------------------------------------------------------------------------------------------------- file selection

def _stem(path: Path) -> str:
    return Path(path).stem


def _pick(files: list[Path], stem: str | None) -> list[Path]:
    if stem is None:
        return files
    aliases = {stem}
    if stem in ("output", "output_0"):
        aliases = {"output", "output_0"}
    return [f for f in files if _stem(f) in aliases][:1]


@dataclass
class _Task:
    """One tensor pair to compare, plus what tells how much error the op received.

    ``input_files``: the module's input files, the ATB op's intensor files and the topology's names for those; the
    worker matches them into input pairs (:func:`input_pairs`). ``links`` maps an input's tensor name to the index
    of the task comparing the op that produced it; ``sampled``: some other task links to this one, so its worker
    keeps a :func:`sample_digest` of both output files. An input whose two files have the digests of its
    producer's files takes that task's output error (in :meth:`Engine._finish`) instead of being read through.
    """

    row: Row
    golden: Path | None
    my: Path | None
    input_files: tuple[list[Path], list[Path], tuple[str, ...]] = ((), (), ())
    pair: OpPair | None = None
    links: dict[str, int] | None = None
    sampled: bool = False


@dataclass(frozen=True)
class _Linked:
    """An input pair whose error is, if the digests match, the output error of task ``index`` (resolved in
    :meth:`Engine._finish`)."""

    index: int
    golden: bytes
    my: bytes


def _output_pairs(pair: OpPair, golden_files, my_files) -> list[tuple[int, Path | None, Path | None]]:
    g = _pick(golden_files.outputs, pair.torch_stem)
    m = _pick(my_files.outputs, pair.atb_stem)
    if not g or not m:
        return [(0, g[0] if g else None, m[0] if m else None)]
    if len(g) == 1 or len(m) == 1:
        return [(0, g[0], m[0])]
    return [(i, gi, mi) for i, (gi, mi) in enumerate(zip(g, m))]


_FLOAT = ("float32", "float16", "bfloat16", "float64")


def _primary_inputs(files: list[Path]) -> list[Path]:
    """The module's activation inputs: its positional inputs, else its ``hidden_states`` keyword input."""
    positional = [f for f in files if re.fullmatch(r"input(_\d+)*", _stem(f))]
    return positional or [f for f in files if _stem(f) == "input_hidden_states"]


def input_pairs(golden_inputs: Sequence[Path], my_inputs: Sequence[Path], names: Sequence[str],
                opts: ReadOptions) -> list[tuple[Path, Path, str | None]]:
    """Match the module's activation inputs to the op's float, non-weight intensors by shape, in order:
    ``(golden file, my file, the intensor's name)``.

    These pairs measure the error an op *received*, so that its verdict can rest on the error it *adds*.
    """
    return [(g, m, name) for g, _, m, _, name in _input_tensors(golden_inputs, my_inputs, names, opts)]


def _input_tensors(golden_inputs: Sequence[Path], my_inputs: Sequence[Path], names: Sequence[str],
                   opts: ReadOptions) -> list[tuple[Path, object, Path, object, str | None]]:
    """:func:`input_pairs` with each file opened once: ``(golden file, its tensor, my file, its tensor, name)``.
    Files that cannot be read are left out, as their shapes cannot be matched."""
    mine = []
    for f in my_inputs:
        name = _tensor_name(f, names)
        t = opts.try_load(f) if not (name and is_weight(name)) else None
        if t is not None and t.dtype in _FLOAT and math.prod(t.shape) > 1:
            mine.append((f, t, name))
    used: set[int] = set()
    out = []
    for g in _primary_inputs(list(golden_inputs)):
        gt = opts.try_load(g)
        if gt is None or gt.dtype not in _FLOAT:
            continue
        for k, (m, mt, name) in enumerate(mine):
            if k not in used and shapes_compatible(gt.shape, mt.shape):
                used.add(k)
                out.append((g, gt, m, mt, name))
                break
    return out


def _tensor_name(path: Path, names: Sequence[str]) -> str | None:
    """The topology's name of an ATB tensor file ``intensor{k}``/``outtensor{k}``: ``names[k]``."""
    digits = "".join(ch for ch in _stem(path) if ch.isdigit())
    idx = int(digits) if digits else -1
    return names[idx] if 0 <= idx < len(names) else None


#: Elements compared at each end of two payloads, and windows of SAMPLE_RUN elements spread over the rest.
SAMPLE_ENDS, SAMPLE_WINDOWS, SAMPLE_RUN = 1024, 16, 64


def sample_digest(t, *, from_file: bool = False) -> bytes:
    """A digest of a dumped tensor's dtype, shape and a sample of its bytes: two dumps of one tensor with equal
    digests are taken to hold the same values.

    Only ever compared between an op's input file and the output file of the op that produced it (linked by the
    topology's tensor names), which are two dumps of one tensor. The sample is the first and last SAMPLE_ENDS
    elements and SAMPLE_WINDOWS windows of SAMPLE_RUN in between (~12 KB read, not the payload); a tensor of
    fewer elements is taken whole. A tensor changed in place between the two dumps shows in the sample unless the
    change is confined to unsampled elements; the op would then be judged against its producer's output error
    instead of its own input's (only the share of the error attributed to it can shift: its output is always
    compared in full).

    ``from_file``: read the sample with pread() where the tensor lies contiguously in its file, for a tensor whose
    pages were not read yet: mapping 18 scattered pages cost ~300 us on this VM, 18 preads ~60 us. The digest is
    the same either way.
    """
    flat = np.asarray(t.data).reshape(-1)[:t.numel]  # a plain view: memmap slicing is slow
    h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}|{t.numel}|".encode(), digest_size=16)
    n = flat.size
    if n <= 2 * SAMPLE_ENDS + SAMPLE_WINDOWS * SAMPLE_RUN:
        h.update(flat.tobytes())
    elif not (from_file and t.offset is not None and t.path is not None and _digest_from_file(h, t, n)):
        for start, count in _sample_runs(n):
            h.update(flat[start:start + count].tobytes())
    return h.digest()


def _sample_runs(n: int) -> list[tuple[int, int]]:
    """(first element, count) of each run of the sample, in the order it is hashed: the first and last
    SAMPLE_ENDS elements, then SAMPLE_WINDOWS runs of SAMPLE_RUN spread evenly between them."""
    step = (n - 2 * SAMPLE_ENDS) // SAMPLE_WINDOWS
    return [(0, SAMPLE_ENDS), (n - SAMPLE_ENDS, SAMPLE_ENDS)] + [
        (SAMPLE_ENDS + step * k, SAMPLE_RUN) for k in range(SAMPLE_WINDOWS)]


def _digest_from_file(h, t, n: int) -> bool:
    """Feed ``h`` the sample of :func:`_sample_runs`, in its order, read from the file; False if it cannot be."""
    item = np.dtype(t.data.dtype).itemsize
    runs = _sample_runs(n)
    parts = []
    try:
        fd = os.open(t.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        return False
    try:
        for start, count in runs:
            part = os.pread(fd, count * item, t.offset + start * item)
            if len(part) != count * item:
                return False
            parts.append(part)
    except OSError:
        return False
    finally:
        os.close(fd)
    for part in parts:
        h.update(part)
    return True


# ------------------------------------------------------------------------------------------------------ the engine

def _similarity_or_none(golden, my) -> dict[str, float] | None:
    try:
        return similarity(golden, my)
    except (AitLlmError, OSError):
        return None


def _worst_inputs(results: list[dict[str, float] | None]) -> dict[str, float] | None:
    """The worst error over an op's inputs: lowest cosine, highest relative euclidean distance."""
    vals = [r for r in results if r]
    if not vals:
        return None
    return {"cosine_similarity": min(v["cosine_similarity"] for v in vals),
            "relative_euclidean_distance": max(v["relative_euclidean_distance"] for v in vals)}


def _coarser(*stats) -> str:
    """The less precise dtype of a pair (the one whose default bounds are loosest): it sets the default bounds."""
    names = [s.dtype for s in stats if s is not None]
    if not names:
        return ""
    return max(names, key=lambda d: default_bounds(d).get("relative_euclidean_distance", 0.0))


class Engine:
    """Compares one torch dump with one ATB dump under one tolerance."""

    def __init__(self, golden: TorchDump, my: AtbDump, *, mapping_dir=None, tolerance: Tolerance | None = None,
                 tokens: Sequence[int] | None = None, workers: int | None = None, custom_metrics=(),
                 max_bin_bytes: int | None = None, progress: Progress | None = None,
                 ranks: Sequence[str | int] | None = None):
        self.golden, self.my = golden, my
        self.table = mapping_table(mapping_dir)
        self.tolerance = tolerance or Tolerance()
        self.tokens = tokens
        self.ranks = None if ranks is None else {str(r) for r in ranks if r is not None} or None
        self.workers = workers or os.cpu_count() or 1
        self.custom_metrics = tuple(custom_metrics)
        self.golden_opts = ReadOptions(max_bin_bytes, getattr(golden, "allow_symlinks", None))
        self.my_opts = ReadOptions(max_bin_bytes, getattr(my, "allow_symlinks", None))
        self.progress = progress
        self._listed: dict[tuple, object] = {}  # folder listings of this run: pairing, tasks and links share them
        self._speculate = True  # see _compatible_for
        self._assumed: list[tuple] = []

    def _op_files(self, token_dir: Path, op: AtbOp):
        key = ("atb", str(token_dir), op.rel_dir)
        if key not in self._listed:
            self._listed[key] = op_files(token_dir, op)
        return self._listed[key]

    def _module_files(self, token: int, name: str):
        key = ("torch", token, name)
        if key not in self._listed:
            self._listed[key] = self.golden.module_files(token, name)
        return self._listed[key]

    # -- pairing
    def _compatible_for(self, rank: AtbRank, token: int):
        """Whether a candidate pair's output shapes fit (None: unknown), as pairing asks it.

        Speculatively (the first try of :meth:`run`), a one-to-one candidate is not read: the question is answered
        "unknown" (which pairing takes as a fit) and remembered, and :meth:`_speculation_held` checks the answers
        afterwards, mostly from the shapes the workers saw when they opened the pairs anyway. Reading ~2 headers per
        pair first cost the parent 30-40 ms per 180 pairs while the other cores waited. Where the candidates are
        not one-to-one (an Embedding rule that also matches RotaryEmbedding), pairing asks ``exact``.
        """
        token_dir = rank.token_dirs[token]

        def compatible(pair: OpPair):
            g = _pick(self._module_files(token, pair.module.name).outputs, pair.torch_stem)
            m = _pick(self._op_files(token_dir, pair.files_op).outputs, pair.atb_stem)
            if not g or not m:
                return None
            g_meta, m_meta = self.golden_opts.meta(g[0]), self.my_opts.meta(m[0])
            if g_meta is None or m_meta is None:
                return None
            return shapes_compatible(g_meta[0], m_meta[0]) is not None

        if not self._speculate:
            return compatible

        def assumed(pair: OpPair):
            self._assumed.append((rank.path.name, token, pair, compatible))
            return None
        assumed.exact = compatible  # where candidates are not one-to-one, pairing asks for real (see pair_ops)
        return assumed

    def _speculation_held(self, tasks: list[_Task]) -> bool:
        """Whether every fit that pairing assumed is real: a fit the same pairing would have been told, so the
        result is the one reading every header first gives."""
        seen = {}
        for task in tasks:
            metrics = task.row.metrics  # its stats hold both shapes, also when they did not fit
            if task.pair is not None and task.row.data_id == 0 and metrics is not None:
                seen[(task.row.rank, task.row.token_id, id(task.pair.atb), id(task.pair.module),
                      task.pair.torch_stem, task.pair.atb_stem)] = (metrics.golden.shape, metrics.my.shape)
        for rank_name, token, pair, compatible in self._assumed:
            shapes = seen.get((rank_name, token, id(pair.atb), id(pair.module), pair.torch_stem, pair.atb_stem))
            fits = shapes_compatible(*shapes) is not None if shapes is not None else compatible(pair) is not False
            if not fits:
                return False
        return True

    def run(self) -> CompareResult:
        """Pair, compare and judge. Pairing first assumes that output shapes fit (see :meth:`_compatible_for`);
        should one not, the run is redone reading every pair's headers before pairing."""
        self._speculate = True
        result = self._run()
        if result is None:
            self._speculate = False
            result = self._run()
        return result

    def _run(self) -> CompareResult | None:
        self._listed = {}
        self._assumed = []
        rows: list[Row] = []
        unpaired_all = []
        tasks: list[_Task] = []
        all_tokens: set[int] = set()
        topologies = []
        checked: set[tuple[str, str]] = set()
        rank_errors: list[AitLlmError] = []
        for rank in self.my.ranks:
            rank_name = rank.path.name
            if self.ranks is not None and not ({rank_name, str(rank.device_id)} & self.ranks):
                continue
            try:
                topology = rank.topology()
            except AitLlmError as exc:  # e.g. a rank whose process died before writing its topology
                rank_errors.append(exc)
                rows.append(Row(None, 0, -1, rank_name, status=UNPAIRED, reason=f"rank not compared: {exc}"))
                continue
            order = completion_order(topology)
            g_tokens, m_tokens = set(self.golden.tokens), set(rank.token_dirs)
            wanted = set(self.tokens) if self.tokens is not None else g_tokens | m_tokens
            common = sorted(g_tokens & m_tokens & wanted)
            for t in sorted((g_tokens ^ m_tokens) & wanted):
                side = "torch" if t in g_tokens else "ATB"
                rows.append(Row(t, 0, -1, rank_name, status=UNPAIRED,
                                reason=f"token {t} dumped only on the {side} side"))
            if not common:
                continue
            all_tokens.update(common)
            pairing = pair_ops(topology, self.golden.tree, self.table, self._compatible_for(rank, common[0]))
            unpaired_all.extend(pairing.unpaired)
            checked.update((rank_name, rel) for rel in output_checked_by_a_part(pairing.pairs))
            for u in pairing.unpaired:
                op = u.op
                rows.append(Row(None, 0, order.get(id(op), -1) if u.side == "atb" else -1, rank_name,
                                atb_op=u.name if u.side == "atb" else "",
                                atb_op_name=getattr(op, "op_name", "") if u.side == "atb" else "",
                                my_op_type=u.op_type if u.side == "atb" else "",
                                torch_module=u.name if u.side == "torch" else "",
                                golden_op_type=u.op_type if u.side == "torch" else "",
                                status=UNPAIRED, reason=u.reason))
            producers = _producers(topology)
            for token in common:
                token_dir = rank.token_dirs[token]
                start = len(tasks)
                for pair in pairing.pairs:
                    tasks.extend(self._tasks(pair, token, token_dir, rank_name, order[id(pair.atb)]))
                _link_inputs(tasks, start, producers, token_dir, self._op_files)
            topologies.append((rank_name, topology))
        if rank_errors and not topologies:
            raise rank_errors[0]  # no rank could be read: the comparison as a whole is impossible
        self._compute(tasks)
        if self._speculate and not self._speculation_held(tasks):
            return None
        self._finish(tasks)
        for rank_name, topology in topologies:
            _judge_unpaired_regions(topology, [t for t in tasks if t.row.rank == rank_name])
        rows.extend(t.row for t in tasks)
        rows.sort(key=_row_key)
        _mark_divergence(rows, checked)
        return CompareResult(rows, unpaired_all, self.tolerance, tokens=sorted(all_tokens),
                             golden_root=str(self.golden.root), my_root=str(self.my.root))

    def _tasks(self, pair: OpPair, token: int, token_dir: Path, rank_name: str, order: int) -> list[_Task]:
        golden_files = self._module_files(token, pair.module.name)
        my_files = self._op_files(token_dir, pair.files_op)
        inputs = (golden_files.inputs, self._op_files(token_dir, pair.atb).inputs, tuple(pair.atb.in_tensors))
        out = []
        for data_id, g, m in _output_pairs(pair, golden_files, my_files):
            row = Row(token, data_id, order, rank_name, atb_op=pair.atb.rel_dir, atb_op_name=pair.atb.op_name,
                      my_op_type=pair.atb.op_type, torch_module=pair.module.name, golden_op_type=pair.module.type,
                      golden_path=str(g or ""), my_path=str(m or ""), rule=pair.rule, note=pair.note)
            names = (pair.atb.rel_dir, pair.module.name, pair.module.type)
            if self.tolerance.is_skipped(pair.atb.op_type, pair.atb.op_name, *names):
                row.status, row.reason = SKIPPED, "skipped by the tolerance's skip= list"
            elif g is None or m is None:
                side = "torch module" if g is None else "ATB op"
                row.reason = f"no output tensor dumped for this {side}"
                row.passed = False
            out.append(_Task(row, g, m, inputs, pair))
        return out

    def _compare_one(self, task: _Task) -> None:
        row = task.row
        if row.status != COMPARED or row.passed is False:
            return
        try:
            golden = self.golden_opts.load(task.golden)
            my = self.my_opts.load(task.my)
            row.metrics = compare_tensors(golden, my, custom_metrics=self.custom_metrics)
            if task.sampled:  # its pages were just read: the sample costs no I/O here
                row.output_sample = (sample_digest(golden), sample_digest(my))
        except AitLlmError as exc:
            row.reason, row.passed = str(exc), False
            return
        except OSError as exc:
            row.reason, row.passed = f"cannot read: {exc}", False
            return
        finally:
            golden = my = None  # noqa: F841 - drop the memory maps before the next pair
        if row.metrics.fail_reason:
            row.reason = row.metrics.fail_reason
        links = task.links or {}
        parts = []
        for g_path, g, m_path, m, name in _input_tensors(*task.input_files, self.my_opts):
            index = links.get(name) if name else None
            part = (_Linked(index, sample_digest(g, from_file=True), sample_digest(m, from_file=True))
                    if index is not None else _similarity_or_none(g, m))
            parts.append((part, g_path, m_path))
            g = m = None  # noqa: F841
        row.input_parts = parts

    def _input_error(self, g_path: Path, m_path: Path) -> dict[str, float] | None:
        """The error of one input pair, read from its files; None when they cannot be read."""
        try:
            return similarity(self.golden_opts.load(g_path), self.my_opts.load(m_path))
        except (AitLlmError, OSError):
            return None

    def _finish(self, tasks: list[_Task]) -> None:
        """Give each row its input error (taking linked ones from the producing tasks' rows when the samples
        match, else reading the input files) and its verdict."""
        for task in tasks:
            row = task.row
            if row.status != COMPARED or row.metrics is None:
                continue
            errors = []
            for part, g_path, m_path in row.input_parts:
                if isinstance(part, _Linked):
                    source = tasks[part.index].row
                    if (source.metrics is not None and source.metrics.compared
                            and source.output_sample == (part.golden, part.my)):
                        part = {k: source.metrics.values[k] for k in ("cosine_similarity",
                                                                      "relative_euclidean_distance")}
                    else:  # changed after its producer was dumped (or that pair failed): its own files say
                        part = self._input_error(g_path, m_path)
                errors.append(part)
            row.input_parts = []
            row.input_metrics = _worst_inputs(errors)
            self._judge(row)
        for task in tasks:
            task.row.output_sample = None

    def _compute(self, tasks: list[_Task]) -> None:
        from .parallel import run_in_order  # worker threads/processes or serial; rows kept in task order

        run_in_order(self, tasks, self.workers, self.progress)

    def _judge(self, row: Row) -> None:
        dtype = _coarser(row.metrics.golden, row.metrics.my)
        row.bounds = self.tolerance.bounds_for(row.my_op_type, row.atb_op_name, dtype,
                                               row.atb_op, row.torch_module, row.golden_op_type)
        mode = self.tolerance.mode
        row.effective = effective_metrics(row.metrics.values, row.input_metrics, mode)
        if row.metrics.fail_reason:
            row.passed = False
            return
        row.breaches = judge(row.metrics.values, row.bounds, input_metrics=row.input_metrics, mode=mode)
        row.passed = not row.breaches


def _producers(topology) -> dict[str, list[AtbOp]]:
    """Tensor name -> the ops that output it: the leaf that writes it and the graph ops it leaves, in topology
    order (a graph op's output is its last part's)."""
    out: dict[str, list[AtbOp]] = {}
    for op in topology.walk():
        for name in op.out_tensors:
            out.setdefault(name, []).append(op)
    return out


def _link_inputs(tasks: list[_Task], start: int, producers: dict[str, list[AtbOp]], token_dir: Path,
                 files_of: Callable) -> None:
    """Set ``links`` of tasks[start:] (one token of one rank): for each input tensor name, a task that compares an
    output file of an op producing it, when there is one; that task is then ``sampled``."""
    by_my = {str(t.my): i for i, t in enumerate(tasks[start:], start) if t.my is not None}
    found: dict[str, int | None] = {}
    for task in tasks[start:]:
        links = {}
        for name in task.input_files[2]:
            if name not in found:
                found[name] = None
                for op in producers.get(name, ()) if not is_weight(name) else ():
                    outs = [f for f in files_of(token_dir, op).outputs if _tensor_name(f, op.out_tensors) == name]
                    found[name] = by_my.get(str(outs[0])) if outs else None
                    if found[name] is not None:
                        break
            index = found[name]
            if index is not None:
                links[name] = index
                tasks[index].sampled = True
        task.links = links or None


def _judge_unpaired_regions(topology, tasks: list[_Task]) -> None:
    """Catch error that arises inside ops with no torch counterpart (Rope, SelfAttention, residual adds...).

    An op's verdict rests on the error it adds over its inputs, so a wrong RopeOperation would otherwise pass
    unseen: the o_proj after it receives wrong inputs and adds nothing. Here, for each compared op whose inputs
    come (through the dataflow names of the topology) from unpaired ops, the error already in its inputs is set
    against the error of the nearest *paired* ops upstream (their sum); when the jump breaks the op's bound, the row breaches
    and the breach names the unpaired ops where the error arose.
    """
    paired: dict[int, list[_Task]] = {}
    for task in tasks:
        if task.pair is not None:
            paired.setdefault(id(task.pair.atb), []).append(task)
            if task.pair.output_op is not None:
                paired.setdefault(id(task.pair.output_op), []).append(task)
    producer: dict[str, AtbOp] = {}
    for op in topology.walk():  # leaves produce tensors; a paired graph op stands for the leaf that ends it
        for name in op.out_tensors:
            if op.is_leaf and name not in producer:
                producer[name] = op
            elif not op.is_leaf and id(op) in paired:
                producer[name] = op
    by_token: dict[tuple[int, int], Row] = {}
    for op_id, op_tasks in paired.items():
        for task in op_tasks:
            by_token.setdefault((op_id, task.row.token_id), task.row)
    red = "relative_euclidean_distance"
    for task in tasks:
        row = task.row
        if task.pair is None or not row.input_metrics or red not in row.input_metrics or red not in row.bounds:
            continue
        unpaired_ops, frontier = _upstream(task.pair.atb, producer, paired)
        if not unpaired_ops:
            continue
        upstream = [by_token.get((id(op), row.token_id)) for op in frontier]
        # errors of several inputs compound (a product's relative error is about the sum of its factors'):
        # the sum is the most the unpaired ops could have received, so only error they made themselves remains
        upstream_err = sum(r.metric(red) for r in upstream if r is not None and not math.isnan(r.metric(red)))
        jump = row.input_metrics[red] - upstream_err
        if jump > row.bounds[red]:
            names = ", ".join(op.rel_dir for op in unpaired_ops[:4]) + (" ..." if len(unpaired_ops) > 4 else "")
            row.breaches.insert(0, Breach(red, jump, row.bounds[red], "max", True,
                                          f"in this op's inputs, arising in unpaired op(s) upstream: {names}"))
            row.passed = False


def _upstream(op: AtbOp, producer: dict[str, AtbOp], paired: dict[int, list]) -> tuple[list[AtbOp], list[AtbOp]]:
    """(unpaired ops on the paths into ``op``, the nearest paired ops beyond them), following tensor names."""
    unpaired: list[AtbOp] = []
    frontier: list[AtbOp] = []
    seen: set[int] = set()
    stack = [producer[n] for n in op.in_tensors if not is_weight(n) and n in producer]
    inside = {id(o) for o in op.walk()}
    while stack:
        cur = stack.pop()
        if id(cur) in seen or id(cur) in inside:
            continue
        seen.add(id(cur))
        if id(cur) in paired:
            frontier.append(cur)
            continue
        unpaired.append(cur)
        stack.extend(producer[n] for n in cur.in_tensors if not is_weight(n) and n in producer)
    if not frontier:
        return [], []  # fed by model inputs through unpaired ops only: nothing upstream to measure against
    unpaired.sort(key=lambda o: o.order)
    return unpaired, frontier


def _row_key(row: Row):
    return (row.token_id if row.token_id is not None else -1, row.rank, row.order, row.data_id, row.torch_module)


def output_checked_by_a_part(pairs: Sequence[OpPair]) -> set[str]:
    """rel_dirs of paired graph ops whose output tensor is also the output of one of their own paired parts.

    Such a graph op's ATB value is already checked by that part: if the part agrees with its module and the graph
    op disagrees with *its* module, the two torch modules do not hold the same thing (HF BloomMLP returns its
    output plus the residual, while ATB's MlpGateLayerV2 ends at the down projection).
    """
    out = set()
    for pair in pairs:
        if pair.atb.is_leaf or not pair.atb.out_tensors:
            continue
        inside = {id(op) for op in pair.atb.walk()}
        part_outputs = {name for p in pairs if p is not pair and id(p.atb) in inside for name in p.files_op.out_tensors}
        if pair.atb.out_tensors[0] in part_outputs:
            out.add(pair.atb.rel_dir)
    return out


def _mark_divergence(rows: list[Row], checked: set[tuple[str, str]]) -> None:
    """Mark the root cause and the propagated breaches; demote graph-op breaches that are mapping questions.

    ``checked`` holds (rank, rel_dir) of graph ops whose output is a paired part's output (see
    :func:`output_checked_by_a_part`). When such a graph op breaches while every one of its paired parts passes,
    the mismatch cannot be precision: it is reported as ``mapping_suspect``, never as the first divergence.
    """
    compared = [r for r in rows if r.status == COMPARED]
    for row in compared:
        if not row.breached or row.metrics is None or (row.rank, row.atb_op) not in checked:
            continue
        prefix = row.atb_op + "/"
        parts = [r for r in compared if r.token_id == row.token_id and r.rank == row.rank
                 and r.atb_op.startswith(prefix)]
        if parts and all(p.passed for p in parts):
            row.status = SUSPECT
            row.note = ("values disagree while its parts agree and its output is theirs: check the mapping "
                        "(the torch module may return its output plus the residual)")
    first = True
    for row in rows:
        if row.breached:
            row.first_divergence, row.propagated = first, not first
            first = False


def compare_dumps(golden, my, *, mapping_dir=None, tolerance: Tolerance | None = None,
                  tokens: Sequence[int] | None = None, workers: int | None = None, custom_metrics=(),
                  max_bin_bytes: int | None = None, progress: Progress | None = None,
                  allow_symlinks: bool | None = None, ranks: Sequence[str | int] | None = None) -> CompareResult:
    """Compare a torch (golden) dump with an ATB (my) dump. No file is written (see ``pytest_ait_llm.api``).

    ``golden``/``my`` are dump handles or paths (a dump root, a rank/pid dir, or a token dir). ``allow_symlinks``
    applies to paths (None: the AIT_LLM_ALLOW_SYMLINKS environment variable decides).
    """
    from .tensor_parallel import compare_tensor_parallel  # a TP run's ranks are compared as one (or rank to rank)

    tp = compare_tensor_parallel(golden, my, ranks=ranks, allow_symlinks=allow_symlinks,
                                 mapping_dir=mapping_dir, tolerance=tolerance, tokens=tokens, workers=workers,
                                 custom_metrics=custom_metrics, max_bin_bytes=max_bin_bytes, progress=progress)
    if tp is not None:
        return tp
    golden_dump = golden if isinstance(golden, TorchDump) else open_torch_dump(golden, allow_symlinks=allow_symlinks)
    my_dump = my if isinstance(my, AtbDump) else open_atb_dump(my, allow_symlinks=allow_symlinks)
    engine = Engine(golden_dump, my_dump, mapping_dir=mapping_dir, tolerance=tolerance, tokens=tokens,
                    workers=workers, custom_metrics=custom_metrics, max_bin_bytes=max_bin_bytes, progress=progress,
                    ranks=ranks)
    return engine.run()
