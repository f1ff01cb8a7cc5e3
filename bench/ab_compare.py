"""A/B of the compare phase on the benchmark's dumps, for a shared machine where absolute times drift.

    .venv/bin/python bench/ab_compare.py [--size 1] [--repeat 3] [--work DIR] [--base CHECKOUT]

Arms: ``A`` this checkout; ``base`` another checkout (e.g. a git worktree of an older commit with its compiled
pass built), imported through PYTHONPATH. Each run is a fresh
process timing ``run_compare`` after its imports (as bench_probes' compare probe), the arms interleaved; the fastest
of each is printed. The dumps are the benchmark's (bench_dumps.make_dumps), kept in --work if given.
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
start = time.perf_counter()
run_compare(sys.argv[1], sys.argv[2], output_dir=sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--base", type=Path, help="another checkout to time as arm 'base'")
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
        arms = ("A", "base") if args.base else ("A",)
        best = dict.fromkeys(arms, float("inf"))
        for i in range(args.repeat):
            for arm in arms:
                env = dict(os.environ, PYTHONPATH=str(args.base if arm == "base" else BENCH.parent))
                # cwd: `python -c` puts the working directory first on sys.path, before PYTHONPATH: run from a
                # checkout, every arm would import that checkout's package
                out = subprocess.run([sys.executable, "-c", PROBE, golden, my, str(work / f"out_{arm}_{i}")],
                                     capture_output=True, text=True, check=True, env=env, cwd=work)
                best[arm] = min(best[arm], json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
        print(f"{args.size}x: A (this checkout) {best['A']:.3f} s"
              + (f"; base {best['base']:.3f} s, A/base {best['A'] / best['base']:.2f}" if args.base else "")
              + f"; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
