"""The benchmark script a person reruns (`make bench`) still runs end to end and prints every row of its tables.

Runs ``bench/run_bench.py --smoke`` (a 2-layer Llama, dumps of a few hundred kB) in a subprocess. No timing is
asserted: the numbers of a smoke run mean nothing, only that every measurement ran and was reported.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench_results")
    work = tmp_path_factory.mktemp("bench_work")
    proc = subprocess.run([sys.executable, str(BENCH / "run_bench.py"), "--smoke", "--results", str(results),
                           "--work", str(work)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = list(results.glob("bench_smoke_*.md"))
    assert len(tables) == 1, sorted(p.name for p in results.iterdir())
    return proc, tables[0], work


def _row_labels() -> list[str]:
    """Every row's label but the base checkout's, which is measured only with --base."""
    sys.path.insert(0, str(BENCH))
    try:
        import run_bench
    finally:
        sys.path.remove(str(BENCH))
    return [label for key, _, label in run_bench.ROWS if key != "base"]


def test_every_measurement_has_a_row_for_every_size(smoke_run):
    proc, table, _ = smoke_run
    text = table.read_text()
    assert text in proc.stdout  # the same tables are printed and written
    sections = text.split("\n## ")
    for size in ("1x", "2x"):
        section = next(s for s in sections if s.startswith(f"{size}:"))
        for label in _row_labels():
            row = next((line for line in section.splitlines() if line.startswith(f"| {label} |")), None)
            assert row is not None, f"{size}: no row {label!r}"
            seconds = float(row.split("|")[2])
            assert seconds > 0, row
        for dump_row in ("forward, no hooks", "our dump cost", "plain torch.save of the same tensors"):
            assert f"| {dump_row}" in section, (size, dump_row)
        assert "Reports identical across executors and the CLI: yes." in section


def test_targets_and_size_sweep_are_reported(smoke_run):
    _, table, _ = smoke_run
    text = table.read_text()
    targets = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for target in ("within 2x of the limit", ">= 5x faster than the original", "CLI end to end >= 3x",
                   "within 2.5x of the limit", ">= 10x faster than the original end to end",
                   "peak memory <= largest pair + 512 MB", "time grows linearly with bytes"):
        assert target in targets, target
    sweep = text.split("## Size sweep", 1)[1]
    assert [line.split("|")[1].strip() for line in sweep.splitlines() if line.startswith("| ") and "x |" in line] \
        == ["1x", "2x"]


def test_machine_and_command_are_recorded_with_the_numbers(smoke_run):
    _, table, _ = smoke_run
    text = table.read_text()
    assert "- machine: " in text and "- command: `python bench/run_bench.py --smoke" in text
    assert "OPENBLAS_CORETYPE=" in text
    data = json.loads(table.with_suffix(".json").read_text())
    assert [s["factor"] for s in data["sizes"]] == [1, 2]
    for size in data["sizes"]:
        assert size["pairs"] > 0 and size["pair_bytes"] > 0
        for name, run in size["runs"].items():
            assert run["peak_mb"] > 0 and run["cpu_s"] > 0, name


def test_dumps_are_deleted_after_the_run(smoke_run):
    _, _, work = smoke_run
    assert list(work.iterdir()) == []
