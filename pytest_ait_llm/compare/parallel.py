"""Step 2's executor: run :func:`compare_task` over every task, serially or on several cores; results in task order.

Forked processes by default: the compiled pass releases the GIL, but the Python around each pair holds it, so
processes beat threads (docs/performance.md). The pool is a standard ``ProcessPoolExecutor`` with a fork context:
its workers inherit the options (custom metrics included, which need not pickle) through the initializer; each
task and result is a small picklable dataclass. Workers take the largest pairs first, so that no big pair (an
LLM's logits) is left to one worker at the end.

Serial where a pool cannot help or cannot work: one worker or task, a dump under ``MIN_FORK_BYTES``, a platform
without a safe ``fork`` (only Linux forks here). ``AIT_LLM_EXECUTOR=processes|threads|serial`` forces one.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

from ..errors import AitLlmError
from .engine import TaskResult, compare_task
from .plan import CompareOptions, Task

EXECUTOR_ENV = "AIT_LLM_EXECUTOR"
EXECUTORS = ("processes", "threads", "serial")

#: Below this many bytes to read, a process pool costs more (fork, pickling) than it saves.
MIN_FORK_BYTES = 32 * 1024 * 1024


def choose_executor(workers: int, tasks: int, *, task_bytes: int | None = None, env: dict | None = None) -> str:
    """``"serial"``, ``"threads"`` or ``"processes"`` for ``tasks`` pairs (``task_bytes`` to read) on ``workers``."""
    env = os.environ if env is None else env
    forced = env.get(EXECUTOR_ENV, "").strip().lower()
    forced = forced if forced in EXECUTORS else ""  # an unknown value is ignored, never an error mid-run
    if workers <= 1 or tasks <= 1 or forced == "serial":
        return "serial"
    if forced == "threads":
        return "threads"
    can_fork = sys.platform.startswith("linux")
    if forced == "processes":
        return "processes" if can_fork else "serial"
    if not can_fork or (task_bytes is not None and task_bytes < MIN_FORK_BYTES):
        return "serial"
    return "processes"


def _size(task: Task) -> int:
    """Bytes a task reads through: its output files and its input files."""
    total = 0
    for path in (task.golden, task.my, *task.golden_inputs, *task.my_inputs):
        if path:
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
    return total


def run_tasks(tasks: Sequence[Task], options: CompareOptions) -> list[TaskResult]:
    """A :class:`TaskResult` per task, in task order; ``options.progress(done, total)`` after each."""
    total = len(tasks)
    workers = options.workers or os.cpu_count() or 1
    sizes = [_size(t) for t in tasks] if workers > 1 and total > 1 else [0] * total
    kind = choose_executor(workers, total, task_bytes=sum(sizes))
    order = sorted(range(total), key=lambda i: -sizes[i])
    results: list[TaskResult | None] = [None] * total
    done = 0

    def store(i: int, result: TaskResult) -> None:
        nonlocal done
        results[i] = result
        done += 1
        if options.progress:
            options.progress(done, total)

    if kind == "serial":
        for i, task in enumerate(tasks):
            store(i, compare_task(task, options))
        return results
    from concurrent import futures  # imported here: a serial comparison does not pay for it

    if kind == "threads":
        with futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for i, result in zip(order, pool.map(compare_task, [tasks[i] for i in order], [options] * total)):
                store(i, result)
        return results
    import multiprocessing

    with warnings.catch_warnings():
        # Python >= 3.12 warns about forking a multi-threaded process; the workers only read files and compare
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        pool = futures.ProcessPoolExecutor(max_workers=min(workers, total),
                                           mp_context=multiprocessing.get_context("fork"),
                                           initializer=_start_worker, initargs=(options,))
    try:
        pending = {pool.submit(_compare_in_worker, tasks[i]): i for i in order}
        for future in futures.as_completed(pending):
            try:
                store(pending[future], future.result())
            except futures.process.BrokenProcessPool:
                raise AitLlmError(f"a comparison worker process died (killed or out of memory?); rerun with "
                                  f"{EXECUTOR_ENV}=threads or fewer workers (-j)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


#: The options of the comparison this worker process serves; set once by its initializer, in the worker only.
_worker_options: CompareOptions | None = None


def _start_worker(options: CompareOptions) -> None:
    global _worker_options
    _worker_options = options
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # torch's OpenMP pool does not survive a fork; one thread per worker


def _compare_in_worker(task: Task) -> TaskResult:
    return compare_task(task, _worker_options)
