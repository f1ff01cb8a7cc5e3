"""The one call the plugin and the CLI share: compare two dumps and write the CSV report."""
from __future__ import annotations

from pathlib import Path

from .compare.engine import compare_dumps
from .compare.plan import CompareOptions
from .compare.result import CompareResult
from .report import csv_report


def run_compare(golden, my, *, output_dir: str | Path = ".", write_csv: bool = True,
                options: CompareOptions | None = None, **kwargs) -> CompareResult:
    """Compare a torch dump (golden) with an ATB dump (my) and write ``ait_cmp_report_{TIMESTAMP}.csv``.

    ``golden``/``my`` are dump handles (TorchDump/AtbDump) or paths: a dump root, a rank/pid dir or a token dir.
    What to compare is ``options``, or the keyword arguments of :meth:`CompareOptions.from_kwargs`
    (``mapping_dir``, ``tolerance``, ``tokens``, ``ranks``, ``workers``, ``custom_metrics``, ``max_bin_bytes``,
    ``progress``, ``allow_symlinks``). The CSV path is ``result.csv_path``.
    """
    result = compare_dumps(golden, my, options or CompareOptions.from_kwargs(**kwargs))
    if write_csv:
        result.csv_path = csv_report.write_csv(result, output_dir)
    return result
