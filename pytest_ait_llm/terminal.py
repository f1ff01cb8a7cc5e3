"""What the plugin writes to pytest's terminal: live lines while a fixture works (``--ait-exec``'s elapsed time
and last output line: it may run for hours on an NPU; the comparison's progress, as the CLI shows it), and the
summary of every comparison's CSV at the end.

Output capture is suspended for each write (as pytest's live logging does), so the lines reach the terminal
during the test, not in its captured output. On a terminal the line is rewritten in place; in a CI log a line is
written at most every :data:`LOG_EVERY_SECONDS`, plus one when the work ends. Under xdist workers there is no
terminal: nothing is written.
"""
from __future__ import annotations

import contextlib
import time

import pytest

#: user_properties names under which each comparison's CSV path and verdict travel (xdist, junitxml).
CSV_PROPERTY, VERDICT_PROPERTY = "ait_llm_csv", "ait_llm_verdict"
#: Seconds between two progress lines when the output is not a terminal (a CI log keeps every line).
LOG_EVERY_SECONDS = 60.0


class LiveStatus:
    """Writes one kind of progress (``label``) to pytest's terminal reporter, if there is one."""

    def __init__(self, config: pytest.Config, label: str):
        self._reporter = config.pluginmanager.get_plugin("terminalreporter")
        self._capture = config.pluginmanager.get_plugin("capturemanager")
        self._label = label
        self._tty = bool(self._reporter is not None and self._reporter.isatty())
        self._last_logged = time.monotonic()
        self._rewritten = False

    def _write(self, text: str, *, final: bool) -> None:
        if self._reporter is None:
            return
        now = time.monotonic()
        if not self._tty and not final and now - self._last_logged < LOG_EVERY_SECONDS:
            return
        self._last_logged = now
        with self._suspended():
            if self._tty and not final:
                if not self._rewritten:
                    self._reporter.ensure_newline()
                self._reporter.rewrite(f"{self._label}: {text}", erase=True)
                self._rewritten = True
            else:
                if self._rewritten:
                    self._reporter.rewrite(f"{self._label}: {text}", erase=True)
                    self._reporter.write("\n")
                else:
                    self._reporter.ensure_newline()
                    self._reporter.write_line(f"{self._label}: {text}")
                self._rewritten = False

    def _suspended(self):
        if self._capture is None:
            return contextlib.nullcontext()
        return self._capture.global_and_fixture_disabled()

    def exec_waiting(self, elapsed: float, last_line: str) -> None:
        """``run_atb_command``'s ``on_wait``: the command still runs."""
        self._write(f"running for {elapsed:.0f} s" + (f" | {last_line[-120:]}" if last_line else ""), final=False)

    def exec_finished(self, elapsed: float, last_line: str, outcome: str) -> None:
        self._write(f"{outcome} after {elapsed:.1f} s" + (f" | last output: {last_line[-120:]}" if last_line
                                                          else ""), final=True)

    def compare_progress(self, done: int, total: int) -> None:
        """The engine's ``progress(done, total)`` callback."""
        width = 30
        filled = width * done // max(total, 1)
        self._write(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tensor pairs", final=done >= total)


class CsvSummary:
    """The compared tests' CSV paths for the terminal summary. They travel in ``report.user_properties``, so
    they also arrive from xdist workers (and land in junitxml)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            props = getattr(report, "user_properties", ())
            csvs = [str(v) for k, v in props if k == CSV_PROPERTY]
            verdicts = [str(v) for k, v in props if k == VERDICT_PROPERTY]
            self.rows += [(report.nodeid, verdicts[i] if i < len(verdicts) else "", c) for i, c in enumerate(csvs)]

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.rows:
            terminalreporter.write_sep("-", "ait-llm per-op comparison reports (CSV)")
            for nodeid, verdict, csv in self.rows:  # the comparison's verdict, not the test's outcome
                terminalreporter.write_line(f"{(verdict or '?').upper():6} {nodeid}: {csv}")
