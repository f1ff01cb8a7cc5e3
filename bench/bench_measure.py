"""Run one measured process: wall time, CPU time, and peak memory of the whole process tree.

Peak memory is reported two ways. ``ru_maxrss`` (``wait4`` in ``bench_launch.py``) is the kernel's exact
high-water mark, but of the largest single process of the tree, so it under-reports a process pool. ``tree_rss``
is sampled every 100 ms over the process and all its descendants: the resident set (``VmRSS``) of a lone process;
for a pool, the proportional set size (``Pss`` of ``smaps_rollup``) summed over its processes, which counts the
pages forked workers share with their parent once instead of once per process. A spike shorter than the period
can be missed. (PSS is not sampled for a lone process: walking its page tables 20 times a second slowed a process
that maps and unmaps large temporaries by up to 50 %.) Both count the pages of memory-mapped dump files the
process touched, as resident memory does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measured:
    wall_s: float
    cpu_s: float  # user + system of the process and its reaped children
    maxrss_mb: float
    tree_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    report: dict = field(default_factory=dict)  # the probe's own JSON line, when it printed one

    @property
    def peak_mb(self) -> float:
        return max(self.maxrss_mb, self.tree_rss_mb)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids.extend(int(x) for x in fh.read().split())
    except OSError:
        pass
    return kids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_kb(root: int) -> int:
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid not in pids:
            pids.append(pid)
            stack.extend(_children(pid))
    measured = [p for p in pids if p != root] or [root]  # the launcher itself is a few MB of Python
    if len(measured) == 1:
        return _rss_kb(measured[0])
    return sum(_pss_kb(p) for p in measured)


def run_measured(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None,
                 timeout: float = 3600.0) -> Measured:
    """Run ``cmd`` to completion and measure it (see the module docstring)."""
    fd, usage_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    launcher = [sys.executable, str(Path(__file__).with_name("bench_launch.py")), usage_path]
    start = time.perf_counter()
    proc = subprocess.Popen(launcher + cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    try:
        usage = json.loads(Path(usage_path).read_text() or "{}")
    finally:
        os.unlink(usage_path)
    report: dict = {}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                pass
            break
    return Measured(wall_s=wall, cpu_s=usage.get("utime", 0.0) + usage.get("stime", 0.0),
                    maxrss_mb=usage.get("maxrss_kb", 0) / 1024, tree_rss_mb=peak[0] / 1024,
                    returncode=proc.returncode, stdout=stdout, stderr=stderr, report=report)
