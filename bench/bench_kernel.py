"""Nanoseconds per element pair of compare_tensors on each compiled copy this CPU runs (AVX-512, AVX2, baseline)
and on the numpy pass, for the usual pair of a port: float32 golden, bfloat16 mine (golden times 1 + 1 % noise).

Two sizes: "in cache" (256 Ki elements, 1.5 MB: the payloads stay in L2 between repeats) and "from memory"
(32 Mi elements, 192 MB: larger than the caches, 105 MB of L3 on the development VM). Each measurement is the
fastest of ``--repeat`` rounds, interleaved across passes so that load on the shared machine hits them alike.
Time is this process's CPU time (``time.process_time``): on a loaded machine, waiting for a core is not the pass's.

    PYTHONPATH=. .venv/bin/python bench/bench_kernel.py [--repeat 7]

numpy uses the widest loops of this CPU. To compare the 2-lane copy with numpy as a CPU without AVX2 runs it, hold
numpy to its SSE4.2 baseline: NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR" (numpy 2.x names).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from pytest_ait_llm.compare import fastpass
from pytest_ait_llm.compare.metrics import compare_tensors
from pytest_ait_llm.formats.atb_bin import float32_to_bf16_bits
from pytest_ait_llm.formats.tensor import RawTensor

SIZES = {"in cache": 1 << 18, "from memory": 1 << 25}


def pair(n: int) -> tuple[RawTensor, RawTensor]:
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n, dtype=np.float32) * 3
    m = g * (1 + np.float32(0.01) * rng.standard_normal(n, dtype=np.float32))
    return RawTensor(g, "float32", (n,)), RawTensor(float32_to_bf16_bits(m), "bfloat16", (n,))


def passes() -> list[str]:
    """The compiled copies this CPU runs, then numpy."""
    names = []
    if fastpass._kernel is not None:
        for isa in ("avx512", "avx2", "neon", "baseline"):
            try:
                fastpass._kernel.set_isa(isa)
            except ValueError:
                continue
            names.append(isa)
    return names + ["numpy"]


def time_once(name: str, golden: RawTensor, my: RawTensor, reps: int) -> float:
    """CPU seconds per call of compare_tensors on the given pass."""
    if name == "numpy":
        os.environ["AIT_LLM_KERNEL"] = "numpy"
    else:
        os.environ["AIT_LLM_KERNEL"] = "compiled"
        fastpass._kernel.set_isa(name)
    start = time.process_time()
    for _ in range(reps):
        compare_tensors(golden, my)
    return (time.process_time() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="rounds per measurement; the fastest is kept")
    args = ap.parse_args()
    default = fastpass.isa()
    names = passes()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"numpy {np.__version__}; default copy: {default}")
    print("| pass | " + " | ".join(f"{k} ({n} pairs)" for k, n in SIZES.items()) + " |")
    print("|---|" + "---:|" * len(SIZES))
    results = {}
    for label, n in SIZES.items():
        golden, my = pair(n)
        reps = max(1, (1 << 22) // n)  # ~4 Mi pairs per round
        for name in names:
            time_once(name, golden, my, 1)  # warm-up: page in, first-call costs
        best = {name: float("inf") for name in names}
        for _ in range(args.repeat):
            for name in names:
                best[name] = min(best[name], time_once(name, golden, my, reps))
        results[label] = {name: best[name] / n * 1e9 for name in names}
    for name in names:
        cells = []
        for label in SIZES:
            ns = results[label][name]
            cells.append(f"{ns:.2f} ns ({results[label]['numpy'] / ns:.1f}x numpy)" if name != "numpy"
                         else f"{ns:.2f} ns")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
