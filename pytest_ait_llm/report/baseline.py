"""The baseline file: the accepted per-op metrics of one comparison, as text a reviewer can diff.

JSON, one op per line, ops in execution order, keys in a fixed order, every metric rounded to DIGITS significant
digits (NaN as null, infinities as "inf"/"-inf"), so an unchanged port rewrites it byte for byte and a pull request
shows the ops that moved. Metrics only, never tensors: a 12-layer model with two tokens is ~150 KB.

Reading is strict: anything hand-edited wrongly or corrupt is a BaselineError naming the file and the entry;
a bad baseline must never let a test pass. Writing is atomic (a unique temp file renamed over the target), so
parallel pytest-xdist workers never leave or read a half-written file.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from ..compare.metrics import METRICS
from ..compare.regression import (Baseline, BaselineError, BaselineOp, RegressionResult, RegressionRules,
                                  baseline_from_result, check_regression)
from ..formats.atomic import atomic_write_text

FORMAT = "pytest-ait-llm baseline"
FORMAT_VERSION = 1
_OP_FIELDS = ("token", "rank", "order", "atb_op", "torch_module", "my_op_type", "golden_op_type", "golden_dtype",
              "my_dtype", "shape", "metrics", "added", "bounds")
#: Largest baseline file read (a real model with thousands of ops and many tokens stays far below).
MAX_BYTES = 256 * 1024**2


def _number(value: float) -> Any:
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _op_line(op: BaselineOp) -> str:
    metrics = {k: _number(op.metrics[k]) for k in METRICS if k in op.metrics}
    bounds = {k: _number(op.bounds[k]) for k in METRICS if k in op.bounds}
    added = {k: _number(op.added[k]) for k in METRICS if k in op.added}
    entry = {"token": op.token, "rank": op.rank, "order": op.order, "atb_op": op.atb_op,
             "torch_module": op.torch_module, "my_op_type": op.my_op_type, "golden_op_type": op.golden_op_type,
             "golden_dtype": op.golden_dtype, "my_dtype": op.my_dtype, "shape": op.shape,
             "metrics": metrics, "added": added, "bounds": bounds}
    return json.dumps(entry, ensure_ascii=False, allow_nan=False)


def dumps(baseline: Baseline) -> str:
    """The file's text: a header (format, package version, mode, tokens, ranks), then one op per line."""
    head = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": baseline.package_version,
            "mode": baseline.mode, "tokens": baseline.tokens, "ranks": baseline.ranks}
    header = "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items())
    ops = ",\n".join(f"    {_op_line(op)}" for op in baseline.ops)
    return "{\n" + header + '  "ops": [\n' + (ops + "\n" if ops else "") + "  ]\n}\n"


def write_baseline(result: Any, path: str | Path) -> Path:
    """Write the baseline that accepts ``result`` to ``path`` (atomically; parent dirs created)."""
    from .. import __version__

    return atomic_write_text(path, dumps(baseline_from_result(result, __version__)))


# -------------------------------------------------------------------------------------------------- reading

class _Entry:
    """Typed access to one JSON object; every complaint names the file and the entry."""

    def __init__(self, path: Path, where: str, obj: Any):
        self.path, self.where = path, where
        if not isinstance(obj, dict):
            self.fail(f"expected an object, got {type(obj).__name__}")
        self.obj = obj

    def fail(self, problem: str):
        raise BaselineError(f"{self.path}: {self.where}: {problem}")

    def get(self, key: str, kind: type | tuple, what: str) -> Any:
        if key not in self.obj:
            self.fail(f"{key!r} is missing")
        value = self.obj[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            self.fail(f"{key}={value!r} is not {what}")
        return value

    def metrics(self, key: str) -> dict[str, float]:
        raw = self.get(key, dict, "an object of {metric: value}")
        out = {}
        for name, value in raw.items():
            if name not in METRICS:
                self.fail(f"{key}: unknown metric {name!r} (known: {', '.join(METRICS)})")
            if value is None:
                out[name] = math.nan
            elif value in ("inf", "-inf"):
                out[name] = float(value)
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                self.fail(f"{key}[{name!r}]={value!r} is not a number (null for not computed, \"inf\"/\"-inf\")")
            else:
                out[name] = float(value)
        return out


def _parse_constant(name: str):
    raise ValueError(f"{name} is not JSON (write null for a metric that was not computed)")


def loads(text: str, path: str | Path) -> Baseline:
    """Parse and validate a baseline file's text; BaselineError naming ``path`` and the entry at fault."""
    p = Path(path)
    try:
        obj = json.loads(text, parse_constant=_parse_constant)
    except json.JSONDecodeError as err:
        raise BaselineError(f"{p}: not a baseline file: invalid JSON at line {err.lineno} column {err.colno}: "
                            f"{err.msg}") from None
    except ValueError as err:
        raise BaselineError(f"{p}: not a baseline file: {err}") from None
    head = _Entry(p, "header", obj)
    if obj.get("format") != FORMAT:
        head.fail(f"'format' is {obj.get('format')!r}, expected {FORMAT!r} (not a pytest-ait-llm baseline)")
    version = head.get("format_version", int, "an integer")
    if version != FORMAT_VERSION:
        head.fail(f"format_version {version} is not supported (this package reads {FORMAT_VERSION})")
    tokens = head.get("tokens", list, "a list of token ids")
    ranks = head.get("ranks", list, "a list of rank names")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        head.fail(f"tokens={tokens!r} is not a list of integers")
    if not all(isinstance(r, str) for r in ranks):
        head.fail(f"ranks={ranks!r} is not a list of strings")
    ops, seen = [], {}
    for i, raw in enumerate(head.get("ops", list, "a list of op entries")):
        entry = _Entry(p, f"ops[{i}]", raw)
        entry.where = f"ops[{i}] ({raw.get('atb_op', '?')} <-> {raw.get('torch_module', '?')}, token {raw.get('token', '?')})"
        unknown = sorted(set(raw) - set(_OP_FIELDS))
        if unknown:
            entry.fail(f"unknown key {unknown[0]!r} (known: {', '.join(_OP_FIELDS)})")
        shape = entry.get("shape", list, "a list of dimensions")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            entry.fail(f"shape={shape!r} is not a list of dimensions")
        op = BaselineOp(
            token=entry.get("token", int, "an integer"), rank=entry.get("rank", str, "a string"),
            order=entry.get("order", int, "an integer"), atb_op=entry.get("atb_op", str, "a string"),
            torch_module=entry.get("torch_module", str, "a string"),
            my_op_type=entry.get("my_op_type", str, "a string"),
            golden_op_type=entry.get("golden_op_type", str, "a string"),
            golden_dtype=entry.get("golden_dtype", str, "a string"), my_dtype=entry.get("my_dtype", str, "a string"),
            shape=list(shape), metrics=entry.metrics("metrics"), added=entry.metrics("added"),
            bounds=entry.metrics("bounds"))
        if op.key in seen:
            entry.fail(f"the same op as ops[{seen[op.key]}]")
        seen[op.key] = i
        ops.append(op)
    return Baseline(ops=ops, package_version=str(obj.get("package_version", "")), mode=str(obj.get("mode", "")),
                    tokens=list(tokens), ranks=list(ranks), path=str(p))


def read_baseline(path: str | Path) -> Baseline:
    """The baseline at ``path``; BaselineError (one line, naming the file) when it is missing or invalid."""
    from ..formats.atomic import read_bounded

    p = Path(path)
    data = read_bounded(p, MAX_BYTES, what="baseline file", allow_symlinks=True, error=BaselineError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BaselineError(f"{p}: not a baseline file: not UTF-8 text (byte {err.start})") from None
    return loads(text, p)


# ------------------------------------------------------------------------------------------- reports: CSV, HTML

#: Appended after the CSV's other columns when a comparison was checked against a baseline.
CSV_COLUMNS = ["baseline_cosine_similarity", "baseline_relative_euclidean_distance",
               "delta_cosine_similarity", "delta_relative_euclidean_distance", "regressed", "regression"]


def _cell(value: float) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def csv_columns(regression: RegressionResult):
    """(column names, row -> cells) for ``csv_report.write_csv(..., extra_columns=...)``."""
    by_row = regression.by_row()

    def cells(row: Any) -> list[str]:
        op = by_row.get(id(row))
        if op is None:
            new = row.status == "compared" and row.metrics is not None and row.token_id is not None
            return ["", "", "", "", "", "new (not in the baseline)" if new else ""]
        was = op.was.metrics
        note = "first regression" if op.first else "following the first regression" if op.following else \
            "can be tightened" if op.improved else ""
        detail = "; ".join(str(c) for c in op.changes)
        return [_cell(was.get("cosine_similarity", math.nan)), _cell(was.get("relative_euclidean_distance", math.nan)),
                _cell(op.delta("cosine_similarity")), _cell(op.delta("relative_euclidean_distance")),
                str(op.regressed), "; ".join(x for x in (note, detail) if x)]

    return CSV_COLUMNS, cells


def _fmt(value: float, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def regression_table(regression: RegressionResult, n: int = 20, *, plot: bool = True) -> str:
    """HTML: the was/now table of the regressed ops (first regression on top), the other findings, and (``plot``)
    the added error of every op drawn over its baseline's."""
    regs = regression.regressions
    summary = escape(regression.summary()).replace("\n", "<br>")
    parts = [f'<div class="ait-llm-baseline"><p><b>baseline: {"FAILED" if not regression.passed else "passed"}</b>'
             f"<br>{summary}</p>"]
    if regs:
        head = ("<tr><th>order</th><th>token</th><th>ATB op</th><th>torch module</th><th>metric</th><th>was</th>"
                "<th>now</th><th>margin</th><th></th></tr>")
        body = []
        for op in regs[:n]:
            for c in op.changes:
                if c.kind != "regressed":
                    continue
                style = ' style="background:#fdd"' if op.first else ""
                body.append(f"<tr{style}><td>{op.row.order}</td><td>{op.row.token_id}</td>"
                            f"<td>{escape(op.row.atb_op)}</td><td>{escape(op.row.torch_module)}</td>"
                            f"<td>{escape(c.metric)}</td><td>{_fmt(c.was, 6)}</td><td>{_fmt(c.now, 6)}</td>"
                            f"<td>{escape(str(c.margin))}</td>"
                            f"<td>{'<b>first regression</b>' if op.first else 'following'}</td></tr>")
        more = f" (first {n} of {len(regs)})" if len(regs) > n else ""
        parts.append('<table class="ait-llm-regressions" border="1" cellpadding="3" '
                     f'style="border-collapse:collapse"><caption>regressed ops: was / now{more}</caption>'
                     f"<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")
    if plot:
        parts.append(regression_plot_img(regression))
    parts.append("</div>")
    return "".join(parts)


# ------------------------------------------------------------------------------------ one check, for pytest and CLI

@dataclass
class BaselineOutcome:
    """What checking one comparison against its baseline file came to."""

    path: Path
    regression: RegressionResult | None = None  # None when the baseline was (re)written instead of checked
    written: str = ""  # "created" or "updated" when this run wrote the file
    error: str = ""  # the baseline could not be read (one line naming the file and the entry)
    refused: str = ""  # why this run was not written as the baseline

    @property
    def passed(self) -> bool:
        if self.error or self.refused:
            return False
        if self.written:
            return self.written == "updated"
        return self.regression is not None and self.regression.passed

    def message(self, accept_hint: str) -> str:
        """Why the check failed, with how to accept the change (``accept_hint``: the flag that rewrites it)."""
        if self.error:
            return f"baseline error: {self.error}"
        if self.refused:
            return self.refused
        if self.written == "created":
            return (f"no baseline yet: wrote {self.path} from this run; review it and commit it "
                    f"(the next run is checked against it; {accept_hint} rewrites it)")
        if self.regression is None or self.regression.passed:
            return ""
        return (f"worse than the accepted baseline {self.path}:\n{self.regression.summary()}\n"
                f"if the change is intended, accept it: rerun with {accept_hint} and commit the baseline")


def check_baseline(result: Any, path: str | Path, *, update: bool = False, rules: RegressionRules | None = None,
                   output_dir: str | Path | None = None) -> BaselineOutcome:
    """Check ``result`` against the baseline at ``path`` (or write it: ``update``, or no file yet), then write the
    CSV report into ``output_dir`` with the baseline columns appended (when it was checked).

    A run that breaches its tolerance is never written as a baseline. A corrupt baseline is reported in
    ``error``, never passed; the CSV is written in every case.
    """
    from . import csv_report

    p = Path(path)
    outcome = BaselineOutcome(p)
    exists = p.exists()
    try:
        if (update or not exists) and result.passed:
            write_baseline(result, p)
            outcome.written = "updated" if update else "created"
        elif update or not exists:
            outcome.refused = (f"baseline {p} not written: this run breaches its tolerance, and a baseline only "
                               f"records an accepted run")
        else:
            outcome.regression = check_regression(result, read_baseline(p), rules)
    except BaselineError as err:
        outcome.error = str(err)
    if output_dir is not None:
        extra = csv_columns(outcome.regression) if outcome.regression is not None else None
        result.csv_path = csv_report.write_csv(result, output_dir, extra_columns=extra)
    return outcome


def regression_plot_img(regression: RegressionResult) -> str:
    """An ``<img>`` (PNG data URI) of the added RED along execution order, now over the baseline's, regressed ops
    in red and the first regression annotated; or a note saying why there is none (a report never fails a run)."""
    try:
        import base64
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        return f"<p>no baseline plot: matplotlib is not installed ({escape(str(err))})</p>"
    red = "relative_euclidean_distance"
    ops = [o for o in regression.ops if red in o.was.added]
    if not ops:
        return ""
    try:
        from ..compare.regression import added_metrics

        xs = range(len(ops))
        was = [o.was.added[red] for o in ops]
        now = [added_metrics(o.row).get(red, math.nan) for o in ops]
        fig = Figure(figsize=(10, 3.4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(xs, was, color="tab:gray", linestyle="--", linewidth=1, label="baseline (accepted)")
        ax.plot(xs, now, color="tab:blue", marker="o", markersize=2, linewidth=1, label="this run")
        bad = [i for i, o in enumerate(ops) if o.regressed]
        if bad:
            ax.scatter(bad, [now[i] for i in bad], s=36, color="red", zorder=3, label="regressed")
        first = next((i for i, o in enumerate(ops) if o.first), None)
        if first is not None:
            ax.annotate(f"first regression:\n{ops[first].row.atb_op}", (first, now[first]),
                        xytext=(0.55 if first < len(ops) / 2 else 0.05, 0.75), textcoords="axes fraction",
                        fontsize=8, color="darkred", arrowprops={"arrowstyle": "->", "color": "darkred"},
                        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "darkred", "alpha": 0.9})
        # linear: an op that adds no error (0) is common and a log axis would stretch the picture to show it
        ax.set_xlabel("op pair, in execution order")
        ax.set_ylabel("RED added by the op")
        ax.set_title("relative euclidean distance each op adds: this run over its baseline", fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    except Exception as err:  # noqa: BLE001 - reporting must never break the run
        return f"<p>no baseline plot: {escape(type(err).__name__)}: {escape(str(err))}</p>"
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="ait-llm-baseline-profile" alt="added error vs baseline" src="data:image/png;base64,{data}"/>'
