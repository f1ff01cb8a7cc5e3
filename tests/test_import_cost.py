"""Installing the package activates the plugin in every pytest run of the environment: it must cost next to nothing.

Checked with ``python -X importtime`` in a fresh interpreter, as a user would: what the plugin imports, not how
long it takes (that depends on the machine; ``bench/bench_import.py`` measures it).
"""
from __future__ import annotations

import re
import subprocess
import sys

HEAVY = ("torch", "numpy", "pandas", "matplotlib", "transformers", "pytest_html")
_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)$")


def importtime(code: str) -> dict[str, tuple[int, int]]:
    """module -> (self µs, cumulative µs) for the imports ``code`` triggers."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    times = {}
    for line in proc.stderr.splitlines():
        m = _LINE.match(line)
        if m:
            times[m.group(4)] = (int(m.group(1)), int(m.group(2)))
    return times


def test_plugin_imports_nothing_heavy():
    modules = importtime("import pytest_ait_llm.plugin")
    assert "pytest_ait_llm.plugin" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"importing the plugin pulls in {heavy[:10]}"
    ours = sorted(m for m in modules if m.startswith("pytest_ait_llm."))
    # its option parsing and terminal output (stdlib only) serve every run anyway; no engine module is
    options = ["pytest_ait_llm.errors", "pytest_ait_llm.plugin", "pytest_ait_llm.settings", "pytest_ait_llm.terminal",
               "pytest_ait_llm.token_range"]
    assert ours == options, f"the plugin imports engine modules at import time: {ours}"

