"""What a user installs: the sdist carries the license, changelog, docs and py.typed; the package's public API is
importable from its top level without making the plugin's import heavier."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_carries_docs_license_changelog_and_py_typed(tmp_path):
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path), "--formats=gztar"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for wanted in ("LICENSE", "CHANGELOG.md", "docs/guide.md", "docs/writing-a-port.md", "docs/quickstart.zh.md",
                   "pytest_ait_llm/py.typed"):
        assert wanted in names, wanted
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_public_api_from_the_top_level_loads_lazily():
    code = ("import sys, pytest_ait_llm as p; assert 'numpy' not in sys.modules and 'torch' not in sys.modules; "
            "from pytest_ait_llm import run_compare, DumpConfig, register_hook, Tolerance, AtbDumpWriter, "
            "open_atb_dump, open_torch_dump, CompareResult, AitLlmError, parse_tokens; "
            "assert DumpConfig.__module__ == 'pytest_ait_llm.dump.torch_hooks'; print(sorted(p.__all__)[:3])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import pytest_ait_llm as p; p.no_such_name"], capture_output=True,
                          text=True, timeout=60)
    assert "module 'pytest_ait_llm' has no attribute 'no_such_name'" in proc.stderr
