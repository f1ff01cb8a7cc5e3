"""Look at an HTML report the way a person does: render it in headless Chromium, save a screenshot, and
return the DOM after the page's scripts ran (pytest-html 4 builds its table in JavaScript, so the HTML text alone
is not what a person sees).

    python scripts/report_screenshot.py out/demo/report.html out/demo/report.png

Needs Chromium (Debian: `apt-get install chromium`); exits 2 with a one-line message when it is missing.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--allow-file-access-from-files", "--virtual-time-budget=5000"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def render(html: Path, png: Path, *, width: int = 1400, height: int = 2200, timeout: float = 120) -> str:
    """Screenshot ``html`` into ``png`` and return the rendered DOM."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    url = Path(html).resolve().as_uri()
    shot = _run(browser, [f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}", url], timeout)
    if not Path(png).is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {shot.stderr.strip()[-300:]}")
    dom = _run(browser, ["--dump-dom", url], timeout)
    return dom.stdout


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: report_screenshot.py REPORT.html OUT.png", file=sys.stderr)
        return 2
    try:
        dom = render(Path(argv[0]), Path(argv[1]))
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"report_screenshot: {err}", file=sys.stderr)
        return 2
    print(f"{argv[1]} ({len(dom)} characters of rendered DOM)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
