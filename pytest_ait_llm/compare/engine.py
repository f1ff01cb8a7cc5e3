"""A comparison in three steps: plan (compare/plan.py), compare every task (here), judge (compare/judge.py).

:func:`compare_task` is the worker: it reads one task's files and returns a :class:`TaskResult`, touching
nothing else, so it runs the same in this process, a thread or a forked process (compare/parallel.py). Whatever
goes wrong in one pair (an unreadable file, a tensor numpy cannot hold, a bug) becomes that pair's reason,
naming the file; it never costs the other rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import AitLlmError
from ..formats.atb_layout import AtbDump, open_atb_dump
from ..formats.torch_layout import TorchDump, open_torch_dump
from .judge import build_result
from .metrics import PairMetrics, compare_tensors, similarity
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
        at = task.my
        my = options.my.load(task.my)
        at = f"{task.golden} vs {task.my}"
        result.metrics = compare_tensors(golden, my, custom_metrics=options.custom_metrics)
    except Exception as exc:  # noqa: BLE001 - one pair's failure is that row's reason, whatever it is
        result.metrics, result.reason = None, _why(exc, at)
        return result
    finally:
        golden = my = None  # noqa: F841 - drop the memory maps before the next pair
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
    """Compare a torch (golden) dump with an ATB (my) dump. No file is written (see ``pytest_ait_llm.api``).

    ``golden``/``my`` are dump handles or paths (a dump root, a rank/pid dir, or a token dir). Either pass
    ``options`` or the keyword arguments of :meth:`CompareOptions.from_kwargs`.
    """
    if options is None:
        options = CompareOptions.from_kwargs(**kwargs)
    elif kwargs:
        raise TypeError("compare_dumps: pass options= or keyword arguments, not both")
    golden_dump = golden if isinstance(golden, TorchDump) else \
        open_torch_dump(golden, allow_symlinks=options.golden.allow_symlinks)
    my_dump = my if isinstance(my, AtbDump) else open_atb_dump(my, allow_symlinks=options.my.allow_symlinks)
    options = _with_dump_symlink_policy(options, golden_dump, my_dump)
    plan = make_plan(golden_dump, my_dump, options)
    from .parallel import run_tasks  # serial, threads or forked processes

    results = run_tasks(plan.tasks, options)
    return build_result(plan, results, options, golden_root=str(golden_dump.root), my_root=str(my_dump.root))
