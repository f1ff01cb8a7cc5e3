"""Run the engine's per-pair comparisons on several cores, results in task order whatever finishes first.

Why forked processes and not threads: the fused metrics pass is a loop of ~30 numpy calls per 32 Ki-element
chunk and holds the GIL between calls. Measured on the 2-core box (docs/performance.md), two threads were *slower*
than one (0.7x: the GIL changes hands on every call), while two forked processes were 1.5-1.8x faster. Forking
is cheap because the workers inherit the parent's imports (torch is already loaded to read ``.pth`` files).

Serial is used when forking cannot help or cannot work: one worker, a dump too small to repay the fork (under
``MIN_FORK_BYTES``), platforms without a safe ``fork`` (only Linux forks here), and custom metrics (user functions
loaded from a file cannot be pickled by reference). ``AIT_LLM_EXECUTOR=processes|threads|serial`` forces one
kind; the benchmark measures each.

Results are deterministic: every pair is computed by the same code on the same bytes in any worker, each task's
row comes back whole, and the caller sees the tasks completed in their original order.
"""
from __future__ import annotations

import copy
import os
import pickle
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from ..errors import AitLlmError

EXECUTOR_ENV = "AIT_LLM_EXECUTOR"
EXECUTORS = ("processes", "threads", "serial")

Progress = Callable[[int, int], None]


#: Below this many bytes to read, a process pool costs more (fork, pickling) than it saves.
MIN_FORK_BYTES = 32 * 1024 * 1024


def choose_executor(workers: int, tasks: int, *, picklable: bool, task_bytes: int | None = None,
                    env: dict | None = None) -> str:
    """``"serial"``, ``"threads"`` or ``"processes"`` for ``tasks`` pairs (``task_bytes`` to read) on ``workers``."""
    env = os.environ if env is None else env
    forced = env.get(EXECUTOR_ENV, "").strip().lower()
    forced = forced if forced in EXECUTORS else ""  # an unknown value is ignored, never an error mid-run
    if workers <= 1 or tasks <= 1 or forced == "serial":
        return "serial"
    if forced == "threads":
        return "threads"
    can_fork = sys.platform.startswith("linux") and picklable
    if forced == "processes":
        return "processes" if can_fork else "serial"
    if not can_fork or (task_bytes is not None and task_bytes < MIN_FORK_BYTES):
        return "serial"
    return "processes"


def _task_sizes(tasks: Sequence[Any]) -> list[int]:
    """Bytes each task will read through (its output files), from the file sizes."""
    sizes = []
    for task in tasks:
        paths = [getattr(task, "golden", None), getattr(task, "my", None)]  # inputs are mostly reused, not read
        total = 0
        for path in paths:
            if path:
                try:
                    total += os.path.getsize(path)
                except OSError:
                    pass
        sizes.append(total)
    return sizes


def run_in_order(engine: Any, tasks: Sequence[Any], workers: int, progress: Progress | None = None) -> str:
    """Run ``engine._compare_one`` on every task, in parallel, storing each task's row; returns the executor used.

    With processes, each worker gets a copy of the engine stripped to what comparing one pair needs (tolerance,
    limits, custom metrics) and sends back the task's completed ``Row``, which replaces ``task.row``.
    """
    total = len(tasks)
    lean = _lean_copy(engine) if workers > 1 and total > 1 else None
    picklable = lean is not None and _pickles(tasks[0])
    sizes = _task_sizes(tasks) if workers > 1 and total > 1 else [0] * total
    kind = choose_executor(workers, total, picklable=picklable, task_bytes=sum(sizes) if picklable else None)
    # Workers take the largest pairs first, so that no big pair is left to one worker at the end (an LLM's
    # logits are often the largest tensor and come last); rows are still stored in task order.
    largest_first = sorted(range(total), key=lambda i: -sizes[i])
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    if kind == "serial":
        for task in tasks:
            engine._compare_one(task)
            tick()
    elif kind == "threads":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(engine._compare_one, [tasks[i] for i in largest_first]):
                tick()
    else:
        for i, row in zip(largest_first, _fork_map(lean, [tasks[i] for i in largest_first], workers)):
            tasks[i].row = row
            tick()
    return kind


def _pickles(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any pickling failure means: do not send it to a process
        return False
    return True


def _lean_copy(engine: Any) -> Any | None:
    """A picklable copy of ``engine`` without the dumps, the mapping table and the progress callback; None when
    what remains (custom metrics, an exotic tolerance) does not pickle."""
    lean = copy.copy(engine)
    for name in ("golden", "my", "table", "progress", "_listed"):
        if hasattr(lean, name):
            setattr(lean, name, None)
    return lean if _pickles(lean) else None


def _fork_map(lean: Any, tasks: Sequence[Any], workers: int) -> Iterable[Any]:
    """Rows of ``tasks`` computed in forked worker processes, yielded in task order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        # Python >= 3.12 warns that forking a multi-threaded process may deadlock the child; the child only reads
        # files and runs numpy, never a lock another parent thread could hold (torch is made single-threaded).
        warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks.*")
        # the engine reaches the workers once, through the fork; each task travels without its op pair (the op
        # trees, ~20 KB a task), which only the parent's judging needs
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                   initargs=(lean,))
        try:
            futures = [pool.submit(_compare_in_worker, _without_pair(task)) for task in tasks]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    try:
        for future in futures:
            try:
                yield future.result()
            except BrokenProcessPool:
                raise AitLlmError(f"a comparison worker process died (killed or out of memory?); rerun with "
                                  f"{EXECUTOR_ENV}=threads or fewer workers (-j)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER_ENGINE: Any = None


def _init_worker(lean: Any) -> None:
    """Keep the engine for this worker's tasks, and the worker on one thread: torch's OpenMP pool does not survive
    a fork, and one thread per process is what the parallelism across pairs assumes."""
    global _WORKER_ENGINE
    _WORKER_ENGINE = lean
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _without_pair(task: Any) -> Any:
    if getattr(task, "pair", None) is None:
        return task
    slim = copy.copy(task)
    slim.pair = None
    return slim


def _compare_in_worker(task: Any) -> Any:
    _WORKER_ENGINE._compare_one(task)
    return task.row
