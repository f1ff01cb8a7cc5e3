"""pytest glue of regression baselines: options, the ``ait_baseline`` marker, where baseline files live, the
HTML entry. Loaded with the main plugin (its ``pytest_plugins``); ``compare_ops`` calls :func:`baseline_gate`.

Like pytest-regressions: a test that opted in (``@pytest.mark.ait_baseline`` or ``compare_ops(...,
baseline=True)``) and has no baseline yet writes it and fails, naming the file; ``--ait-update-baseline``
rewrites baselines and passes. Imports nothing heavy (see plugin.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MARKER = "ait_baseline"
UPDATE_FLAG = "--ait-update-baseline"
_OUTCOMES = pytest.StashKey[list]()  # on a test item: the BaselineOutcome of each checked compare_ops call


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ait-llm")
    group.addoption(UPDATE_FLAG, action="store_true", default=False, dest="ait_update_baseline",
                    help="write (overwrite) the regression baseline of every test that uses one, from this run, "
                         "instead of checking against it; such tests pass unless they breach their tolerance.")
    group.addoption("--ait-baseline-dir", action="store", dest="ait_baseline_dir", metavar="DIR", default=None,
                    help="where regression baselines live: DIR/{test file path}/{test name}.json (default: "
                         "ait_baselines/{test module}/{test name}.json beside each test file).")
    parser.addini("ait_baseline_dir", help="default for --ait-baseline-dir (relative to the ini file)", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(red=(rel, abs), cos=..., ops={{...}}, dtypes={{...}}, use_defaults=True): check this test's "
        "compare_ops results against their accepted baseline file; keywords override the noise margins.")


def _rules(node: pytest.Item, arg: Any):
    """The RegressionRules of the nearest ``ait_baseline`` marker, updated with a dict passed as ``baseline=``."""
    from .compare.regression import RegressionRules

    marker = node.get_closest_marker(MARKER)
    layers = [*marker.args, dict(marker.kwargs)] if marker is not None else []
    if isinstance(arg, dict):
        layers.append(arg)
    return RegressionRules.from_marker(*layers)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A bad ``ait_baseline`` marker fails before the dumps run, in one line."""
    if item.get_closest_marker(MARKER) is None:
        return
    from .compare.regression import BaselineError

    try:
        _rules(item, None)
    except BaselineError as err:
        message = str(err)
    else:
        return
    pytest.fail(f"@pytest.mark.{MARKER} on {item.nodeid}: {message.removeprefix(MARKER + ': ')}", pytrace=False)


def _safe(text: str) -> str:
    return re.sub(r"[^\w.\[\]=-]+", "_", text).strip("_")[:150] or "test"


def baseline_path(node: pytest.Item, index: int) -> Path:
    """The baseline file of the ``index``-th checked compare_ops call of ``node`` (1-based): one file per test id,
    parametrized ids included, so parallel xdist workers never share one."""
    config = node.config
    test_file = Path(node.path)
    name = _safe(node.nodeid.split("::", 1)[1].replace("::", ".") if "::" in node.nodeid else node.name)
    filename = f"{name}.json" if index == 1 else f"{name}-{index}.json"
    root: Path | None = None
    option = config.getoption("ait_baseline_dir", None)
    if option:
        root = Path(os.path.expandvars(option)).expanduser()
        root = root if root.is_absolute() else Path(config.invocation_params.dir) / root
    elif config.getini("ait_baseline_dir"):
        root = Path(os.path.expandvars(str(config.getini("ait_baseline_dir")).strip())).expanduser()
        base = config.inipath.parent if config.inipath else config.rootpath
        root = root if root.is_absolute() else base / root
    if root is None:
        return test_file.parent / "ait_baselines" / test_file.stem / filename
    try:
        relative = test_file.with_suffix("").relative_to(config.rootpath)
    except ValueError:
        relative = Path(test_file.stem)
    return root / relative / filename


@dataclass
class BaselineGate:
    """One compare_ops call's baseline check: what compare_ops runs after comparing, before judging."""

    node: pytest.Item
    path: Path
    rules: Any
    update: bool

    def check(self, result: Any, output_dir: Path) -> str:
        """Check (or write) the baseline and write the CSV; the failure message, or "" when it passed."""
        from .report.baseline import check_baseline

        outcome = check_baseline(result, self.path, update=self.update, rules=self.rules, output_dir=output_dir)
        self.node.stash.setdefault(_OUTCOMES, []).append(outcome)
        return "" if outcome.passed else outcome.message(UPDATE_FLAG)


def baseline_gate(node: pytest.Item, arg: Any) -> BaselineGate | None:
    """The baseline check of the next compare_ops call of ``node``, or None when the test did not opt in.

    ``arg`` is compare_ops' ``baseline=``: None (the marker decides), True/False, or a dict of margins.
    A bad margin fails the test in one line.
    """
    __tracebackhide__ = True
    if arg is False or (arg is None and node.get_closest_marker(MARKER) is None):
        return None
    if not (arg is None or arg is True or isinstance(arg, dict)):
        pytest.fail(f"compare_ops(baseline={arg!r}): expected True, False or a dict of margins", pytrace=False)
    from .compare.regression import BaselineError

    try:
        rules = _rules(node, arg)
    except BaselineError as err:
        message = str(err)
    else:
        index = len(node.stash.get(_OUTCOMES, [])) + 1
        return BaselineGate(node, baseline_path(node, index), rules,
                            bool(node.config.getoption("ait_update_baseline", False)))
    pytest.fail(f"compare_ops baseline: {message}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Add the was/now table of the regressed ops to the test's pytest-html entry."""
    report = yield
    outcomes = item.stash.get(_OUTCOMES, None)
    if report.when != "call" or not outcomes or not item.config.pluginmanager.hasplugin("html"):
        return report
    from html import escape

    from pytest_html import extras as html_extra

    from .report.baseline import regression_table

    extras = list(getattr(report, "extras", None) or [])
    for outcome in outcomes:
        if outcome.regression is not None:
            extras.append(html_extra.html(regression_table(outcome.regression)))
        elif outcome.written or outcome.error:
            text = outcome.error or f"baseline {outcome.written}: {outcome.path}"
            extras.append(html_extra.html(f'<p class="ait-llm-baseline">{escape(text)}</p>'))
    report.extras = extras
    return report
