"""A comparison in three steps: plan (compare/plan.py), compare every task (here), judge (compare/judge.py).

:func:`compare_task` is the worker: it reads one task's files and returns a :class:`TaskResult`, touching
nothing else, so it runs the same in this process, a thread or a forked process (compare/parallel.py). Whatever
goes wrong in one pair (an unreadable file, a tensor numpy cannot hold, a bug) becomes that pair's reason,
naming the file; it never costs the other rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import AitLlmError
from ..formats.atb_layout import AtbDump
from ..formats.detect import is_atb_dump, open_dump
from . import sides
from .exact import exact_difference
from .judge import build_result
from .merged import compare_split
from .metrics import PairMetrics, compare_tensors, similarity
from .output_check import check_outputs, output_rows
from .plan import CompareOptions, Progress, Task, input_pairs, make_plan
from .result import CompareResult

__all__ = ["CompareOptions", "TaskResult", "compare_task", "compare_dumps", "Progress"]


@dataclass
class TaskResult:
    """What comparing one task found; rows are built from these at the end (judge.py)."""

    index: int
    metrics: PairMetrics | None = None
    reason: str = ""
    input_errors: list[dict[str, float]] = field(default_factory=list)  # per readable input pair
    exact: dict[str, float] | None = None  # integer tensors: how many elements differ (compare/exact.py)
    shares: list = field(default_factory=list)  # a split op's per-rank ShardShare (compare/merged.py)


def _why(exc: BaseException, path) -> str:
    """One line naming the file: our readers' errors already name it; anything else is prefixed with it."""
    if isinstance(exc, AitLlmError):
        return str(exc)
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, OSError):
        return f"{path}: cannot read ({exc.strerror or text})"
    return f"{path}: cannot be compared ({type(exc).__name__}: {text})"


def compare_task(task: Task, options: CompareOptions) -> TaskResult:
    """Compare one task's output pair and measure its inputs' error. Never raises for a bad file or tensor."""
    result = TaskResult(task.index)
    if task.skip:
        return result
    golden = my = None
    try:
        at = task.golden
        golden = options.golden.load(task.golden)
        if task.shards:  # the ranks' files of a split op, fed to the pass in rank order
            at = ";".join(map(str, task.shards))
            result.metrics, result.shares = compare_split(golden, [options.my.load(f) for f in task.shards],
                                                          *task.split)
            return _with_inputs(result, task, options)
        at = task.my
        my = options.my.load(task.my)
        at = f"{task.golden} vs {task.my}"
        result.metrics = compare_tensors(golden, my, custom_metrics=options.custom_metrics)
        result.exact = exact_difference(golden, my)
    except Exception as exc:  # noqa: BLE001 - one pair's failure is that row's reason, whatever it is
        result.metrics, result.reason = None, _why(exc, at)
        return result
    finally:
        golden = my = None  # noqa: F841 - drop the memory maps before the next pair
    return _with_inputs(result, task, options)


def _with_inputs(result: TaskResult, task: Task, options: CompareOptions) -> TaskResult:
    if result.metrics.fail_reason:
        result.reason = result.metrics.fail_reason
    try:
        result.input_errors = [e for _, g, _, m in input_pairs(task, options) if (e := _similarity(g, m))]
    except Exception:  # noqa: BLE001 - input error only refines a verdict: unknown is an honest answer
        result.input_errors = []
    return result


def _similarity(golden, my) -> dict[str, float] | None:
    try:
        return similarity(golden, my)
    except Exception:  # noqa: BLE001
        return None


def _with_dump_symlink_policy(options: CompareOptions, golden, my) -> CompareOptions:
    """A dump handle opened with its own symlink policy keeps it where the options leave it to the default."""
    sides = {}
    for name, dump in (("golden", golden), ("my", my)):
        side = getattr(options, name)
        own = getattr(dump, "allow_symlinks", None)
        if side.allow_symlinks is None and own is not None:
            sides[name] = replace(side, allow_symlinks=own)
    return replace(options, **sides) if sides else options


def compare_dumps(golden, my, options: CompareOptions | None = None, **kwargs) -> CompareResult:
    """Compare a torch (golden) dump with an ATB (my) dump, or two dumps of one kind (A as golden, B as my).
    No file is written (see ``pytest_ait_llm.api``).

    ``golden``/``my`` are dump handles or paths (a dump root, a rank/pid dir, or a token dir). Either pass
    ``options`` or the keyword arguments of :meth:`CompareOptions.from_kwargs`.
    """
    if options is None:
        options = CompareOptions.from_kwargs(**kwargs)
    elif kwargs:
        raise TypeError("compare_dumps: pass options= or keyword arguments, not both")
    my_dump = open_dump(my, allow_symlinks=options.my.allow_symlinks)
    torch_vs_atb = isinstance(my_dump, AtbDump) and not is_atb_dump(golden)  # the original question
    if torch_vs_atb:
        from .tensor_parallel import compare_tensor_parallel  # a TP run's ranks are compared as one (or rank to rank)

        tp = compare_tensor_parallel(golden, my, options)
        if tp is not None:
            return tp
    golden_dump = open_dump(golden, allow_symlinks=options.golden.allow_symlinks)
    options = _with_dump_symlink_policy(options, golden_dump, my_dump)
    by_sides = not torch_vs_atb  # ATB vs ATB, torch vs torch, ATB vs torch: sides.py
    same_kind = isinstance(golden_dump, AtbDump) == isinstance(my_dump, AtbDump)
    golden_side, my_side = (sides.sides(golden_dump, my_dump, options.tokens, options.ranks) if by_sides
                            else (golden_dump, my_dump))
    plan = make_plan(golden_side, my_side, options, same_kind=by_sides)
    if same_kind and options.mapping_dir:
        plan.notes.append(f"op mapping file {options.mapping_dir} ignored: two dumps of one kind pair by identity")
    from .parallel import run_tasks  # serial, threads or forked processes

    results = run_tasks(plan.tasks, options)
    result = build_result(plan, results, options, golden_root=str(golden_dump.root), my_root=str(my_dump.root))
    result.notes = list(plan.notes)
    if by_sides:
        result.golden_label, result.my_label = "A", "B"
    tolerance = options.tolerance  # the output check: logits and greedy tokens, judged beside the ops
    result.output = check_outputs(golden_dump, my_dump, result.tokens, tolerance.output_bounds(),
                                  tolerance.output.get("logits"))
    result.rows[:0] = output_rows(result.output)  # first in the report
    return result
