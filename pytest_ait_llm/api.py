"""The one call the plugin and the CLI share: compare two dumps and write the CSV report."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .compare.engine import Progress, compare_dumps
from .compare.result import CompareResult
from .compare.tolerance import Tolerance
from .report import csv_report


def run_compare(golden, my, *, mapping_dir=None, tolerance: Tolerance | None = None, output_dir: str | Path = ".",
                tokens: Sequence[int] | None = None, workers: int | None = None, custom_metrics=(),
                write_csv: bool = True, max_bin_bytes: int | None = None,
                progress: Progress | None = None, allow_symlinks: bool | None = None,
                ranks: Sequence[str | int] | None = None) -> CompareResult:
    """Compare a torch dump (golden) with an ATB dump (my) and write ``ait_cmp_report_{TIMESTAMP}.csv``.

    ``golden``/``my`` are dump handles (TorchDump/AtbDump) or paths: a dump root, a rank/pid dir or a token dir.
    ``tolerance`` defaults to the dtype-aware defaults; ``tokens``/``ranks`` (rank dir name ``{device}_{pid}`` or
    device id) restrict what is compared. The CSV path is ``result.csv_path``.
    """
    result = compare_dumps(golden, my, mapping_dir=mapping_dir, tolerance=tolerance, tokens=tokens, workers=workers,
                           custom_metrics=custom_metrics, max_bin_bytes=max_bin_bytes, progress=progress,
                           allow_symlinks=allow_symlinks, ranks=ranks)
    if write_csv:
        result.csv_path = csv_report.write_csv(result, output_dir)
    return result
