"""How long importing the plugin takes once pytest is loaded: every pytest run of an environment pays it.

    .venv/bin/python bench/bench_import.py [--repeat 5]

Prints the best and median cumulative ``-X importtime`` of ``pytest_ait_llm.plugin`` over fresh interpreters
(pytest's own import is not ours). The target is under 100 ms; docs/performance.md holds a run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+(\d+)\s+\|\s*pytest_ait_llm\.plugin$")


def plugin_import_us() -> int:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pytest; import pytest_ait_llm.plugin"],
                          capture_output=True, text=True, check=True)
    return next(int(m.group(1)) for m in map(_LINE.match, proc.stderr.splitlines()) if m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    times = [plugin_import_us() / 1000 for _ in range(parser.parse_args().repeat)]
    print(f"plugin import (after pytest): best {min(times):.1f} ms, median {statistics.median(times):.1f} ms "
          f"over {len(times)} runs")


if __name__ == "__main__":
    main()
