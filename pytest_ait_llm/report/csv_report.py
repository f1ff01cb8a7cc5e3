"""The CSV report: the original tool's 22 columns first, in its order, then ours.

File name ``ait_cmp_report_{%Y%m%d%H%M%S}.csv`` as the original; when that name is taken (two runs in the same second,
parallel xdist workers) a ``_N`` suffix is added. The name is reserved with O_EXCL, so it never collides, and the
content is written to a temp file and renamed over the reservation (formats/safe_io.atomic_write), so a crash never leaves a half report.
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

from ..compare.exact import EXACT_COLUMNS
from ..compare.metrics import METRICS
from ..compare.output_check import OUTPUT_COLUMNS
from ..compare.result import CompareResult, Row
from ..formats.safe_io import atomic_write

AIT_COLUMNS = [
    "token_id", "data_id", "golden_data_path", "golden_dtype", "golden_shape", "golden_max_value",
    "golden_min_value", "golden_mean_value", "my_data_path", "my_dtype", "my_shape", "my_max_value",
    "my_min_value", "my_mean_value", *METRICS, "cmp_fail_reason",
]
OUR_COLUMNS = [
    "golden_op_type", "my_op_type", "torch_module", "atb_op", "atb_op_name", "rank", "execution_order", "status",
    "passed", "first_divergence", "propagated", "breached_limits",
    "input_cosine_similarity", "input_relative_euclidean_distance",
    "effective_cosine_similarity", "effective_relative_euclidean_distance",
    "golden_nan_count", "golden_inf_count", "my_nan_count", "my_inf_count", "mapping_rule", "note",
]
#: Appended after ours: the exact comparison of integer tensors, and the output check's per-step values (its rows
#: come first, status "output_check", see compare/output_check.py). Values live in Row.extra.
INT_AND_OUTPUT_COLUMNS = [*EXACT_COLUMNS, *OUTPUT_COLUMNS]


def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return ""
    return repr(float(x)) if isinstance(x, float) else str(x)


def _dtype(name: str) -> str:
    return f"torch.{name}" if name else ""


def _side(stats) -> list[str]:
    if stats is None:
        return ["", "", "", "", ""]
    return [_dtype(stats.dtype), str(list(stats.shape)), _num(stats.max), _num(stats.min), _num(stats.mean)]


def _flag(value) -> str:
    return "" if value is None else str(bool(value))


def row_values(row: Row, custom_names: list[str]) -> list[str]:
    m = row.metrics
    g_stats, m_stats = (m.golden, m.my) if m is not None else (None, None)
    inputs = row.input_metrics or {}
    values = [
        "" if row.token_id is None else str(row.token_id), str(row.data_id),
        row.golden_path, *_side(g_stats), row.my_path, *_side(m_stats),
        *[_num(m.values.get(name)) if m is not None else "" for name in METRICS],
        row.reason,
        row.golden_op_type, row.my_op_type, row.torch_module, row.atb_op, row.atb_op_name, row.rank,
        "" if row.order < 0 else str(row.order), row.status,
        _flag(row.passed) if row.status in ("compared", "output_check") else "",
        str(row.first_divergence), str(row.propagated), "; ".join(str(b) for b in row.breaches),
        _num(inputs.get("cosine_similarity")), _num(inputs.get("relative_euclidean_distance")),
        _num(row.effective.get("cosine_similarity")), _num(row.effective.get("relative_euclidean_distance")),
        _num(g_stats.nan_count) if g_stats else "", _num(g_stats.inf_count) if g_stats else "",
        _num(m_stats.nan_count) if m_stats else "", _num(m_stats.inf_count) if m_stats else "",
        row.rule, row.note,
        *[_num(row.extra.get(name)) for name in INT_AND_OUTPUT_COLUMNS],
    ]
    custom = m.custom if m is not None else {}
    values.extend(_num(custom.get(name)) if not isinstance(custom.get(name), str) else custom[name]
                  for name in custom_names)
    return values


def custom_columns(result: CompareResult) -> list[str]:
    names: list[str] = []
    for row in result.rows:
        if row.metrics is not None:
            for name in row.metrics.custom:
                if name not in names:
                    names.append(name)
    return names


def reserve_report_path(output_dir: str | Path, prefix: str = "ait_cmp_report_", suffix: str = ".csv") -> Path:
    """Create (exclusively) and return a new, never-before-used report path in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    for n in range(100000):
        path = out / f"{prefix}{stamp}{'' if n == 0 else f'_{n}'}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue
    raise OSError(f"{out}: no free report name for {prefix}{stamp}")


def write_csv(result: CompareResult, output_dir: str | Path, extra_columns=None) -> Path:
    """Write the report for ``result`` into ``output_dir`` and return its path.

    UTF-8, with any character UTF-8 cannot hold written as its backslash escape (a lone surrogate from a topology's
    JSON, a file name in GBK bytes read on a UTF-8 system shows as ``\\udcd6``): a name never costs the report.
    ``extra_columns``: ``(names, row -> cells)`` appended after all other columns (the baseline's, see
    report/baseline.py).
    """
    path = reserve_report_path(output_dir)
    custom = custom_columns(result)
    extra_names, extra_cells = extra_columns or ([], lambda row: [])

    def write(temp: Path) -> None:
        with open(temp, "x", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            writer = csv.writer(fh)
            writer.writerow(AIT_COLUMNS + OUR_COLUMNS + INT_AND_OUTPUT_COLUMNS + custom + list(extra_names))
            for row in result.rows:
                writer.writerow(row_values(row, custom) + list(extra_cells(row)))

    try:
        return atomic_write(path, write)
    except BaseException:
        path.unlink(missing_ok=True)  # the empty reservation we made above: nothing of the user's
        raise


def dataframe(result: CompareResult):
    """The report as a pandas DataFrame, same columns and values as the CSV (pandas imported only here)."""
    import pandas as pd

    custom = custom_columns(result)
    return pd.DataFrame([row_values(row, custom) for row in result.rows],
                        columns=AIT_COLUMNS + OUR_COLUMNS + INT_AND_OUTPUT_COLUMNS + custom)
