"""The README's main job, end to end: the example's tests through the plugin, as `make demo` runs them.

First with ``--ait-exec`` (the port runs and dumps, the golden runs under the hooks), then again on the dumps that
run left behind, as a CI job without an NPU would (``--ait-golden-path``/``--ait-my-path``). The HTML report is
parsed, and, where Chromium is installed, rendered and looked at as a person would.
"""
from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llama_example import EXAMPLE, REPO, load


demo = load("_ait_demo", EXAMPLE / "demo.py")
screenshot = load("_ait_report_screenshot", REPO / "scripts" / "report_screenshot.py")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(demo.pytest_command(out, []), cwd=REPO, env=demo.demo_env(), capture_output=True,
                          text=True, timeout=600)
    return out, proc


def test_demo_gates_the_healthy_port_and_names_the_injected_bug(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"7 passed, 1 xfailed", proc.stdout), proc.stdout[-2000:]  # 3 of them: test_port_tp.py
    assert "PASSED" in proc.stdout and "test_healthy_port" in proc.stdout
    assert (out / "report.html").is_file()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.extend(v for k, v in attrs if k == "href" and v)


def test_html_report_carries_csv_table_and_picture(demo_run):
    out, _ = demo_run
    html = (out / "report.html").read_text()
    # pytest-html 4 keeps the test data as escaped JSON in the page: look in its unescaped form
    import html as html_mod

    data = html_mod.unescape(html_mod.unescape(html))
    assert "data:image/png;base64," in data
    assert "first divergence" in data and "root.model.layers.5.post_attention_layernorm" in data
    csvs = set(re.findall(r"[\w./-]*ait_cmp_report_\d{14}(?:_\d+)?\.csv", data))
    assert csvs and any((out / c).is_file() or Path(c).is_file() for c in csvs)


def test_recorded_dumps_gate_the_same_port_without_running_it(demo_run, tmp_path):
    out, _ = demo_run
    golden = next(out.glob("session-*/torch_dump/*_cpu"))
    # the port logs its injected bug, if any: the healthy run is the one without
    healthy = next(p for p in sorted(out.glob("session-*/atb_exec/run*/*_dump_*"))
                   if "PORT_BUG" not in (p.parent / "ait_exec.log").read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", str(EXAMPLE), f"--rootdir={EXAMPLE}", "-c",
                           str(EXAMPLE / "pytest.ini"), f"--ait-golden-path={golden}", f"--ait-my-path={healthy}",
                           f"--op-mapping-file={EXAMPLE}", f"--ait-output={tmp_path}", "-k", "healthy", "-q"],
                          cwd=REPO, env=demo.demo_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.skipif(screenshot.find_chromium() is None,
                    reason="Chromium is not installed (apt-get install chromium); `make screenshot` needs it too")
def test_report_as_a_person_sees_it_in_a_browser(demo_run, tmp_path):
    out, _ = demo_run
    png = tmp_path / "report.png"
    dom = screenshot.render(out / "report.html", png)
    assert png.stat().st_size > 50_000  # a rendered page with a plot, not a blank one
    # what the browser shows once the page's scripts ran: the table row of the root cause and the plot
    assert "ait-llm-worst-ops" in dom and "first divergence" in dom
    assert "root.model.layers.5.post_attention_layernorm" in dom and "<img" in dom
