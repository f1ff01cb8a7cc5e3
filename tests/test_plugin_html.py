"""Reports: the pytest-html entry of a compared test (CSV link, worst-ops table, error plot), xdist, no pytest-html.

The HTML is checked as a browser would get it: pytest-html 4 keeps each test's data as JSON in the
``data-jsonblob`` attribute of ``#data-container``; the extras of every test are read from there.
"""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from test_plugin import INJECTED_MODULE, INJECTED_OP, make_project, recorded  # noqa: F401 (recorded: a fixture)

pytest_plugins = ["pytester"]

TWO_TESTS = '''
import pytest

def test_healthy(torch_dump, compare_ops):
    compare_ops(torch_dump, {good!r})

def test_broken(torch_dump, compare_ops):
    compare_ops(torch_dump, {bad!r})
'''


class _DataBlob(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.blob: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id") == "data-container":
            self.blob = attrs["data-jsonblob"]


class _Fragment(HTMLParser):
    """Collects links, images and table cells of one HTML extra."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.imgs: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.hrefs.append(attrs["href"])
        elif tag == "img":
            self.imgs.append(attrs["src"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data + " ")


def html_tests(report: Path) -> dict[str, list[dict]]:
    parser = _DataBlob()
    parser.feed(report.read_text(encoding="utf-8"))
    assert parser.blob, "no data-container in the report"
    return json.loads(parser.blob)["tests"]


def extras_of(tests: dict, nodeid: str) -> list[dict]:
    call = [entry for entry in tests[nodeid] if entry["extras"]]
    assert call, f"{nodeid} has no extras"
    return call[0]["extras"]


def check_entry(extras: list[dict], report_dir: Path) -> _Fragment:
    """The CSV link resolves to a copy beside the report, and the fragment has the table and a PNG data URI."""
    urls = [e for e in extras if e["format_type"] == "url"]
    fragments = [e for e in extras if e["format_type"] == "html"]
    assert len(urls) == 1 and len(fragments) == 1
    csv = report_dir / urls[0]["content"]
    assert csv.is_file() and csv.parent == report_dir / "ait_llm"
    assert csv.read_text().startswith("token_id,data_id,golden_data_path")
    fragment = _Fragment()
    fragment.feed(fragments[0]["content"])
    assert fragment.hrefs == [urls[0]["content"]]
    # both links are labelled with the name of the file they open (the copy beside the report)
    assert urls[0]["name"].endswith(": " + csv.name)
    assert f">{csv.name}</a>" in fragments[0]["content"]
    assert len(fragment.imgs) == 1 and fragment.imgs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(fragment.imgs[0].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    header = fragment.rows[0]
    assert header[:6] == ["order", "token", "ATB op", "torch module", "cos", "RED"]
    return fragment


def test_html_report_links_the_csv_and_shows_the_worst_ops_and_the_plot(pytester, recorded):
    make_project(pytester, recorded, TWO_TESTS.format(good=str(recorded.good), bad=str(recorded.bad)))
    result = pytester.runpytest(f"--ait-golden-path={recorded.golden}", "--html=reports/report.html")
    result.assert_outcomes(passed=1, failed=1)
    report = pytester.path / "reports" / "report.html"
    tests = html_tests(report)

    healthy = check_entry(extras_of(tests, "test_port.py::test_healthy"), report.parent)
    assert all("FAIL" not in row for row in healthy.rows[1:])

    broken = check_entry(extras_of(tests, "test_port.py::test_broken"), report.parent)
    first = [row for row in broken.rows[1:] if "first divergence" in row]
    assert len(first) == 1
    assert first[0][2].startswith(INJECTED_OP) and first[0][3].startswith(INJECTED_MODULE) and "FAIL" in first[0]
    assert broken.rows[1] == first[0]  # the worst op is listed first


def test_xdist_workers_send_their_extras_and_never_share_a_file(pytester, recorded):
    make_project(pytester, recorded, TWO_TESTS.format(good=str(recorded.good), bad=str(recorded.bad))
                 + TWO_TESTS.format(good=str(recorded.good), bad=str(recorded.bad))
                 .replace("test_healthy", "test_healthy_again").replace("test_broken", "test_broken_again"))
    result = pytester.runpytest("-p", "xdist", "-n", "2", f"--ait-golden-path={recorded.golden}",
                                "--ait-output=out", "--html=report.html")
    result.assert_outcomes(passed=2, failed=2)
    tests = html_tests(pytester.path / "report.html")
    links = set()
    for name in ("test_healthy", "test_broken", "test_healthy_again", "test_broken_again"):
        extras = extras_of(tests, f"test_port.py::{name}")
        check_entry(extras, pytester.path)
        links.update(e["content"] for e in extras if e["format_type"] == "url")
    assert len(links) == 4
    sessions = sorted(p.name for p in (pytester.path / "out").iterdir())
    assert len(sessions) == 2 and {s.split("-")[2] for s in sessions} == {"gw0", "gw1"}
    summary = result.stdout.str().split("ait-llm per-op comparison reports (CSV)", 1)[1]
    csvs = re.findall(r"^(?:OK|BREACH)\s+test_port.py::\w+: (\S+)$", summary, re.M)
    assert len(csvs) == 4 and all(Path(c).is_file() for c in csvs)


def test_without_pytest_html_the_csv_paths_are_in_the_terminal_summary(pytester, recorded):
    make_project(pytester, recorded, TWO_TESTS.format(good=str(recorded.good), bad=str(recorded.bad)))
    result = pytester.runpytest("-p", "no:html", f"--ait-golden-path={recorded.golden}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*- ait-llm per-op comparison reports (CSV) -*",
        "OK     test_port.py::test_healthy: */ait_cmp_report_*.csv",
        "BREACH test_port.py::test_broken: */ait_cmp_report_*.csv",
    ])
    assert not list(pytester.path.rglob("ait_llm/*.csv"))  # nothing copied without a report to put it beside


def test_error_profile_png(recorded, tmp_path):
    from pytest_ait_llm.api import run_compare
    from pytest_ait_llm.compare.result import CompareResult
    from pytest_ait_llm.report.plot import plot_error_profile

    result = run_compare(recorded.golden, recorded.bad, output_dir=tmp_path)
    png = plot_error_profile(result, tmp_path / "profile.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5_000
    empty = plot_error_profile(CompareResult(rows=[], unpaired=[]), tmp_path / "empty.png")
    assert empty.read_bytes().startswith(b"\x89PNG")


def test_error_plot_failure_is_a_note_not_a_crash(recorded, tmp_path, monkeypatch):
    from pytest_ait_llm.api import run_compare
    from pytest_ait_llm.report import html, plot

    result = run_compare(recorded.golden, recorded.good, output_dir=tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("font cache is corrupt")

    monkeypatch.setattr(plot, "plot_error_profile", broken)
    fragment = html.report_fragment(result, png_path=tmp_path / "p.png", csv_href="ait_llm/x.csv")
    assert "no error plot: RuntimeError: font cache is corrupt" in fragment and "<table" in fragment


def test_worst_ops_table_is_dark_on_light_with_a_legend(recorded, tmp_path):
    """pytest-html greys the text of extras; every cell sets its own dark colour, breaches a light red."""
    from pytest_ait_llm.api import run_compare
    from pytest_ait_llm.report.html import worst_ops_table

    table = worst_ops_table(run_compare(recorded.golden, recorded.bad, output_dir=tmp_path))
    cells = re.findall(r"<t[dh] style=\"([^\"]*)\"", table)
    assert cells and all("color:#111" in style for style in cells)
    backgrounds = set(re.findall(r"background:(#\w+)", table))
    assert {"#f6b9b9", "#fde4e4"} <= backgrounds  # the first divergence, another breach
    legend = table.split('class="ait-llm-legend"', 1)[1]
    assert "<b>RED</b>: relative euclidean distance" in legend and "<b>(added)</b> after a limit" in legend
    assert "<b>RED added</b>" in legend


def test_error_plot_is_ticked_at_each_layer(recorded, tmp_path):
    from pytest_ait_llm.api import run_compare
    from pytest_ait_llm.report.plot import layer_ticks

    result = run_compare(recorded.golden, recorded.bad, output_dir=tmp_path)
    rows = [r for r in result.rows if r.metrics is not None]
    xs, labels = layer_ticks(rows)
    assert labels == ["0", "1"]  # 0_TinyLayer, 1_TinyLayer; the head (2_LinearOperation) is no layer
    assert [rows[x].atb_op.split("/")[0] for x in xs] == ["0_TinyLayer", "1_TinyLayer"]
