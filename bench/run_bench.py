"""Benchmark `ait-llm compare` against the speed of reading the dumps and against the original tool's approach.

    python bench/run_bench.py            # default: the >= 1 GB case, sizes 1x 2x 4x (~7 min on the 2-core VM)
    python bench/run_bench.py --quick    # small sizes, under 2 min
    make bench                           # the default

For each size it builds the dumps (an HF Llama forward under our hooks, and its ATB-layout bf16 mirror), then
measures, on the same files and each in its own process:

- limit: every paired file read once, one pass over it (np.sum over a memory map of its payload); and the same
  over every file the comparison reads (the report's pairs and the input pairs that judge the error an op adds);
- ours, compare phase: ``run_compare`` after imports, with forked worker processes (the default), threads, serial;
- ours, CLI: ``python -m pytest_ait_llm compare -gp G -mp M -o OUT`` end to end, start-up included;
- base (``--base CHECKOUT``): another checkout's compare phase (e.g. a git worktree of an older commit with its
  compiled pass built), so that two engines are compared in one run on a machine whose speed drifts;
- original: the original tool's approach (whole-file reads, float32 copies, one pass per metric);
- the torch-side dump: a forward under our hooks vs the plain forward, against ``torch.save`` of the same tensors.

The package's bytecode is compiled first, as a pip install leaves it (with PYTHONDONTWRITEBYTECODE set, every
process would otherwise compile the sources again: ~0.25 s of each end-to-end run on the 2-core VM).
The tables go to stdout and to ``bench/results/bench_{mode}_{timestamp}.md`` (plus a .json with every number).
Dumps live in a temporary directory (``--work``) and are deleted after each size; the largest default size
needs about 9 GB of disk while it exists.
"""
from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from bench_dumps import ModelShape, make_dumps  # noqa: E402
from bench_measure import Measured, run_measured  # noqa: E402

#: Modes: the model shape at 1x and the size factors (1x, 2x, 4x scale the sequence length).
MODES = {
    "default": (ModelShape(hidden=1024, layers=16, intermediate=2816, heads=16, kv_heads=4, vocab=32000, seq=512),
                (1, 2, 4)),
    "quick": (ModelShape(hidden=512, layers=12, intermediate=1408, heads=8, kv_heads=2, vocab=32000, seq=64),
              (1, 2, 4)),
    # The smallest mode exists for the smoke test: every row of every table, in seconds.
    "smoke": (ModelShape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=128, seq=16), (1, 2)),
}

#: Our compare phase is measured with each executor (AIT_LLM_EXECUTOR); "processes" is the engine's default.
EXECUTORS = ("processes", "threads", "serial")
MB = 1024 * 1024
GB = 1e9


# ---------------------------------------------------------------------------------------------------- measuring

def list_pairs(golden: Path, my: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(output pairs, input pairs), without comparing, from the engine's plan: output pairs are the report's rows,
    input pairs judge each op on the error it adds."""
    from pytest_ait_llm.compare.plan import CompareOptions, input_pairs, make_plan
    from pytest_ait_llm.formats.atb_layout import open_atb_dump
    from pytest_ait_llm.formats.torch_layout import open_torch_dump

    options = CompareOptions()
    plan = make_plan(open_torch_dump(golden), open_atb_dump(my), options)
    tasks = [t for t in plan.tasks if not t.skip]
    outputs = [(str(t.golden), str(t.my)) for t in tasks]
    inputs = [(str(g), str(m)) for t in tasks for g, _, m, _ in input_pairs(t, options)]
    return outputs, inputs


def _bytes(pairs) -> int:
    return sum(os.path.getsize(f) for pair in pairs for f in pair)


def _probe(name: str, spec: dict, work: Path, env_extra: dict | None = None) -> Measured:
    spec_path = work / f"spec_{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **(env_extra or {}))
    m = run_measured([sys.executable, str(BENCH / "bench_probes.py"), name, str(spec_path)], env=env)
    if m.returncode != 0 or "seconds" not in m.report:
        raise RuntimeError(f"probe {name} failed ({m.returncode}): {m.stderr.strip()[-2000:]}")
    return m


def _cli(golden: Path, my: Path, out: Path) -> Measured:
    out.mkdir(parents=True, exist_ok=True)
    m = run_measured([sys.executable, "-m", "pytest_ait_llm", "compare", "-gp", str(golden), "-mp", str(my),
                      "-o", str(out)])
    if m.returncode != 0:
        raise RuntimeError(f"ait-llm compare failed ({m.returncode}): {m.stderr.strip()[-2000:]}")
    return m


def drop_from_page_cache(root: Path) -> int:
    """Evict every file under ``root`` from the page cache, so that the next run reads them from disk. Returns the
    number of files. Only these files' pages go: each is flushed (a freshly written page is dirty and cannot be
    dropped) and then ``posix_fadvise`` DONTNEED drops its clean pages; nothing else on the machine is touched."""
    count = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            count += 1
    return count


def _best(runs: list[Measured]) -> Measured:
    """The fastest of repeated runs (least disturbed by other load), with the highest peak memory of them all."""
    best = min(runs, key=lambda m: m.report.get("seconds", m.wall_s))
    return dataclasses.replace(best, maxrss_mb=max(m.maxrss_mb for m in runs),
                               tree_rss_mb=max(m.tree_rss_mb for m in runs))


def measure_size(shape: ModelShape, factor: int, work: Path, *, original: bool, repeat: int, cold: bool,
                 log, base: Path | None = None) -> dict:
    size_dir = work / f"x{factor}"
    log(f"[{factor}x] building dumps: {shape.describe()}")
    golden, my, times = make_dumps(shape, size_dir)
    outputs, inputs = list_pairs(golden, my)
    largest_pair = max(_bytes([p]) for p in outputs + inputs)
    rec: dict = {
        "factor": factor, "shape": dataclasses.asdict(shape), "dump_bytes": times.golden_bytes + times.my_bytes,
        "golden_bytes": times.golden_bytes, "my_bytes": times.my_bytes, "files": times.files,
        "pairs": len(outputs), "pair_bytes": _bytes(outputs), "input_pairs": len(inputs),
        "input_pair_bytes": _bytes(inputs), "largest_pair_bytes": largest_pair,
        "dump": dataclasses.asdict(times) | {"dump_s": times.dump_s},
    }
    spec = {"pairs": outputs}
    log(f"[{factor}x] {len(outputs)} pairs, {rec['pair_bytes'] / GB:.2f} GB compared")
    if not cold:
        _probe("limit", spec, size_dir)  # warm-up: every paired file is now in the page cache
    jobs = {"limit": lambda: _probe("limit", spec, size_dir),
            "limit_all": lambda: _probe("limit", {"pairs": outputs + inputs}, size_dir)}
    for executor in EXECUTORS:
        out = size_dir / f"out_{executor}"
        jobs[f"compare_{executor}"] = lambda out=out, executor=executor: _probe(
            "compare", {"golden": str(golden), "my": str(my), "out": str(out)}, size_dir,
            {"AIT_LLM_EXECUTOR": executor})
    jobs["cli"] = lambda: _cli(golden, my, size_dir / "out_cli")
    if base:
        base_spec = {"golden": str(golden), "my": str(my), "out": str(size_dir / "out_base")}
        jobs["base"] = lambda: _probe("compare", base_spec, size_dir,
                                      {"PYTHONPATH": str(base), "AIT_LLM_EXECUTOR": "processes"})
    if original:
        jobs["original"] = lambda: _probe("original", spec, size_dir)
    runs: dict[str, list[Measured]] = {k: [] for k in jobs}
    for i in range(repeat):  # interleaved, so that a burst of outside load does not hit one measurement only
        for key, job in jobs.items():
            log(f"[{factor}x] {key} ({i + 1}/{repeat})")
            if cold:
                drop_from_page_cache(size_dir)
            runs[key].append(job())
    best = {k: _best(v) for k, v in runs.items()}
    rec["runs"] = {k: {"seconds": m.report.get("seconds", m.wall_s), "wall_s": m.wall_s, "cpu_s": m.cpu_s,
                       "maxrss_mb": m.maxrss_mb, "tree_rss_mb": m.tree_rss_mb, "peak_mb": m.peak_mb,
                       "all_seconds": [x.report.get("seconds", x.wall_s) for x in runs[k]]}
                   for k, m in best.items()}
    rec["identical_csv"] = _same_csv(size_dir, EXECUTORS + ("cli",))
    shutil.rmtree(size_dir, ignore_errors=True)
    return rec


def _same_csv(size_dir: Path, names) -> bool:
    """Whether every run wrote the same report (deterministic, in the same order, whatever the executor)."""
    texts = set()
    for name in names:
        for csv in (size_dir / f"out_{name}").glob("*.csv"):
            texts.add(csv.read_bytes())
    return len(texts) == 1


# ---------------------------------------------------------------------------------------------------- reporting

def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    commit = _commit(REPO)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "numpy": numpy.__version__, "torch": torch.__version__, "commit": commit,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)")}


ROWS = [  # (run key, which time, label)
    ("limit", "seconds", "limit: read every paired file once, one pass"),
    ("limit_all", "seconds", "limit over every file the comparison reads (+ input pairs)"),
    ("compare_processes", "seconds", "ours, compare phase (processes, the default)"),
    ("compare_threads", "seconds", "ours, compare phase (threads)"),
    ("compare_serial", "seconds", "ours, compare phase (serial)"),
    ("cli", "wall_s", "ours, `ait-llm compare` CLI end to end"),
    ("base", "seconds", "base checkout, compare phase (processes)"),
    ("original", "seconds", "original approach, compare phase"),
    ("original", "wall_s", "original approach, end to end (process)"),
]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def render(result: dict) -> str:
    mach, sizes = result["machine"], result["sizes"]
    lines = [f"# ait-llm compare benchmark ({result['mode']})", "",
             f"- when: {result['started']}, took {result['took_s']:.0f} s; load average before/after: "
             f"{result['load_before']} / {result['load_after']}",
             f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; Python {mach['python']}, "
             f"numpy {mach['numpy']}, torch {mach['torch']}; commit {mach['commit']}",
             f"- OPENBLAS_CORETYPE={mach['OPENBLAS_CORETYPE']}, OPENBLAS_L2_SIZE={mach['OPENBLAS_L2_SIZE']}",
             f"- command: `{result['command']}`"
             + (f"; base checkout {result['base']} at commit {result['base_commit']}" if result.get("base") else ""),
             f"- model: {sizes[0]['shape_text']} at 1x; 2x/4x double/quadruple the sequence", "",
             "Times are wall seconds: a compare phase is the probe's own clock after its imports, an end-to-end row "
             "the whole process. CPU s and peak MB are always the whole process (with its workers); peak MB is the "
             "larger of ru_maxrss and the memory of the process tree sampled every 100 ms (see bench/README.md). "
             + ("Dump files were evicted from the page cache before every run (--cold): read from disk. "
                if result.get("cold") else "Dump files are in the page cache (warm), as right after a dump. ")
             + "Each measurement ran --repeat times, interleaved, and the fastest run is shown.", ""]
    for s in sizes:
        runs = s["runs"]
        limit = runs["limit"]["seconds"]
        lines += [f"## {s['factor']}x: dump {s['dump_bytes'] / GB:.2f} GB, {s['pairs']} pairs = "
                  f"{s['pair_bytes'] / GB:.2f} GB compared (+{s['input_pairs']} input pairs of "
                  f"{s['input_pair_bytes'] / GB:.2f} GB read to judge added error); largest pair "
                  f"{s['largest_pair_bytes'] / MB:.0f} MB", "",
                  "| measurement | seconds | vs limit | CPU s | peak MB | GB/s |", "|---|---:|---:|---:|---:|---:|"]
        for key, field, label in ROWS:
            if key not in runs:
                continue
            r = runs[key]
            t = r[field]
            lines.append(f"| {label} | {t:.2f} | {_ratio(t, limit)} | {r['cpu_s']:.2f} | "
                         f"{r['peak_mb']:.0f} | {s['pair_bytes'] / GB / t:.2f} |")
        d = s["dump"]
        lines += ["", f"Reports identical across executors and the CLI: {'yes' if s['identical_csv'] else 'NO'}.", "",
                  "| torch-side dump | seconds |", "|---|---:|",
                  f"| forward, no hooks | {d['forward_s']:.2f} |",
                  f"| forward under our hooks (writes {d['golden_bytes'] / GB:.2f} GB) | {d['hooked_forward_s']:.2f} |",
                  f"| our dump cost (hooked - plain) | {d['dump_s']:.2f} |",
                  f"| plain torch.save of the same tensors | {d['plain_save_s']:.2f} |",
                  f"| ratio ours / torch.save | {_ratio(d['dump_s'], d['plain_save_s'])} |", ""]
    lines += _targets(sizes)
    lines += _sweep(sizes)
    return "\n".join(lines) + "\n"


def _sweep(sizes) -> list[str]:
    lines = ["## Size sweep: time per GB compared (linear growth = flat column)", "",
             "| size | GB compared | limit s | ours compare s | ours CLI s | original s | ours s/GB | original s/GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        r, gb = s["runs"], s["pair_bytes"] / GB
        orig = r.get("original", {}).get("seconds", float("nan"))
        lines.append(f"| {s['factor']}x | {gb:.2f} | {r['limit']['seconds']:.2f} | "
                     f"{r['compare_processes']['seconds']:.2f} | {r['cli']['seconds']:.2f} | {orig:.2f} | "
                     f"{r['compare_processes']['seconds'] / gb:.2f} | {orig / gb:.2f} |")
    return lines + [""]


def _targets(sizes) -> list[str]:
    lines = ["## Targets (issues 6 and 13)", "", "| size | target | measured | met |", "|---|---|---:|---|"]
    for s in sizes:
        r = s["runs"]
        ours, limit, cli = r["compare_processes"]["seconds"], r["limit"]["seconds"], r["cli"]["seconds"]
        f = f"{s['factor']}x"
        lines.append(f"| {f} | compare phase within 2x of the limit | {ours / limit:.2f}x | "
                     f"{'yes' if ours <= 2 * limit else 'no'} |")
        if "original" in r:
            orig = r["original"]
            lines.append(f"| {f} | compare >= 5x faster than the original | {orig['seconds'] / ours:.2f}x | "
                         f"{'yes' if orig['seconds'] >= 5 * ours else 'no'} |")
            lines.append(f"| {f} | CLI end to end >= 3x faster than the original end to end | "
                         f"{orig['wall_s'] / cli:.2f}x | {'yes' if orig['wall_s'] >= 3 * cli else 'no'} |")
        lines.append(f"| {f} | issue 13: compare phase within 2.5x of the limit | {ours / limit:.2f}x | "
                     f"{'yes' if ours <= 2.5 * limit else 'no'} |")
        if "original" in r:
            e2e = r["original"]["wall_s"]
            lines.append(f"| {f} | issue 13: >= 10x faster than the original end to end | {e2e / cli:.2f}x | "
                         f"{'yes' if e2e >= 10 * cli else 'no'} |")
        if "base" in r:
            lines.append(f"| {f} | compare phase against the base checkout (A/base) | "
                         f"{ours / r['base']['seconds']:.2f} | - |")
        budget = s["largest_pair_bytes"] / MB + 512
        peak = max(r[k]["peak_mb"] for k in ("compare_processes", "cli"))
        lines.append(f"| {f} | peak memory <= largest pair + 512 MB ({budget:.0f} MB) | {peak:.0f} MB | "
                     f"{'yes' if peak <= budget else 'no'} |")
    if len(sizes) > 1:
        # Linear (or better): seconds per GB at a larger size may not exceed the smallest size's by more than 25 %.
        # Below 1 it is sublinear: fixed costs (opening the dumps, pairing) weigh less as the dump grows.
        per_gb = [s["runs"]["compare_processes"]["seconds"] / (s["pair_bytes"] / GB) for s in sizes]
        growth = max(per_gb[1:]) / per_gb[0]
        lines.append(f"| all | time grows linearly with bytes (largest s/GB over the {sizes[0]['factor']}x s/GB) | "
                     f"{growth:.2f} | {'yes' if growth <= 1.25 else 'no'} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------- main

def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", dest="mode", const="quick", help="small sizes, < 2 min")
    group.add_argument("--smoke", action="store_const", dest="mode", const="smoke",
                       help="the tiniest dumps: checks the script end to end in seconds (used by the test suite)")
    parser.add_argument("--sizes", help="size factors, e.g. 1,2,4 (default: the mode's)")
    parser.add_argument("--seq", type=int, help="sequence length at 1x (default: the mode's)")
    parser.add_argument("--repeat", type=int, help="runs of each measurement, the fastest kept (default: 2, quick/"
                        "smoke 1)")
    parser.add_argument("--no-original", action="store_true", help="skip the original approach")
    parser.add_argument("--cold", action="store_true",
                        help="evict the dump files from the page cache before every measured run (read from disk)")
    parser.add_argument("--work", type=Path, help="where dumps are built (default: a temporary directory)")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="where the tables are written")
    parser.add_argument("--base", type=Path, help="another checkout whose compare phase is measured beside ours")
    parser.set_defaults(mode="default")
    args = parser.parse_args(argv)

    shape, factors = MODES[args.mode]
    if args.seq:
        shape = dataclasses.replace(shape, seq=args.seq)
    if args.sizes:
        factors = tuple(int(x) for x in args.sizes.split(","))

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    compileall.compile_dir(REPO / "pytest_ait_llm", quiet=1)  # as installed: no source compiled in a timed process
    if args.base:
        compileall.compile_dir(args.base / "pytest_ait_llm", quiet=1)
    started = time.perf_counter()
    result = {"mode": args.mode, "cold": args.cold, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python bench/run_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "load_before": _load(), "sizes": []}
    if args.base:
        result["base"], result["base_commit"] = str(args.base), _commit(args.base)
    work = Path(tempfile.mkdtemp(prefix="ait_llm_bench_", dir=args.work))
    try:
        for factor in factors:
            sized = dataclasses.replace(shape, seq=shape.seq * factor)
            rec = measure_size(sized, factor, work, original=not args.no_original, log=log, cold=args.cold,
                               base=args.base, repeat=args.repeat or (2 if args.mode == "default" else 1))
            rec["shape_text"] = dataclasses.replace(shape).describe()
            result["sizes"].append(rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["took_s"] = time.perf_counter() - started
    result["load_after"] = _load()
    text = render(result)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    md = args.results / f"bench_{args.mode}_{stamp}.md"
    md.write_text(text)
    md.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)
    log(f"written {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
