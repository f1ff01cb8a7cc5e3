"""A/B: does taking linked inputs' error from their producers (byte-sample digests) pay for itself?

    .venv/bin/python bench/ab_input_reuse.py [--size 1] [--repeat 3] [--work DIR]

B is the simplest correct engine: no links, so every input pair is read and measured in the workers. Each run is
a fresh process timing ``run_compare`` after its imports (as bench_probes' compare probe), A and B interleaved;
the fastest of each is printed. The dumps are the benchmark's (bench_dumps.make_dumps), kept in --work if given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PROBE = """
import json, sys, time
import numpy  # noqa: F401 - imported before the clock, as in bench_probes
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.compare import plan
if sys.argv[4] == "B":
    plan._link_inputs = lambda *args: None  # no links: every input pair is read in the workers
start = time.perf_counter()
run_compare(sys.argv[1], sys.argv[2], output_dir=sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(BENCH))
    from bench_dumps import ModelShape, make_dumps

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        marker = work / "dumps.json"
        if marker.is_file():
            golden, my = json.loads(marker.read_text())
        else:
            golden, my, _ = make_dumps(ModelShape(seq=512 * args.size), work)
            golden, my = str(golden), str(my)
            marker.write_text(json.dumps([golden, my]))
        best = {"A": float("inf"), "B": float("inf")}
        for i in range(args.repeat):
            for arm in ("A", "B"):
                out = subprocess.run([sys.executable, "-c", PROBE, golden, my, str(work / f"out_{arm}_{i}"), arm],
                                     capture_output=True, text=True, check=True, env=dict(os.environ))
                best[arm] = min(best[arm], json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
        print(f"{args.size}x: A (linked inputs by digest) {best['A']:.3f} s, B (every input read) {best['B']:.3f} s, "
              f"B/A {best['B'] / best['A']:.2f}; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
