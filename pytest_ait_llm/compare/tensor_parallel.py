"""Compare a tensor-parallel ATB run (N rank dirs) with a single-device golden: the ranks as one comparison.

The same three steps as any comparison (plan, compare, judge), with a plan of its own:
- plan (:class:`TensorParallelPlanner`): rank 0's topology is paired with the golden tree, each candidate
  confirmed by the op's distribution over the ranks (mapping/ranks.py: replicated, split along one dim, or unknown
  with the reason). A split op becomes one task whose "my" side is the ranks' files (``Task.shards``): one row,
  ``rank`` = ``merged``, the metrics of the concatenation in rank order (compare/merged.py) and each shard's share
  of the error. A replicated op becomes one task per rank.
- compare: the usual worker (compare/engine.py), in parallel.
- judge: the usual verdicts (added error over the inputs included), then :meth:`TensorParallelPlan.judge_ranks`:
  every shard's own cosine and distance against the same bounds (a 5 % error in one shard of eight is not
  averaged away; the breach names the rank), and a ``consistency`` row naming the ranks whose copies of a
  replicated tensor differ (an all-reduce or broadcast bug, a finding even where each is close to the golden).

With ``ranks`` given (the ``ait_rank`` parametrization) only those ranks are compared: their replicated ops, and
their shards against their slices of the golden. A golden with ranks of its own (a TP torch run) is compared rank
to rank (``golden_ranks``): each rank's file against the golden rank's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..formats.atb_layout import op_files
from ..formats.ranks import RankedRun, content_evidence, token_problems
from ..formats.tensor import RawTensor
from ..formats.torch_layout import TorchDump
from ..mapping.pairing import OpPair, Unpaired, completion_order, pair_ops
from ..mapping.ranks import (REPLICATED, SPLIT, Distribution, align_shared_targets, decide, decide_rank_to_rank,
                             is_all_reduced)
from ..mapping.rules import mapping_table
from .merged import share_text, worst_shard
from .metrics import compare_tensors
from .plan import (CompareOptions, Plan, RankGraph, ReadOptions, Task, _Files as _Listings, _pick,
                   output_checked_by_a_part)
from .result import COMPARED, UNPAIRED, CompareResult, Row
from .tolerance import Breach, judge

MERGED, CONSISTENCY = "merged", "consistency"

#: Largest relative distance between two ranks' copies of a replicated tensor that is still agreement: one rounding
#: unit of the dtype (an all-reduce gives every rank the same bits; a broadcast bug gives more than a unit).
CONSISTENCY_LIMIT = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}


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


@dataclass
class TensorParallelPlan(Plan):
    """A plan whose rows are ordered across ranks and judged across them (see the module docstring)."""

    run: RankedRun | None = None
    #: (token, op, module, stem) -> the task indices of that replicated op output on every rank: checked for
    #: agreement across ranks
    replicated_groups: dict[tuple, list[int]] = field(default_factory=dict)

    def judge_ranks(self, task_rows: list[Row], results: Sequence, options: CompareOptions) -> list[Row]:
        for row, res in zip(task_rows, results):
            if getattr(res, "shares", None) and row.status == COMPARED and row.metrics is not None:
                _judge_shards(row, res.shares, self.run, options)
        out = []
        for group in self.replicated_groups.values():
            if len(group) < 2:
                continue
            finding = _consistency([task_rows[i] for i in group], [self.tasks[i] for i in group], self.run, options)
            if finding is not None:
                out.append(finding)
        return out


class TensorParallelPlanner:
    """Plans one TP run against one single-device golden (or, with ``golden_ranks``, against a TP golden)."""

    def __init__(self, golden: TorchDump, run: RankedRun, options: CompareOptions,
                 golden_ranks: Sequence[TorchDump] = ()):
        self.golden, self.run, self.options = golden, run, options
        self.golden_ranks = list(golden_ranks)
        self.table = mapping_table(options.mapping_dir)
        self.tolerance = options.tolerance
        wanted = {r for r in options.ranks or () if r != MERGED} or None
        self.only = None if wanted is None else [i for i, r in enumerate(run.ranks)
                                                 if {r.path.name, str(r.device_id), str(i)} & wanted]
        self.reader, self.golden_reader = _Files(options.my), _Files(options.golden)
        self.listings = [_Listings(g) for g in (self.golden_ranks or [golden])]
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

    # -- distribution
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
            evidence = content_evidence(mine, allow_symlinks=self.reader.allow_symlinks, load=self.reader.load)
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

    # -- plan
    def plan(self) -> TensorParallelPlan:
        plan = TensorParallelPlan([], [], [], [], [], set(), ranks_as_one=True, run=self.run)
        plan.rows.extend(Row(None, 0, -1, _problem_rank(p), status=UNPAIRED, reason=p) for p in self.run.problems)
        topology = self.run.ranks[0].topology()
        order = completion_order(topology)
        g_tokens = set(self.golden.tokens)
        m_tokens = set().union(*(r.token_dirs for r in self.run.ranks))
        wanted = set(self.options.tokens) if self.options.tokens is not None else g_tokens | m_tokens
        for t in sorted((g_tokens ^ m_tokens) & wanted):
            side = "torch" if t in g_tokens else "ATB"
            plan.rows.append(Row(t, 0, -1, MERGED, status=UNPAIRED, reason=f"token {t} dumped only on the {side} side"))
        for t, line in token_problems(self.run, wanted & g_tokens):
            plan.rows.append(Row(t, 0, -1, MERGED, status=UNPAIRED, reason=line))
        common = sorted(g_tokens & m_tokens & wanted)
        if not common:
            return plan
        everywhere = [t for t in common if all(t in r.token_dirs for r in self.run.ranks)]
        probe = everywhere[0] if everywhere else common[0]

        def compatible(pair: OpPair):
            dist = self.distribution(pair, probe)
            return None if dist is None else dist.kind in (REPLICATED, SPLIT)
        compatible.exact = compatible
        pairing = align_shared_targets(pair_ops(topology, self.golden.tree, self.table, compatible), self.table,
                                       compatible, order)
        plan.unpaired = [self._explained(u) for u in pairing.unpaired]
        for u in plan.unpaired:
            op = u.op
            plan.rows.append(Row(None, 0, order.get(id(op), -1) if u.side == "atb" else -1, MERGED,
                                 atb_op=u.name if u.side == "atb" else "",
                                 atb_op_name=getattr(op, "op_name", "") if u.side == "atb" else "",
                                 my_op_type=u.op_type if u.side == "atb" else "",
                                 torch_module=u.name if u.side == "torch" else "",
                                 golden_op_type=u.op_type if u.side == "torch" else "", status=UNPAIRED,
                                 reason=u.reason))
        names = {r.path.name for r in self.run.ranks} | {MERGED}
        checked = output_checked_by_a_part(pairing.pairs)
        plan.checked.update((name, rel) for name in names for rel in checked)
        graph = RankGraph(MERGED, topology, {})
        for token in common:
            groups: dict[int, list[tuple[OpPair, Task]]] = {}  # by the rank whose input files a task uses
            for pair in pairing.pairs:
                for rank, task, group in self._pair_tasks(pair, token, order[id(pair.atb)]):
                    groups.setdefault(rank, []).append((pair, task, group))
            for rank in sorted(groups):  # a rank's tasks together
                for pair, task, group in groups[rank]:
                    task = replace(task, index=len(plan.tasks))
                    graph.pair_of_task[task.index] = pair
                    plan.tasks.append(task)
                    if group is not None and self.only is None:
                        plan.replicated_groups.setdefault(group, []).append(task.index)
        plan.graphs.append(graph)
        plan.tokens = common
        return plan

    def _explained(self, u: Unpaired) -> Unpaired:
        """The pairing's reason, with what the rank evidence said about that op's candidates."""
        if u.side != "atb":
            return u
        reasons = {d.reason for (op_id, *_), d in self.decisions.items() if op_id == id(u.op) and d.kind not in
                   (REPLICATED, SPLIT)}
        if reasons:
            u.reason = f"{u.reason}; tensor parallel: {'; '.join(sorted(reasons))}"
        return u

    def _row(self, pair: OpPair, token: int, order: int, rank: str, golden_path, my_path: str) -> Row:
        return Row(token, 0, order, rank, atb_op=pair.atb.rel_dir, atb_op_name=pair.atb.op_name,
                   my_op_type=pair.atb.op_type, torch_module=pair.module.name, golden_op_type=pair.module.type,
                   golden_path=str(golden_path or ""), my_path=my_path, rule=pair.rule, note=pair.note)

    def _inputs(self, pair: OpPair, token: int, rank: int) -> dict:
        golden = self.golden_ranks[rank] if self.golden_ranks else self.golden
        listings = self.listings[rank] if self.golden_ranks else self.listings[0]
        token_dir = self.run.ranks[rank].token_dirs.get(token)
        mine = listings.atb(token_dir, pair.atb).inputs if token_dir is not None else []
        golden_inputs = listings.torch(token, pair.module.name).inputs if token in golden.token_dirs else []
        return dict(golden_inputs=tuple(golden_inputs), my_inputs=tuple(mine), input_names=tuple(pair.atb.in_tensors))

    def _pair_tasks(self, pair: OpPair, token: int, order: int) -> list[tuple[int, Task, tuple | None]]:
        """(rank whose inputs it uses, task, replicated group key or None) for one pair and token."""
        g_path = self._golden_file(token, pair.module.name, pair.torch_stem)
        mine = self._rank_files(token, pair.files_op, pair.atb_stem)
        dist = self.distribution(pair, token) or self.distribution(pair, min(self.golden.tokens))
        names = [r.path.name for r in self.run.ranks]
        indices = self.only if self.only is not None else list(range(len(mine)))
        first = indices[0] if indices else 0
        missing = [i for i in indices if mine[i] is None]
        if self.tolerance.is_skipped(pair.atb.op_type, pair.atb.op_name, pair.atb.rel_dir, pair.module.name,
                                     pair.module.type):
            row = self._row(pair, token, order, MERGED, g_path, "")
            reason = "skipped by the tolerance's skip= list"
            return [(first, Task(0, row, g_path, None, skip=reason, skipped_by_tolerance=True), None)]
        if (g_path is None and not self.golden_ranks) or missing or dist is None:
            row = self._row(pair, token, order, names[missing[0]] if missing else MERGED, g_path,
                            ";".join(str(m or "") for m in mine))
            if missing:
                reason = "; ".join(f"rank {i} ({self.run.ranks[i].path / str(token)}): no output tensor for this op "
                                   f"(a rank cut short?)" for i in missing)
            elif g_path is None:
                reason = "no output tensor dumped for this torch module"
            else:
                reason = "how this op is distributed over the ranks is unknown"
            return [(first, Task(0, row, g_path, None, skip=reason), None)]
        if dist.kind == SPLIT and not self.golden_ranks:
            if self.only is None:
                row = self._row(pair, token, order, MERGED, g_path, ";".join(map(str, mine)))
                row.note = f"split along dim {dist.dim} over {len(mine)} ranks"
                task = Task(0, row, g_path, mine[0], shards=tuple(mine), split=(dist.dim, 0),
                            **self._inputs(pair, token, 0))
                return [(0, task, None)]
            out = []
            for i in indices:
                row = self._row(pair, token, order, names[i], g_path, str(mine[i]))
                row.note = f"rank {i}'s shard: its slice of dim {dist.dim}"
                task = Task(0, row, g_path, mine[i], shards=(mine[i],), split=(dist.dim, sum(dist.sizes[:i])),
                            **self._inputs(pair, token, i))
                out.append((i, task, None))
            return out
        out = []
        for i in indices:
            golden_path = self._golden_file(token, pair.module.name, pair.torch_stem, rank=i) \
                if self.golden_ranks else g_path
            row = self._row(pair, token, order, names[i], golden_path, str(mine[i]))
            if self.golden_ranks:
                row.note = f"rank to rank ({dist.kind})"
            skip = "" if golden_path is not None else f"golden rank {i}: no output tensor for this module"
            task = Task(0, row, golden_path, mine[i], skip=skip, **self._inputs(pair, token, i))
            group = (token, id(pair.files_op), id(pair.module), pair.atb_stem) if dist.kind == REPLICATED else None
            out.append((i, task, group))
        return out


def _judge_shards(row: Row, shares: list, run: RankedRun, options: CompareOptions) -> None:
    """Each shard's own cosine and distance against the row's bounds (on the error it adds, as the row), and the
    rank that carries the most of the error named in the row's reason."""
    row.note = f"{row.note}; error shares: {share_text(shares)}" if row.note else f"error shares: {share_text(shares)}"
    added = []
    for r, share in enumerate(shares):
        values = {"cosine_similarity": share.cosine_similarity,
                  "relative_euclidean_distance": share.relative_euclidean_distance}
        bounds = {k: v for k, v in row.bounds.items() if k in values}
        for b in judge(values, bounds, input_metrics=row.input_metrics, mode=options.tolerance.mode):
            added.append(Breach(b.metric, b.value, b.limit, b.kind, b.added, where=f"in rank {r}'s shard"))
    if not added and not row.breaches:
        return
    row.breaches = list(row.breaches) + added
    row.passed = False
    worst = worst_shard(shares)
    if worst is not None:
        text = (f"rank {worst}'s shard ({run.ranks[worst].path.name}) carries {shares[worst].error_share:.0%} of "
                f"the error")
        row.reason = f"{row.reason}; {text}" if row.reason else text


def _consistency(rows: list[Row], tasks: list[Task], run: RankedRun, options: CompareOptions) -> Row | None:
    """A row naming the ranks whose copy of a replicated tensor differs from the first rank's; None when all agree.
    Copies with equal sums against the golden are equal, so only those that differ are read again."""
    seen = [(row, task) for row, task in zip(rows, tasks) if row.metrics is not None and row.metrics.compared]
    if len(seen) < 2:
        return None

    def fingerprint(m):
        return (tuple(m.values.values()), m.my.max, m.my.min, m.my.mean, m.my.nan_count)
    base_row, base_task = seen[0]
    names = [r.path.name for r in run.ranks]
    rank_of = {name: i for i, name in enumerate(names)}
    disagree, worst = [], None
    for row, task in seen[1:]:
        if fingerprint(row.metrics) == fingerprint(base_row.metrics):
            continue
        try:
            pm = compare_tensors(options.my.load(base_task.my), options.my.load(task.my))
        except Exception:  # noqa: BLE001 - an unreadable copy is already its own row's reason
            continue
        red = pm.values["relative_euclidean_distance"]
        limit = CONSISTENCY_LIMIT.get(pm.my.dtype if pm.my else "", 0.0)
        if pm.fail_reason or not red <= limit:
            disagree.append((rank_of.get(row.rank, -1), red, row.rank))
            if worst is None or not red <= worst[1].values["relative_euclidean_distance"]:
                worst = (task, pm)
    if not disagree:
        return None
    task, pm = worst
    base = rank_of.get(base_row.rank, 0)
    row = replace(base_row, rank=CONSISTENCY, golden_path=str(base_task.my), my_path=str(task.my), metrics=pm,
                  input_metrics=None, effective={}, breaches=[], note="")
    limit = CONSISTENCY_LIMIT.get(pm.my.dtype if pm.my else "", 0.0)
    row.bounds = {"relative_euclidean_distance": limit}
    row.breaches = [Breach("relative_euclidean_distance", red, limit, "max",
                           where=f"rank {r} ({name}) vs rank {base} ({base_row.rank})") for r, red, name in disagree]
    row.passed = False
    row.reason = ("replicated tensor differs between ranks: " +
                  ", ".join(f"rank {r} vs rank {base} (relative distance {red:.3g})" for r, red, _ in disagree))
    return row


def _problem_rank(line: str) -> str:
    return Path(line.split(":", 1)[0].removeprefix("rank dir ")).name if line.startswith("rank dir ") else MERGED


def _states_ranks(dump) -> bool:
    """The first rank of ``dump`` states a parallel group in its topology (an unreadable one says nothing)."""
    from ..errors import AitLlmError
    from ..formats.ranks import rank_params

    try:
        return any(size > 1 for _, size in rank_params(dump.ranks[0].topology()))
    except AitLlmError:
        return True  # let the run's own discovery report which ranks cannot be read


def compare_run(golden: TorchDump, run: RankedRun, options: CompareOptions | None = None,
                golden_ranks: Sequence[TorchDump] = ()) -> CompareResult:
    """Compare the TP ``run`` with the single-device ``golden`` (or, with ``golden_ranks``, rank to rank): plan
    here, compare with the usual workers, judge with the usual judge (which calls the plan's judge_ranks)."""
    from .judge import build_result
    from .parallel import run_tasks

    options = options or CompareOptions()
    plan = TensorParallelPlanner(golden, run, options, golden_ranks).plan()
    results = run_tasks(plan.tasks, options)
    return build_result(plan, results, options, golden_root=str(golden.root),
                        my_root=str(run.dump.root))


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
    if isinstance(my, AtbDump) and len(dump.ranks) > 1:
        run = open_run(dump)  # a handle is taken as it is
    else:  # a path, or a handle opened from one rank's dir: every rank of its run, as msit accepts
        if len(open_atb_dump(dump.root, allow_symlinks=links).ranks) < 2 or not _states_ranks(dump):
            return None
        run = open_run(dump.root, allow_symlinks=links)
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
