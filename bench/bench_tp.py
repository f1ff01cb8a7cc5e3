"""Merged comparison of a tensor-parallel dump vs the same tensors dumped by one device.

For each shape (a column-parallel activation [1, seq, width] split over the last dim, as q/k/v and gate/up are),
the golden is one float32 file and "my" side one bf16 file (TP=1) or N bf16 shard files (TP=N, each
[1, seq, width/N]). Both are compared with the fused pass: ``compare_tensors`` for TP=1, ``compare_merged`` for
TP=N (the ranks' slices fed in order, the concatenation never built). The sizes are timed in turns in one process
(files in the page cache after a warm-up pass), best CPU time of ``--repeat`` each; peak memory is ``ru_maxrss`` of
a process that compares one size once (mapped file pages it touched included) and the tracemalloc peak (buffers
the pass allocated).

    .venv/bin/python bench/bench_tp.py                 # both passes, TP=1/2/4/8, ~2 min
    .venv/bin/python bench/bench_tp.py --quick         # one small shape
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1, 2048, 4096), (1, 1024, 11008 - 11008 % 8)]  # a q_proj output; a gate_proj output (width / 8 whole)
QUICK = [(1, 256, 2048)]


def write_files(root: Path, shape: tuple[int, ...], worlds: list[int]) -> None:
    from pytest_ait_llm.formats.atb_bin import write_bin

    rng = np.random.default_rng(0)
    golden = rng.standard_normal(shape, dtype=np.float32)
    np.save(root / "golden.npy", golden)
    mine = golden * (1 + 0.004 * rng.standard_normal(shape, dtype=np.float32))
    for world in worlds:
        width = shape[-1] // world
        for r in range(world):
            write_bin(root / f"tp{world}_rank{r}.bin", np.ascontiguousarray(mine[..., r * width:(r + 1) * width]),
                      dtype="bfloat16")


def probe(root: Path, worlds: list[int], repeat: int) -> dict:
    """One measured process: for each TP size, the best CPU time of ``repeat`` comparisons taken in turns (TP=1,
    TP=2, ... TP=1, TP=2, ...: on a shared machine every size then sees the same load), the tracemalloc peak,
    and the metrics. With one size only, ``maxrss_mb`` is this process's peak after one comparison."""
    import resource
    import time
    import tracemalloc

    from pytest_ait_llm.compare.merged import compare_merged
    from pytest_ait_llm.compare.metrics import compare_tensors
    from pytest_ait_llm.formats.atb_bin import read_bin
    from pytest_ait_llm.formats.tensor import RawTensor

    golden_map = np.load(root / "golden.npy", mmap_mode="r")
    golden = RawTensor(golden_map, "float32", tuple(golden_map.shape))
    shards = {w: [read_bin(root / f"tp{w}_rank{r}.bin") for r in range(w)] for w in worlds}

    def once(world: int):
        if world == 1:
            return compare_tensors(golden, shards[1][0]).values
        return compare_merged(golden, shards[world], len(golden.shape) - 1)[0].values

    out = {w: {"seconds": float("inf")} for w in worlds}
    for w in worlds:  # warm: pages in the cache and mapped
        tracemalloc.start()
        out[w]["values"] = once(w)
        out[w]["traced_mb"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(repeat):
        for w in worlds:
            start = time.process_time()  # CPU time: the machine is shared, wall time swings with the others' load
            once(w)
            out[w]["seconds"] = min(out[w]["seconds"], time.process_time() - start)
    return out


def measure(root: Path, worlds: list[int], repeat: int, kernel: str) -> dict:
    env = {**os.environ, "AIT_LLM_KERNEL": kernel, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--probe", str(root), ",".join(map(str, worlds)), str(repeat)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        worlds = [int(w) for w in args.probe[1].split(",")]
        result = probe(Path(args.probe[0]), worlds, int(args.probe[2]))
        print(json.dumps({str(k): v for k, v in result.items()}))
        return 0
    sys.path.insert(0, str(REPO))
    from pytest_ait_llm.compare import fastpass

    worlds = [int(w) for w in args.worlds.split(",")]
    kernels = ["numpy"] + (["compiled"] if fastpass._kernel is not None else [])
    print(f"| shape | pass | TP | CPU ms | x TP=1 | maxrss MB | traced MB | RED |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in QUICK if args.quick else SHAPES:
        with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp:
            root = Path(tmp)
            write_files(root, shape, worlds)
            for kernel in kernels:
                timed = measure(root, worlds, args.repeat, kernel)
                base = timed["1"]["seconds"]
                for world in worlds:
                    m = timed[str(world)]
                    peak = measure(root, [world], 0, kernel)["maxrss_mb"]  # alone: its own peak
                    print(f"| {list(shape)} | {kernel} | {world} | {m['seconds'] * 1e3:.1f} | "
                          f"{m['seconds'] / base:.2f} | {peak:.0f} | {m['traced_mb']:.1f} | "
                          f"{m['values']['relative_euclidean_distance']:.6f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
