"""Run the engine's per-pair comparisons on several cores, results in task order whatever finishes first.

Forked processes by default. The compiled pass (compare/_kernel.c) releases the GIL, but the Python around each
pair (opening files, matching inputs, building the row) holds it: on the 2-core box two forked workers were
1.4-1.7x faster than serial and 14-36 % faster than two threads (docs/performance.md). The workers are plain
``os.fork`` children that inherit the engine and the tasks (nothing is pickled on the way in, custom metrics
included), take the next task index from a shared pipe and send rows back through pipes of their own; this
starts in a few ms where a ``ProcessPoolExecutor`` took ~25 ms and a round trip per task.

Serial is used when forking cannot help or cannot work: one worker, a dump too small to repay the fork (under
``MIN_FORK_BYTES``), and platforms without a safe ``fork`` (only Linux forks here).
``AIT_LLM_EXECUTOR=processes|threads|serial`` forces one kind; the benchmark measures each.

Results are deterministic: every pair is computed by the same code on the same bytes in any worker, each task's
row comes back whole, and the caller sees the tasks completed in their original order.
"""
from __future__ import annotations

import os
import pickle
import select
import sys
import threading
import warnings
from typing import Any, Callable, Sequence

from ..errors import AitLlmError

EXECUTOR_ENV = "AIT_LLM_EXECUTOR"
EXECUTORS = ("processes", "threads", "serial")

Progress = Callable[[int, int], None]


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

    With processes, forked workers inherit the engine and the tasks and send back each task's completed ``Row``,
    which replaces ``task.row``.
    """
    total = len(tasks)
    sizes = _task_sizes(tasks) if workers > 1 and total > 1 else [0] * total
    kind = choose_executor(workers, total, task_bytes=sum(sizes))
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
        from concurrent.futures import ThreadPoolExecutor  # ~4 ms to import (logging...): only when used

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(engine._compare_one, [tasks[i] for i in largest_first]):
                tick()
    else:
        for i, row in zip(largest_first, _fork_map(engine, [tasks[i] for i in largest_first], workers, tick)):
            tasks[i].row = row
    return kind


#: Pipe ends of every comparison running in this process, guarded by _FORK_LOCK. A worker forked for one comparison
#: closes the others' at once: holding another comparison's write ends would keep its readers from ever seeing EOF
#: (seen: three comparisons forking from three threads deadlocked).
_FORK_LOCK = threading.Lock()
_OWN_FDS: set[int] = set()


def _fork_map(engine: Any, tasks: Sequence[Any], workers: int, tick: Callable[[], None]) -> list[Any]:
    """Rows of ``tasks`` (in task order) computed by ``workers`` forked children.

    The children inherit the engine and every task through the fork: nothing is pickled on the way in. They take
    task indices from a shared pipe, 4 bytes each, as they become free (so a slow pair never holds up the others),
    and send each completed row back through their own pipe as a length-prefixed pickle.
    """
    children: dict[int, int] = {}  # result pipe read end -> pid
    with _FORK_LOCK:
        queue_r, queue_w = _pipe()
    queue = [queue_w]  # set to -1 by whoever closes it: a second close could hit another thread's new fd
    try:
        for _ in range(min(workers, len(tasks))):
            with _FORK_LOCK:
                read_end, write_end = _pipe()
                with warnings.catch_warnings():
                    # Python >= 3.12 warns about forking a multi-threaded process; the child only reads files and
                    # runs the comparison, and the locks it uses are re-made after the fork (formats/parsed.py).
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    pid = os.fork()
                if pid == 0:  # the child never returns from here
                    for fd in _OWN_FDS - {queue_r, write_end}:
                        os.close(fd)
                    _worker(engine, tasks, queue_r, write_end)
                children[read_end] = pid
            _close(write_end)
        _close(queue_r)
        queue_r = -1
        return _collect(children, queue, tasks, tick)
    finally:
        _close(queue_r)
        _close(queue[0])
        for read_end, pid in children.items():
            _close(read_end)
            _reap(pid)


def _pipe() -> tuple[int, int]:
    """A pipe whose ends other comparisons' workers close (call with _FORK_LOCK held)."""
    read_end, write_end = os.pipe()
    _OWN_FDS.update((read_end, write_end))
    return read_end, write_end


def _close(fd: int) -> None:
    if fd < 0:
        return
    with _FORK_LOCK:
        _OWN_FDS.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass


def _worker(engine: Any, tasks: Sequence[Any], queue_fd: int, out_fd: int) -> None:
    """A forked child's whole life: compare tasks until the queue runs dry, then exit without running the
    parent's atexit handlers or flushing its buffers."""
    status = 0
    out = os.fdopen(out_fd, "wb")
    try:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)  # torch's OpenMP pool does not survive a fork; one thread per worker
        while True:
            # the parent writes whole 4-byte indices, at most PIPE_BUF at a time (atomic): a read gets one or EOF
            item = os.read(queue_fd, 4)
            if len(item) < 4:
                break
            index = int.from_bytes(item, "little")
            engine._compare_one(tasks[index])
            _send(out, (index, tasks[index].row))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it as one line
        status = 1
        try:
            _send(out, ("error", " ".join(f"{type(exc).__name__}: {exc}".split())[:500]))
        except BaseException:  # noqa: BLE001 - the parent still sees the pairs this worker did not return
            pass
    finally:
        try:
            out.close()
        finally:
            os._exit(status)


def _send(out: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(8, "little") + data)
    out.flush()


def _collect(children: dict[int, int], queue: list[int], tasks: Sequence[Any], tick: Callable[[], None]) -> list[Any]:
    """Feed the task queue and gather the rows, both as the pipes allow; closes the queue (``queue[0]``, then set
    to -1) once every index is in it."""
    queue_fd = queue[0]
    rows: list[Any] = [None] * len(tasks)
    buffers = {fd: bytearray() for fd in children}
    pending = memoryview(b"".join(i.to_bytes(4, "little") for i in range(len(tasks))))
    os.set_blocking(queue_fd, False)
    poller = select.poll()  # not selectors: that module alone took ~1.5 ms to import, in every comparison
    for fd in children:
        poller.register(fd, select.POLLIN)
    poller.register(queue_fd, select.POLLOUT)
    open_fds = set(children)
    while open_fds:
        for fd, _ in poller.poll():
            if fd == queue_fd:
                try:
                    pending = pending[os.write(fd, pending[:4096]):]  # <= PIPE_BUF: all or nothing
                except BlockingIOError:
                    continue
                if not pending:
                    poller.unregister(fd)
                    queue[0] = -1
                    _close(fd)  # the workers read EOF once the queue is empty
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            buf = buffers[fd]
            buf += chunk
            while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[:8], "little"):
                size = int.from_bytes(buf[:8], "little")
                index, row = pickle.loads(bytes(buf[8:8 + size]))
                del buf[:8 + size]
                if index == "error":
                    raise AitLlmError(f"a comparison worker process failed: {row}")
                rows[index] = row
                tick()
    missing = sum(1 for row in rows if row is None)
    if missing:
        raise AitLlmError(f"a comparison worker process died (killed or out of memory?) with {missing} pairs not "
                          f"compared; rerun with {EXECUTOR_ENV}=threads or fewer workers (-j)")
    return rows


def _reap(pid: int) -> None:
    """Wait for a child; one still running (the parent failed first) is killed."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    except OSError:
        pass
