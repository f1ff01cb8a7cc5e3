"""The pieces of a comparison that go into an HTML report: the CSV beside it, a table of the worst ops, the plot.

Independent of pytest-html: this module produces files and HTML strings; the plugin wraps them into pytest-html
``extras``. Everything returned is a plain string, so it survives being sent from an xdist worker.
"""
from __future__ import annotations

import base64
import math
import os
import shutil
import tempfile
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["attach_csv", "error_plot_img", "report_fragment", "worst_ops_table"]

ASSET_DIR = "ait_llm"  # beside the HTML report: copies of the per-op CSVs
_COS = "cosine_similarity"
_RED = "relative_euclidean_distance"


def attach_csv(csv_path: str | Path, report_dir: str | Path, name: str) -> str:
    """Copy the CSV into ``{report_dir}/ait_llm/`` under a fresh name; returns its href relative to the report.

    The name is ``{name}-{random}.csv``, created atomically, so tests of parallel xdist workers never collide.
    """
    target_dir = Path(report_dir) / ASSET_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, target = tempfile.mkstemp(prefix=f"{name}-", suffix=".csv", dir=target_dir)
    os.close(fd)
    shutil.copyfile(csv_path, target)
    os.chmod(target, 0o644)  # mkstemp makes it 0600; the report is meant to be read
    return f"{ASSET_DIR}/{Path(target).name}"


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _metric(row: Any, name: str) -> float:
    metrics = getattr(row, "metrics", None)
    values = getattr(metrics, "values", None) or {}
    return values.get(name, math.nan)


def _verdict(row: Any) -> str:
    status = getattr(row, "status", "compared")
    if status not in ("compared",):
        return status.replace("_", " ")
    return "FAIL" if getattr(row, "breached", False) else "pass"


def worst_ops_table(result: Any, n: int = 10) -> str:
    """An HTML table: the first divergence (the root cause) on top, then the worst other compared ops."""
    first = result.first_divergence
    rows = [r for r in result.worst(n) if r is not first]
    if first is not None:
        rows = [first] + rows[: n - 1]
    if not rows:
        return "<p>no compared op pairs</p>"
    head = ("<tr><th>order</th><th>token</th><th>ATB op</th><th>torch module</th><th>cos</th><th>RED</th>"
            '<th title="the error this op added to the error of its inputs: what mode=&quot;added&quot; judges">'
            "RED added</th><th>verdict</th><th>breached limits</th><th></th></tr>")
    body = []
    for r in rows:
        is_first = getattr(r, "first_divergence", False)
        style = ' style="background:#fdd"' if getattr(r, "breached", False) else ""
        breaches = "; ".join(str(b) for b in getattr(r, "breaches", ()) or ())
        body.append(
            f"<tr{style}><td>{escape(str(r.order))}</td><td>{escape(str(r.token_id))}</td>"
            f"<td>{escape(r.atb_op)}<br><small>{escape(r.my_op_type)}</small></td>"
            f"<td>{escape(r.torch_module)}<br><small>{escape(r.golden_op_type)}</small></td>"
            f"<td>{_fmt(_metric(r, _COS), 8)}</td><td>{_fmt(_metric(r, _RED), 3)}</td>"
            f"<td>{_fmt((getattr(r, 'effective', None) or {}).get(_RED, math.nan), 3)}</td>"
            f"<td>{escape(_verdict(r))}</td><td>{escape(breaches)}</td>"
            f"<td>{'<b>first divergence</b>' if is_first else ''}</td></tr>")
    return (f'<table class="ait-llm-worst-ops" border="1" cellpadding="3" style="border-collapse:collapse">'
            f"<caption>worst ops (of {len(result.compared)} compared pairs)</caption>"
            f"<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")


def error_plot_img(result: Any, png_path: str | Path) -> str:
    """An ``<img>`` with the error-profile PNG as a data URI (the report stays one portable file); or a note
    saying why there is no picture (matplotlib missing, drawing failed): a report must not fail a test run."""
    try:
        from .plot import plot_error_profile

        png = plot_error_profile(result, png_path)
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    except ImportError as err:
        return f"<p>no error plot: matplotlib is not installed ({escape(str(err))})</p>"
    except Exception as err:  # noqa: BLE001 - reporting must never break the run
        return f"<p>no error plot: {escape(type(err).__name__)}: {escape(str(err))}</p>"
    return (f'<img class="ait-llm-error-profile" alt="per-op error along execution order" '
            f'src="data:image/png;base64,{data}"/>')


def _summary_line(result: Any) -> str:
    unpaired_atb = sum(1 for u in getattr(result, "unpaired", ()) if getattr(u, "side", "") == "atb")
    verdict = "passed" if result.passed else "FAILED"
    text = (f"ait-llm: {verdict} — {len(result.compared)} pairs compared over {len(result.tokens)} token(s), "
            f"{len(result.breaches)} breach(es), {unpaired_atb} unpaired ATB op(s)")
    first = result.first_divergence
    if first is not None:
        text += f"; first divergence: {first.atb_op} ↔ {first.torch_module} (token {first.token_id})"
    return text


def report_fragment(result: Any, *, png_path: str | Path | None = None, csv_href: str | None = None,
                    n: int = 10) -> str:
    """The HTML a report shows for one comparison: summary line, CSV link, worst-ops table, error plot."""
    parts = [f'<div class="ait-llm"><p><b>{escape(_summary_line(result))}</b></p>']
    output = getattr(result, "output", None)  # the output check (logits, greedy tokens) comes first
    if output is not None and output.lines():
        parts.append(f'<pre class="ait-llm-output">{escape(chr(10).join(output.lines()))}</pre>')
    if csv_href:
        parts.append(f'<p>per-op CSV: <a href="{escape(csv_href)}">{escape(Path(csv_href).name)}</a></p>')
    parts.append(worst_ops_table(result, n))
    if png_path is not None:
        parts.append(error_plot_img(result, png_path))
    parts.append("</div>")
    return "".join(parts)
