"""Pairs compared in forked worker processes: the same report as serial, custom metrics too, and a worker that
dies is a one-line error, never a hang or a half-filled report."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from atb_mirror import mirror_pair, report_text
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.errors import AitLlmError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forked workers need fork()")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    return mirror_pair(tmp_path_factory)


def _children() -> set[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as fh:
            return {int(x) for x in fh.read().split()}
    except OSError:
        return set()


def test_processes_give_the_serial_report_and_tick_once_per_pair(dumps, tmp_path, monkeypatch):
    golden, my = dumps
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "serial")
    serial = run_compare(golden, my, output_dir=tmp_path / "s")
    ticks = []
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "processes")
    forked = run_compare(golden, my, output_dir=tmp_path / "p", workers=2, progress=lambda d, t: ticks.append((d, t)))
    assert report_text(forked) == report_text(serial)
    total = ticks[-1][1]
    assert [d for d, _ in ticks] == list(range(1, total + 1)) and total == len(serial.compared) + sum(
        1 for r in serial.rows if r.status == "skipped")
    assert _children() == set()  # every worker was waited for


def test_custom_metrics_run_in_the_workers(dumps, tmp_path, monkeypatch):
    """Workers inherit the options through fork(): a metric loaded from a file needs no pickling."""
    golden, my = dumps
    metric = tmp_path / "m.py"
    metric.write_text("import numpy as np\ndef peak(g, m):\n    return float(np.abs(m - g).max())\n")
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "processes")
    result = run_compare(golden, my, output_dir=tmp_path, workers=2, custom_metrics=[f"{metric}:peak"])
    rows = [r for r in result.compared if r.metrics is not None and r.metrics.compared]
    assert rows and all(r.metrics.custom["peak"] == pytest.approx(r.metric("max_absolute_error")) for r in rows)


def test_a_killed_worker_is_an_error_not_a_hang(dumps, tmp_path, monkeypatch):
    golden, my = dumps
    metric = tmp_path / "m.py"
    # as the OOM killer would: a worker (never the test's own process) dies on its first pair
    metric.write_text(f"import os\ndef die(g, m):\n    if os.getpid() != {os.getpid()}:\n"
                      f"        os.kill(os.getpid(), 9)\n    return 0.0\n")
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "processes")
    with pytest.raises(AitLlmError, match="worker process died .*; rerun with AIT_LLM_EXECUTOR=threads"):
        run_compare(golden, my, output_dir=tmp_path, workers=2, custom_metrics=[f"{metric}:die"])
    assert not list(tmp_path.glob("*.csv"))  # no half-filled report
    assert _children() == set()


def test_comparisons_forking_from_several_threads_at_once_all_complete(dumps, tmp_path, monkeypatch):
    golden, my = dumps
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "processes")
    start = threading.Barrier(3)

    def one(i):
        start.wait()
        return report_text(run_compare(golden, my, output_dir=tmp_path / str(i), workers=2))

    with ThreadPoolExecutor(3) as pool:
        reports = list(pool.map(one, range(3)))
    assert reports[0] == reports[1] == reports[2]
