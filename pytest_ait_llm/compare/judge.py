"""Step 3 of a comparison: the judge. Rows are built once, from the plan and the workers' results, and judged.

Each compared row is judged on the error its op *adds* over its inputs (tolerance.py); then, across rows: error
arising inside ops with no torch counterpart is charged to the first paired op after them, graph ops whose parts
all agree are ``mapping_suspect`` rather than divergent, and the first breach in order is the first divergence.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from ..formats.atb_topology import AtbOp
from ..mapping.pairing import OpPair, is_weight
from .plan import CompareOptions, Plan
from .result import COMPARED, SKIPPED, SUSPECT, CompareResult, Row
from .tolerance import Breach, default_bounds, effective_metrics, judge

def build_result(plan: Plan, results: Sequence, options: CompareOptions, *, golden_root: str = "",
                 my_root: str = "") -> CompareResult:
    """The CompareResult of a plan whose tasks were compared into ``results`` (one per task, in task order)."""
    tolerance = options.tolerance
    task_rows: list[Row] = []
    for task, res in zip(plan.tasks, results):
        row = replace(task.row, breaches=[], effective={}, bounds={})  # the plan's row stays as it was
        if task.skipped_by_tolerance:
            row.status, row.reason = SKIPPED, task.skip
        elif task.skip:
            row.reason, row.passed = task.skip, False
        else:
            row.metrics, row.reason = res.metrics, res.reason
            if res.exact:
                row.extra = dict(res.exact)
            if res.metrics is None:
                row.passed = False
        task_rows.append(row)
    source = _container_sources(plan)
    for task, res, row in zip(plan.tasks, results, task_rows):
        if row.status == COMPARED and row.metrics is not None:
            inputs_of = results[source[task.index]] if task.index in source else res
            row.input_metrics = _worst(inputs_of.input_errors)
            _verdict(row, tolerance)
    for graph in plan.graphs:
        _judge_unpaired_regions(graph.topology, graph.pair_of_task, task_rows)
    rows = plan.rows + task_rows + plan.judge_ranks(task_rows, results, options)
    rows.sort(key=_order_key if plan.ranks_as_one else _row_key)
    _mark_divergence(rows, plan.checked)
    return CompareResult(rows, plan.unpaired, tolerance, tokens=plan.tokens, golden_root=golden_root,
                         my_root=my_root)


def _container_sources(plan: Plan) -> dict[int, int]:
    """Task index of a container's pair (``OpPair.same_as``) -> that of the pair it is the same quantity as, for
    the same token and output: the container's row takes that row's input error (its own inputs are not the op's).
    None found (that task skipped): no input error, the row is judged on its output alone."""
    out: dict[int, int] = {}
    for graph in plan.graphs:
        task_of = {(id(pair), plan.tasks[i].row.token_id, plan.tasks[i].row.data_id): i
                   for i, pair in graph.pair_of_task.items() if pair.same_as is None}
        for i, pair in graph.pair_of_task.items():
            row = plan.tasks[i].row
            if pair.same_as is not None and (id(pair.same_as), row.token_id, row.data_id) in task_of:
                out[i] = task_of[(id(pair.same_as), row.token_id, row.data_id)]
    return out


def _worst(errors: Sequence[dict[str, float]]) -> dict[str, float] | None:
    """The worst error over an op's inputs: lowest cosine, highest relative euclidean distance."""
    if not errors:
        return None
    return {"cosine_similarity": min(e["cosine_similarity"] for e in errors),
            "relative_euclidean_distance": max(e["relative_euclidean_distance"] for e in errors)}


def _coarser(*stats) -> str:
    """The less precise dtype of a pair (the one whose default bounds are loosest): it sets the default bounds."""
    names = [s.dtype for s in stats if s is not None]
    if not names:
        return ""
    return max(names, key=lambda d: default_bounds(d).get("relative_euclidean_distance", 0.0))


def _verdict(row: Row, tolerance) -> None:
    dtype = _coarser(row.metrics.golden, row.metrics.my)
    row.bounds = tolerance.bounds_for(row.my_op_type, row.atb_op_name, dtype, row.atb_op, row.torch_module,
                                      row.golden_op_type)
    row.effective = effective_metrics(row.metrics.values, row.input_metrics, tolerance.mode)
    if row.metrics.fail_reason:
        row.passed = False
        return
    row.breaches = judge(row.metrics.values, row.bounds, input_metrics=row.input_metrics, mode=tolerance.mode)
    row.passed = not row.breaches


def _judge_unpaired_regions(topology, pair_of_task: dict[int, OpPair], task_rows: list[Row]) -> None:
    """Catch error that arises inside ops with no torch counterpart (Rope, SelfAttention, residual adds...).

    An op's verdict rests on the error it adds over its inputs, so a wrong RopeOperation would otherwise pass
    unseen: the o_proj after it receives wrong inputs and adds nothing. Here, for each compared op whose inputs
    come (through the dataflow names of the topology) from unpaired ops, the error already in its inputs is set
    against the error of the nearest *paired* ops upstream (their sum); when the jump breaks the op's bound, the
    row breaches and the breach names the unpaired ops where the error arose.
    """
    paired: dict[int, list[Row]] = {}
    for index, pair in pair_of_task.items():
        paired.setdefault(id(pair.atb), []).append(task_rows[index])
        if pair.output_op is not None:
            paired.setdefault(id(pair.output_op), []).append(task_rows[index])
    producer: dict[str, AtbOp] = {}
    for op in topology.walk():  # leaves produce tensors; a paired graph op stands for the leaf that ends it
        for name in op.out_tensors:
            if op.is_leaf and name not in producer:
                producer[name] = op
            elif not op.is_leaf and id(op) in paired:
                producer[name] = op
    by_token: dict[tuple[int, int], Row] = {}
    for op_id, op_rows in paired.items():
        for row in op_rows:
            by_token.setdefault((op_id, row.token_id), row)
    red = "relative_euclidean_distance"
    for index, pair in pair_of_task.items():
        row = task_rows[index]
        if not row.input_metrics or red not in row.input_metrics or red not in row.bounds:
            continue
        unpaired_ops, frontier = _upstream(pair.atb, producer, paired)
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
    # one op's rows (a container's and its child's) tie on order: innermost module first, so it is named first
    return (row.token_id if row.token_id is not None else -1, row.rank, row.order, row.data_id,
            -row.torch_module.count("."), row.torch_module)


def _order_key(row: Row):
    """Ranks compared as one: execution order first, then the merged row, the ranks', the consistency row."""
    return (row.token_id if row.token_id is not None else -1, row.order, row.data_id,
            {"merged": 0, "consistency": 2}.get(row.rank, 1), row.rank, row.torch_module)


def _mark_divergence(rows: list[Row], checked: set[tuple[str, str]]) -> None:
    """Mark the root cause and the propagated breaches; demote graph-op breaches that are mapping questions.

    ``checked`` holds (rank, rel_dir) of graph ops whose output is a paired part's output (see
    plan.output_checked_by_a_part). When such a graph op breaches while every one of its paired parts passes,
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
