"""What the benchmark measures, each run as its own process: ``python bench/bench_probes.py PROBE SPEC.json``.

Every probe prints one JSON line ``{"seconds": ..., ...}`` with its own timing of the measured phase (after its
imports); the parent adds wall time, CPU time and peak memory of the whole process.

Probes:
- ``limit``: every paired file read once, one pass over it (``np.sum`` over a memory map of its payload).
- ``compare``: our engine through ``pytest_ait_llm.api.run_compare`` (the compare phase, CSV included).
- ``original``: the original tool's approach, re-implemented faithfully (see ``bench_original.py``).
"""
from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

#: ATB headers are a few short lines; the original reader scans until this line.
END_LINE = b"$End=1\n"


def payload_view(path: Path) -> np.ndarray:
    """The raw payload bytes of a dumped tensor as a read-only memory map, found without our readers.

    ``.bin``: everything after the ``$End=1`` line. ``.pth`` (torch's zip format, stored uncompressed): the
    ``data/0`` member. Anything else: the whole file.
    """
    if path.suffix == ".bin":
        with open(path, "rb") as fh:
            head = fh.read(4096)
        offset = head.index(END_LINE) + len(END_LINE)
        size = path.stat().st_size - offset
        return np.memmap(path, np.uint8, "r", offset, (size,)) if size else np.zeros(0, np.uint8)
    if path.suffix in (".pth", ".pt"):
        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        with open(path, "rb") as fh:  # the local header's own name/extra lengths give where the bytes start
            fh.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(fh.read(4), "<u2")
        offset = info.header_offset + 30 + int(name_len) + int(extra_len)
        return np.memmap(path, np.uint8, "r", offset, (info.file_size,)) if info.file_size else np.zeros(0, np.uint8)
    return np.memmap(path, np.uint8, "r")


def read_once(path: Path) -> int:
    """One pass over the payload, summed as 8-byte words (sums over any dtype read every byte just the same)."""
    view = payload_view(path)
    words = view[: view.size - view.size % 8].view(np.uint64)
    np.sum(words)  # wraps around: only the read matters
    if view.size % 8:
        np.sum(view[view.size - view.size % 8:])
    return int(view.size)


def probe_limit(spec: dict) -> dict:
    files = sorted({f for pair in spec["pairs"] for f in pair})
    start = time.perf_counter()
    total = sum(read_once(Path(f)) for f in files)
    return {"seconds": time.perf_counter() - start, "bytes": total, "files": len(files)}


def probe_compare(spec: dict) -> dict:
    from pytest_ait_llm.api import run_compare  # the compare path needs no torch (pth files are read by pth_zip)

    start = time.perf_counter()
    result = run_compare(spec["golden"], spec["my"], output_dir=spec["out"], workers=spec.get("workers"))
    return {"seconds": time.perf_counter() - start, "rows": len(result.compared), "csv": str(result.csv_path)}


def probe_original(spec: dict) -> dict:
    from bench_original import compare_pairs
    import torch  # noqa: F401

    start = time.perf_counter()
    rows = compare_pairs([(Path(g), Path(m)) for g, m in spec["pairs"]])
    return {"seconds": time.perf_counter() - start, "rows": len(rows),
            "failed": sum(1 for r in rows if r.get("cmp_fail_reason"))}


PROBES = {"limit": probe_limit, "compare": probe_compare, "original": probe_original}


def main(argv: list[str]) -> int:
    name, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    print(json.dumps(PROBES[name](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
