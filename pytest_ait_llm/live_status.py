"""Live lines in pytest's terminal while a fixture works: ``--ait-exec``'s elapsed time and last output line (it
may run for hours on an NPU), and the comparison's progress, as the CLI shows it.

Output capture is suspended for each write (as pytest's live logging does), so the lines reach the terminal
during the test, not in its captured output. On a terminal the line is rewritten in place; in a CI log a line is
written at most every :data:`LOG_EVERY_SECONDS`, plus one when the work ends. Under xdist workers there is no
terminal: nothing is written.
"""
from __future__ import annotations

import time

import pytest

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
            import contextlib

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
