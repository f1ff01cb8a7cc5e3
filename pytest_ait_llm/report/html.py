"""The pieces of a comparison that go into an HTML report: the CSV beside it, a table of the worst ops, the plot.

This module produces files and HTML strings, and (:func:`pytest_html_extras`, importing pytest-html only there)
wraps them into pytest-html ``extras``. Everything returned is plain data, so it survives being sent from an xdist
worker. Colours are set inline on every cell: pytest-html greys the text of its extras, and grey on red cannot be
read.
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

__all__ = ["attach_csv", "error_plot_img", "pytest_html_extras", "report_fragment", "worst_ops_table"]

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


#: Dark text on light backgrounds (contrast >= 7:1): breached rows light red, the root cause a stronger red.
_TEXT, _HEAD_BG, _BREACH_BG, _FIRST_BG = "#111", "#e8e8e8", "#fde4e4", "#f6b9b9"
_CELL = f"color:{_TEXT};padding:3px 6px;border:1px solid #bbb;vertical-align:top"

LEGEND = (
    "<b>RED</b>: relative euclidean distance, ‖my − golden‖ / ‖golden‖ (0 is identical). "
    "<b>RED added</b>: the part of RED this op added to the error already in its inputs. "
    "<b>(added)</b> after a limit: the limit was applied to the added error (mode=\"added\", the default), "
    "so an op is not blamed for the error it received. "
    "Light red rows breach a limit; the darker row is the <b>first divergence</b>, the root cause: later breaches "
    "are marked propagated in the CSV."
)


def worst_ops_table(result: Any, n: int = 10) -> str:
    """An HTML table: the first divergence (the root cause) on top, then the worst other compared ops, then a
    legend of its abbreviations."""
    first = result.first_divergence
    rows = [r for r in result.worst(n) if r is not first]
    if first is not None:
        rows = [first] + rows[: n - 1]
    if not rows:
        return f'<p style="color:{_TEXT}">no compared op pairs</p>'
    titles = ("order", "token", "ATB op", "torch module", "cos", "RED", "RED added", "verdict", "breached limits",
              "")
    head = "<tr>" + "".join(f'<th style="{_CELL};background:{_HEAD_BG};text-align:left">{t}</th>'
                            for t in titles) + "</tr>"
    ranked = len({r.rank for r in result.compared}) > 1
    body = []
    for r in rows:
        is_first = getattr(r, "first_divergence", False)
        background = _FIRST_BG if is_first else _BREACH_BG if getattr(r, "breached", False) else "#fff"
        style = f"{_CELL};background:{background}"
        breaches = "; ".join(str(b) for b in getattr(r, "breaches", ()) or ())
        token = escape(str(r.token_id)) + (f"<br><small>{escape(r.rank)}</small>" if ranked else "")  # TP: the rank
        cells = (escape(str(r.order)), token,
                 f"{escape(r.atb_op)}<br><small>{escape(r.my_op_type)}</small>",
                 f"{escape(r.torch_module)}<br><small>{escape(r.golden_op_type)}</small>",
                 _fmt(_metric(r, _COS), 8), _fmt(_metric(r, _RED), 3),
                 _fmt((getattr(r, 'effective', None) or {}).get(_RED, math.nan), 3),
                 escape(_verdict(r)), escape(breaches), "<b>first divergence</b>" if is_first else "")
        body.append("<tr>" + "".join(f'<td style="{style}">{c}</td>' for c in cells) + "</tr>")
    return (f'<table class="ait-llm-worst-ops" style="border-collapse:collapse;color:{_TEXT};background:#fff">'
            f'<caption style="color:{_TEXT};text-align:left;font-weight:bold;padding:4px 0">'
            f"worst ops (of {len(result.compared)} compared pairs)</caption>"
            f"<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
            f'<p class="ait-llm-legend" style="color:{_TEXT};max-width:70em;font-size:90%">{LEGEND}</p>')


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
        if len({r.rank for r in result.compared}) > 1:
            text += f" [{first.rank}]"
    return text


def report_fragment(result: Any, *, png_path: str | Path | None = None, csv_href: str | None = None,
                    n: int = 10) -> str:
    """The HTML a report shows for one comparison: summary line, CSV link, worst-ops table, error plot."""
    parts = [f'<div class="ait-llm" style="color:{_TEXT}"><p><b>{escape(_summary_line(result))}</b></p>']
    output = getattr(result, "output", None)  # the output check (logits, greedy tokens) comes first
    lines = output.lines() if output is not None else []
    if lines:
        parts.append(f'<pre class="ait-llm-output" style="color:{_TEXT}">{escape(chr(10).join(lines))}</pre>')
    if csv_href:  # the link text is the name of the file it opens
        parts.append(f'<p>per-op CSV: <a href="{escape(csv_href)}" style="color:#0645ad">'
                     f'{escape(Path(csv_href).name)}</a></p>')
    parts.append(worst_ops_table(result, n))
    if png_path is not None:
        parts.append(error_plot_img(result, png_path))
    parts.append("</div>")
    return "".join(parts)


def pytest_html_extras(results: list, report_dir: str | Path, name: str) -> list:
    """pytest-html ``extras`` for a test's comparisons: per comparison a link to a copy of its CSV beside the
    report (the link text is the copy's file name: what the link opens) and :func:`report_fragment`.

    ``results`` holds ``(CompareResult, output_dir)`` per ``compare_ops`` call of the test.
    """
    from pytest_html import extras as html_extra

    extras = []
    for index, (result, out_dir) in enumerate(results, start=1):
        href = None
        if result.csv_path is not None:
            try:
                href = attach_csv(result.csv_path, report_dir, f"{name}-{index}")
            except OSError:  # a report that cannot carry the CSV still shows the table and the plot
                href = None
            if href is not None:
                extras.append(html_extra.url(href, name=f"ait-llm CSV {index}: {Path(href).name}"))
        png = Path(out_dir) / (Path(result.csv_path).stem + ".png" if result.csv_path else "error_profile.png")
        extras.append(html_extra.html(report_fragment(result, png_path=png, csv_href=href)))
    return extras
