"""Compare a tensor-parallel ATB run (N rank dirs) with a single-device golden: the ranks as one comparison.

Plan: one rank's topology is paired with the golden tree, each candidate confirmed by the op's distribution over
the ranks (mapping/ranks.py: replicated, split along one dim, or unknown with the reason). Compare: a split op is
one row, ``rank`` = ``merged``, its metrics those of the concatenation in rank order (compare/merged.py) and each
shard's share of the error; a replicated op is one row per rank, plus a ``consistency`` row naming the ranks that
disagree when they do (an all-reduce or broadcast bug, a finding even where each rank is close to the golden).
Judge: the merged metrics and every shard's own cosine and distance against the same bounds, so a 5 % error in one
shard of eight is not averaged away; the first divergence names the shard's rank.

With ``ranks`` given (the ``ait_rank`` parametrization) only those ranks are compared: their replicated ops, and
their shards against their slices of the golden. A golden with ranks of its own is paired rank to rank by the
comparison too (``golden_ranks``): each rank's file against the golden rank's.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AitLlmError
from ..formats.atb_layout import op_files
from ..formats.ranks import RankedRun, content_evidence, token_problems
from ..formats.tensor import RawTensor
from ..formats.torch_layout import TorchDump
from ..mapping.pairing import OpPair, Unpaired, completion_order, pair_ops
from ..mapping.ranks import (REPLICATED, SPLIT, Distribution, align_shared_targets, decide, decide_rank_to_rank,
                             is_all_reduced)
from ..mapping.rules import mapping_table
from .merged import compare_merged, share_text, worst_shard
from .metrics import compare_tensors
from .plan import CompareOptions, ReadOptions
from .result import COMPARED, UNPAIRED, CompareResult, Row
from .tolerance import Breach, judge

MERGED, CONSISTENCY = "merged", "consistency"

#: Largest relative distance between two ranks' copies of a replicated tensor that is still agreement: one rounding
#: unit of the dtype (an all-reduce gives every rank the same bits; a broadcast bug gives more than a unit).
CONSISTENCY_LIMIT = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}


def _stem(path: Path) -> str:
    return Path(path).stem


def _pick(files: list[Path], stem: str | None) -> list[Path]:
    if stem is None:
        return files
    aliases = {"output", "output_0"} if stem in ("output", "output_0") else {stem}
    return [f for f in files if _stem(f) in aliases][:1]


class _Files:
    """One side's read options, with the shapes already read (pairing asks each file's shape more than once)."""

    def __init__(self, read: ReadOptions):
        self.read, self.shapes = read, {}
        self.allow_symlinks = read.allow_symlinks

    def load(self, path: Path) -> RawTensor:
        return self.read.load(path)

    def shape(self, path: Path) -> tuple[int, ...] | None:
        if str(path) not in self.shapes:
            self.shapes[str(path)] = self.read.shape(path)
        return self.shapes[str(path)]


class TensorParallelComparison:
    """One TP run against one single-device golden (see the module docstring)."""

    def __init__(self, golden: TorchDump, run: RankedRun, options: CompareOptions,
                 golden_ranks: Sequence[TorchDump] = ()):
        self.golden, self.run, self.options = golden, run, options
        #: a TP golden: one torch dump per rank, rank order (``golden`` is the first); compared rank to rank
        self.golden_ranks = list(golden_ranks)
        self.table = mapping_table(options.mapping_dir)
        self.tolerance = options.tolerance
        self.tokens = options.tokens
        wanted = {r for r in options.ranks or () if r != MERGED} or None
        self.only = None if wanted is None else [i for i, r in enumerate(run.ranks)
                                                 if {r.path.name, str(r.device_id), str(i)} & wanted]
        self.reader, self.golden_reader = _Files(options.my), _Files(options.golden)
        self.custom_metrics = options.custom_metrics
        self.decisions: dict[tuple, Distribution] = {}

    # -- files
    def _rank_files(self, token: int, op, stem: str | None) -> list[Path | None]:
        out = []
        for rank in self.run.ranks:
            token_dir = rank.token_dirs.get(token)
            files = _pick(op_files(token_dir, op).outputs, stem) if token_dir is not None else []
            out.append(files[0] if files else None)
        return out

    def _golden_file(self, token: int, module: str, stem: str | None, rank: int | None = None) -> Path | None:
        golden = self.golden if rank is None else self.golden_ranks[rank]
        if token not in golden.token_dirs:
            return None
        files = _pick(golden.module_files(token, module).outputs, stem)
        return files[0] if files else None

    # -- plan
    def distribution(self, pair: OpPair, token: int) -> Distribution | None:
        """How ``pair``'s output is distributed over the ranks (None: a side has no file to tell)."""
        key = (id(pair.files_op), id(pair.module), pair.atb_stem, pair.torch_stem)
        if key not in self.decisions:
            g = self._golden_file(token, pair.module.name, pair.torch_stem)
            mine = self._rank_files(token, pair.files_op, pair.atb_stem)
            if g is None or any(m is None for m in mine):
                return None
            g_shape = self.golden_reader.shape(g)
            shapes = [self.reader.shape(m) for m in mine]
            if g_shape is None or any(s is None for s in shapes):
                return None
            evidence = content_evidence(mine, allow_symlinks=self.reader.allow_symlinks)
            if self.golden_ranks:
                g_files = [self._golden_file(token, pair.module.name, pair.torch_stem, rank=r)
                           for r in range(len(self.golden_ranks))]
                if any(f is None for f in g_files):
                    return None
                g_shapes = [self.golden_reader.shape(f) for f in g_files]
                g_evidence = content_evidence(g_files, allow_symlinks=self.golden_reader.allow_symlinks,
                                              load=self.golden_reader.load)
                self.decisions[key] = decide_rank_to_rank(g_shapes, shapes, golden_content=g_evidence,
                                                          content=evidence, all_reduced=is_all_reduced(pair.files_op))
            else:
                self.decisions[key] = decide(g_shape, shapes, content=evidence,
                                             all_reduced=is_all_reduced(pair.files_op))
        return self.decisions[key]

    def run_comparison(self) -> CompareResult:
        rows: list[Row] = [Row(None, 0, -1, _problem_rank(p), status=UNPAIRED, reason=p) for p in self.run.problems]
        reference = self.run.ranks[0]
        topology = reference.topology()
        order = completion_order(topology)
        g_tokens = set(self.golden.tokens)
        m_tokens = set().union(*(r.token_dirs for r in self.run.ranks))
        wanted = set(self.tokens) if self.tokens is not None else g_tokens | m_tokens
        for t in sorted((g_tokens ^ m_tokens) & wanted):
            side = "torch" if t in g_tokens else "ATB"
            rows.append(Row(t, 0, -1, MERGED, status=UNPAIRED, reason=f"token {t} dumped only on the {side} side"))
        for t, line in token_problems(self.run, wanted & g_tokens):
            rows.append(Row(t, 0, -1, MERGED, status=UNPAIRED, reason=line))
        common = sorted(g_tokens & m_tokens & wanted)
        everywhere = [t for t in common if all(t in r.token_dirs for r in self.run.ranks)]
        if not common:
            return self._result(rows, [], [])
        probe = everywhere[0] if everywhere else common[0]

        def compatible(pair: OpPair):
            dist = self.distribution(pair, probe)
            return None if dist is None else dist.kind in (REPLICATED, SPLIT)
        compatible.exact = compatible
        pairing = align_shared_targets(pair_ops(topology, self.golden.tree, self.table, compatible), self.table,
                                       compatible, order)
        unpaired = [self._explained(u) for u in pairing.unpaired]
        for u in unpaired:
            op = u.op
            rows.append(Row(None, 0, order.get(id(op), -1) if u.side == "atb" else -1, MERGED,
                            atb_op=u.name if u.side == "atb" else "",
                            atb_op_name=getattr(op, "op_name", "") if u.side == "atb" else "",
                            my_op_type=u.op_type if u.side == "atb" else "",
                            torch_module=u.name if u.side == "torch" else "",
                            golden_op_type=u.op_type if u.side == "torch" else "", status=UNPAIRED, reason=u.reason))
        for token in common:
            for pair in pairing.pairs:
                rows.extend(self._compare_pair(pair, token, order[id(pair.atb)]))
        return self._result(rows, unpaired, common)

    def _explained(self, u: Unpaired) -> Unpaired:
        """The pairing's reason, with what the rank evidence said about that op's candidates."""
        if u.side != "atb":
            return u
        reasons = {d.reason for (op_id, *_), d in self.decisions.items() if op_id == id(u.op) and d.kind not in
                   (REPLICATED, SPLIT)}
        if reasons:
            u.reason = f"{u.reason}; tensor parallel: {'; '.join(sorted(reasons))}"
        return u

    # -- compare and judge
    def _row(self, pair: OpPair, token: int, order: int, rank: str, golden_path, my_path: str) -> Row:
        return Row(token, 0, order, rank, atb_op=pair.atb.rel_dir, atb_op_name=pair.atb.op_name,
                   my_op_type=pair.atb.op_type, torch_module=pair.module.name, golden_op_type=pair.module.type,
                   golden_path=str(golden_path or ""), my_path=my_path, rule=pair.rule, note=pair.note)

    def _compare_pair(self, pair: OpPair, token: int, order: int) -> list[Row]:
        g_path = self._golden_file(token, pair.module.name, pair.torch_stem)
        mine = self._rank_files(token, pair.files_op, pair.atb_stem)
        dist = self.distribution(pair, token) or self.distribution(pair, min(self.golden.tokens))
        names = [r.path.name for r in self.run.ranks]
        indices = self.only if self.only is not None else range(len(mine))
        missing = [i for i in indices if mine[i] is None]
        if self.tolerance.is_skipped(pair.atb.op_type, pair.atb.op_name, pair.atb.rel_dir, pair.module.name,
                                     pair.module.type):
            row = self._row(pair, token, order, MERGED, g_path, "")
            row.status, row.reason = "skipped", "skipped by the tolerance's skip= list"
            return [row]
        if (g_path is None and not self.golden_ranks) or missing or dist is None:
            row = self._row(pair, token, order, MERGED if not missing else names[missing[0]], g_path,
                            ";".join(str(m or "") for m in mine))
            if g_path is None:
                row.reason = "no output tensor dumped for this torch module"
            else:
                row.reason = "; ".join(f"rank {i} ({self.run.ranks[i].path / str(token)}): no output tensor for "
                                       f"this op (a rank cut short?)" for i in missing) or "distribution unknown"
            row.passed = False
            return [row]
        if self.golden_ranks:
            return self._rank_to_rank_rows(pair, token, order, mine, indices, dist)
        if dist.kind == SPLIT:
            return self._split_rows(pair, token, order, g_path, mine, dist)
        return self._replicated_rows(pair, token, order, g_path, mine, indices)

    def _split_rows(self, pair, token, order, g_path, mine, dist) -> list[Row]:
        rank_name = MERGED if self.only is None else self.run.ranks[self.only[0]].path.name
        files = mine if self.only is None else [mine[i] for i in self.only]
        row = self._row(pair, token, order, rank_name, g_path, ";".join(str(m) for m in files))
        try:
            golden = self.golden_reader.load(g_path)
            dim = dist.dim
            shards = _aligned_shards([self.reader.load(m) for m in mine], golden, dim)
            if self.only is None:
                row.metrics, shares = compare_merged(golden, shards, dim)
            else:  # one rank's shard against its slice of the golden
                r = self.only[0]
                start = sum(int(s.shape[dim]) for s in shards[:r])
                row.metrics = compare_tensors(_slice(golden, dim, start, int(shards[r].shape[dim])), shards[r])
                shares = []
        except (AitLlmError, OSError) as exc:
            row.reason, row.passed = f"cannot read: {exc}", False
            return [row]
        finally:
            golden = shards = None  # noqa: F841 - drop the memory maps
        if row.metrics.fail_reason:
            row.reason = row.metrics.fail_reason
        self._judge(row)
        if shares:
            row.note = _join(row.note, f"split along dim {dist.dim} over {len(shares)} ranks; error shares: "
                                       f"{share_text(shares)}")
            shard_breaches = []
            for r, share in enumerate(shares):
                values = {"cosine_similarity": share.cosine_similarity,
                          "relative_euclidean_distance": share.relative_euclidean_distance}
                bounds = {k: v for k, v in row.bounds.items() if k in values}
                for b in judge(values, bounds, mode="absolute"):
                    shard_breaches.append(Breach(b.metric, b.value, b.limit, b.kind, where=f"in rank {r}'s shard"))
            worst = worst_shard(shares)
            if shard_breaches or row.breaches:
                row.breaches = list(row.breaches) + [b for b in shard_breaches
                                                     if str(b) not in {str(x) for x in row.breaches}]
                row.passed = False
                if worst is not None:
                    row.reason = _join(row.reason, f"rank {worst}'s shard ({self.run.ranks[worst].path.name}) "
                                                   f"carries {shares[worst].error_share:.0%} of the error")
        return [row]

    def _rank_to_rank_rows(self, pair, token, order, mine, indices, dist) -> list[Row]:
        """Rank r's file against golden rank r's, for every rank; replicated ops also checked across ranks."""
        goldens = [self._golden_file(token, pair.module.name, pair.torch_stem, rank=r) if r < len(self.golden_ranks)
                   else None for r in range(len(mine))]
        rows = self._replicated_rows(pair, token, order, goldens, mine, indices,
                                     consistency=dist.kind == REPLICATED)
        for row in rows:
            if row.rank != CONSISTENCY:
                row.note = _join(row.note, f"rank to rank ({dist.kind}), golden {Path(row.golden_path).parents[2].name}"
                                 if row.golden_path else f"rank to rank ({dist.kind})")
        return rows

    def _replicated_rows(self, pair, token, order, g_path, mine, indices, consistency: bool = True) -> list[Row]:
        """One row per rank against the golden (``g_path``: one file, or one per rank), then the consistency row."""
        rows, seen = [], []
        for i in indices:
            golden_path = g_path[i] if isinstance(g_path, list) else g_path
            row = self._row(pair, token, order, self.run.ranks[i].path.name, golden_path, str(mine[i]))
            if golden_path is None:
                row.reason, row.passed = f"golden rank {i}: no output tensor for this module", False
                rows.append(row)
                continue
            try:
                row.metrics = compare_tensors(self.golden_reader.load(golden_path), self.reader.load(mine[i]),
                                              custom_metrics=self.custom_metrics)
            except (AitLlmError, OSError) as exc:
                row.reason, row.passed = f"cannot read: {exc}", False
                rows.append(row)
                continue
            if row.metrics.fail_reason:
                row.reason = row.metrics.fail_reason
            self._judge(row)
            rows.append(row)
            seen.append((i, row.metrics))
        if consistency and self.only is None and len(seen) > 1:
            finding = self._consistency(pair, token, order, mine, seen)
            if finding is not None:
                rows.append(finding)
        return rows

    def _consistency(self, pair, token, order, mine, seen) -> Row | None:
        """A row naming the ranks whose copy of a replicated tensor differs from the first rank's; None when all
        agree. Copies with equal sums against the golden are equal, so only differing ones are read again."""
        base_i, base = seen[0]

        def fingerprint(m):
            return (tuple(m.values.values()), m.my.max, m.my.min, m.my.mean, m.my.nan_count)
        suspects = [i for i, m in seen[1:] if fingerprint(m) != fingerprint(base)]
        if not suspects:
            return None
        disagree, worst = [], None
        for i in suspects:
            try:
                pm = compare_tensors(self.reader.load(mine[base_i]), self.reader.load(mine[i]))
            except (AitLlmError, OSError):
                continue
            red = pm.values["relative_euclidean_distance"]
            limit = CONSISTENCY_LIMIT.get(pm.my.dtype if pm.my else "", 0.0)
            if pm.fail_reason or not red <= limit:
                disagree.append((i, red))
                if worst is None or not red <= worst[1].values["relative_euclidean_distance"]:
                    worst = (i, pm)
        if not disagree:
            return None
        names = self.run.ranks
        i, pm = worst
        row = self._row(pair, token, order, CONSISTENCY, mine[base_i], str(mine[i]))
        row.metrics = pm
        limit = CONSISTENCY_LIMIT.get(pm.my.dtype if pm.my else "", 0.0)
        row.bounds = {"relative_euclidean_distance": limit}
        row.breaches = [Breach("relative_euclidean_distance", red, limit, "max",
                               where=f"rank {r} ({names[r].path.name}) vs rank {base_i} ({names[base_i].path.name})")
                        for r, red in disagree]
        row.passed = False
        row.reason = (f"replicated tensor differs between ranks: " +
                      ", ".join(f"rank {r} vs rank {base_i} (relative distance {red:.3g})" for r, red in disagree))
        return row

    def _judge(self, row: Row) -> None:
        dtype = _coarser(row.metrics.golden, row.metrics.my)
        row.bounds = self.tolerance.bounds_for(row.my_op_type, row.atb_op_name, dtype, row.atb_op,
                                               row.torch_module, row.golden_op_type)
        row.effective = dict(row.metrics.values)
        if row.metrics.fail_reason:
            row.passed = False
            return
        row.breaches = judge(row.metrics.values, row.bounds, mode="absolute")
        row.passed = not row.breaches

    def _result(self, rows: list[Row], unpaired: list, tokens: list[int]) -> CompareResult:
        rows.sort(key=lambda r: (r.token_id if r.token_id is not None else -1, r.order, r.data_id,
                                 {CONSISTENCY: 1}.get(r.rank, 0), r.rank))
        first = True
        for row in rows:
            if row.breached:
                row.first_divergence, row.propagated = first, not first
                first = False
        return CompareResult(rows, unpaired, self.tolerance, tokens=tokens, golden_root=str(self.golden.root),
                             my_root=str(self.run.dump.root))


def _problem_rank(line: str) -> str:
    return Path(line.split(":", 1)[0].removeprefix("rank dir ")).name if line.startswith("rank dir ") else MERGED


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _coarser(*stats) -> str:
    order = ("bfloat16", "float16", "float32", "float64")
    names = [s.dtype for s in stats if s is not None]
    known = [n for n in names if n in order]
    return min(known, key=order.index) if known else (names[0] if names else "float32")


def _aligned_shards(shards: list[RawTensor], golden: RawTensor, dim: int) -> list[RawTensor]:
    """The shards with golden's leading size-1 dims ([s, h] shards of a [1, s, h] golden)."""
    lead = len(golden.shape) - len(shards[0].shape)
    if lead <= 0:
        return shards
    return [RawTensor(s.data, s.dtype, (1,) * lead + tuple(s.shape), s.path, s.offset) for s in shards]


def _slice(golden: RawTensor, dim: int, start: int, width: int) -> RawTensor:
    """A copy of golden's ``[start, start + width)`` along ``dim`` (one rank's part: no larger than its shard)."""
    shape = tuple(int(d) for d in golden.shape)
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    part = golden.data.reshape(-1)[: golden.numel].reshape(outer, shape[dim], inner)[:, start:start + width, :]
    return RawTensor(np.ascontiguousarray(part), golden.dtype, shape[:dim] + (width,) + shape[dim + 1:])


def compare_run(golden: TorchDump, run: RankedRun, options: CompareOptions | None = None,
                golden_ranks: Sequence[TorchDump] = ()) -> CompareResult:
    """Compare the TP ``run`` with the single-device ``golden`` (or, with ``golden_ranks``, rank to rank)."""
    return TensorParallelComparison(golden, run, options or CompareOptions(), golden_ranks).run_comparison()


def compare_tensor_parallel(golden, my, options: CompareOptions) -> CompareResult | None:
    """The comparison of a tensor-parallel ``my`` run, or None when ``my`` is not one (the caller compares as usual).

    ``my`` is a TP run when its rank dirs' topologies state a parallel group (``rank``/``rankSize`` params), or
    when ``options.ranks`` is ``{"merged"}`` and it has two or more rank dirs. A path (root, rank dir or token dir)
    brings in every rank of its run; an AtbDump handle is taken as it is. A ``golden`` path holding several rank
    dirs is a TP golden: rank r is compared with golden rank r (pairing still decided by both sides' evidence).
    """
    from ..formats.atb_layout import AtbDump, open_atb_dump
    from ..formats.ranks import is_tensor_parallel, open_run, torch_rank_dirs
    from ..formats.torch_layout import open_torch_dump

    links = options.my.allow_symlinks
    dump = my if isinstance(my, AtbDump) else open_atb_dump(my, allow_symlinks=links)
    if isinstance(my, AtbDump) and len(dump.ranks) < 2:
        return None
    root_ranks = dump.ranks if isinstance(my, AtbDump) else open_atb_dump(dump.root, allow_symlinks=links).ranks
    if len(root_ranks) < 2:
        return None
    run = open_run(dump if isinstance(my, AtbDump) else dump.root, allow_symlinks=links)
    if not is_tensor_parallel(run) and not (options.ranks == frozenset({MERGED}) and run.size > 1):
        return None
    g_links = options.golden.allow_symlinks
    golden_dirs = [] if isinstance(golden, TorchDump) else torch_rank_dirs(golden)
    if golden_dirs:
        golden_ranks = [open_torch_dump(d, allow_symlinks=g_links) for d in golden_dirs]
        result = compare_run(golden_ranks[0], run, options, golden_ranks)
        if len(golden_dirs) != run.size:
            result.rows.insert(0, Row(None, 0, -1, MERGED, status=UNPAIRED, reason=(
                f"golden has {len(golden_dirs)} rank dirs ({', '.join(d.name for d in golden_dirs)}), the ATB run "
                f"{run.size}: ranks paired in order, the others not compared")))
        return result
    golden_dump = golden if isinstance(golden, TorchDump) else open_torch_dump(golden, allow_symlinks=g_links)
    return compare_run(golden_dump, run, options)
