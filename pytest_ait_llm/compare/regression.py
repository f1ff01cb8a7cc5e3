"""Regression against an accepted baseline: is an op worse than it was, even while inside its tolerance?

A tolerance says what any port may show; a baseline says what *this* port showed when it was accepted. An op
regresses when one of its gated metrics is worse than its baseline value by more than a noise margin
``rel * |was| + abs`` (for cosine similarity, on the error ``1 - cos``). As the tolerance does in its default
"added" mode, cosine, relative euclidean distance and KL are judged on the error the op *adds* to its inputs': an
upstream change then shows at the op that made it, not at every op after it. An exact rerun is always equal, so
it passes even with zero margins. The defaults and how they were calibrated are in docs/baselines.md.

Pure data in, data out: the file format lives in report/baseline.py, the pytest and CLI glue above that.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

from ..errors import AitLlmError
from .metrics import METRICS
from .result import COMPARED
from .tolerance import ADDED_METRICS, ALIASES, default_bounds, effective_metrics


class BaselineError(AitLlmError):
    """A baseline file or a margin specification is invalid (names the file and entry, or the key, at fault)."""


#: Significant digits kept of every metric value, in the file and in the comparison (so a rerun is exactly equal).
DIGITS = 9


def quantize(value: float) -> float:
    """``value`` as the baseline file stores it (DIGITS significant digits; inf and NaN unchanged)."""
    v = float(value)
    return v if not math.isfinite(v) else float(f"{v:.{DIGITS}g}")


@dataclass(frozen=True)
class Margin:
    """How much worse than its baseline a metric may get: ``rel * |was| + abs`` (on ``1 - cos`` for cosine)."""

    rel: float
    abs: float

    def allowed(self, was_error: float) -> float:
        return self.rel * abs(was_error) + self.abs

    def __str__(self) -> str:
        return f"rel {self.rel:g} + abs {self.abs:g}"


#: Default margins per dtype of the pair (the less precise side), on the relative euclidean distance an op adds:
#: ``rel 0.25 + abs u / 6`` with u the dtype's unit roundoff. Cosine is not gated by default: it cannot see a scale
#: error and only adds noise (gate it with ``cos=(rel, abs)``). Calibrated on examples/llama_port (bf16 port, fp32
#: golden; docs/baselines.md): a change of u/4 at one op (below bf16's rounding) moves any op's added RED by at most
#: 5.6e-4 (the limit there is >= 6.8e-4); a 0.5 % scale (1.3 u) moves the scaled op's by 1.1e-3 (limit <= 8.0e-4).
def _margins(u: float) -> dict[str, Margin]:
    return {"relative_euclidean_distance": Margin(0.25, u / 6)}


DEFAULT_MARGINS: dict[str, dict[str, Margin]] = {
    "bfloat16": _margins(2.0 ** -8),
    "float16": _margins(2.0 ** -11),
    "float32": _margins(2.0 ** -24),
    "float64": _margins(2.0 ** -53),
    "integer": {"relative_euclidean_distance": Margin(0.0, 0.0)},
}


def default_margins(dtype: str) -> dict[str, Margin]:
    """Default margins for a pair whose less precise dtype is ``dtype`` (unknown float dtypes: the bf16 row)."""
    name = str(dtype).replace("torch.", "")
    if name in DEFAULT_MARGINS:
        return dict(DEFAULT_MARGINS[name])
    if default_bounds(name).get("relative_euclidean_distance", 1.0) == 0.0:
        return dict(DEFAULT_MARGINS["integer"])
    return dict(DEFAULT_MARGINS["bfloat16"])


def _margin(value: object, label: str) -> Margin | None:
    """A validated margin: (rel, abs), {"rel": .., "abs": ..}, a bare rel, or None (metric not gated)."""
    if value is None:
        return None
    if isinstance(value, Margin):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"rel", "abs"}
        if unknown:
            raise BaselineError(f"ait_baseline: {label}: unknown key {sorted(unknown)[0]!r} (expected 'rel' and/or 'abs')")
        parts = (value.get("rel", 0.0), value.get("abs", 0.0))
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise BaselineError(f"ait_baseline: {label}={value!r}: expected (rel, abs)")
        parts = tuple(value)
    else:
        parts = (value, 0.0)
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, numbers.Real) or not math.isfinite(part) or part < 0:
            raise BaselineError(f"ait_baseline: {label}={value!r}: margins must be finite numbers >= 0")
    return Margin(float(parts[0]), float(parts[1]))


def _metric_name(key: object, label: str) -> str:
    if str(key) not in ALIASES:
        raise BaselineError(f"ait_baseline: {label}: unknown metric {key!r} (known: {', '.join(METRICS)})")
    return ALIASES[str(key)]


def _margins_of(raw: object, label: str) -> dict[str, Margin | None]:
    if not isinstance(raw, Mapping):
        raise BaselineError(f"ait_baseline: {label}={raw!r} must be a dict of {{metric: (rel, abs)}}")
    return {_metric_name(k, label): _margin(v, f"{label}[{k!r}]" if label != "margins" else str(k))
            for k, v in raw.items()}


@dataclass
class RegressionRules:
    """Which metrics are gated against the baseline, with which margins; overridable like ``ait_tolerance``:
    base margins < ``dtypes[dtype]`` < ``ops[op type]`` < ``ops[glob]`` on op name, ATB op path or torch module.
    A margin of None stops gating that metric."""

    margins: dict[str, Margin | None] = field(default_factory=dict)
    ops: dict[str, dict[str, Margin | None]] = field(default_factory=dict)
    dtypes: dict[str, dict[str, Margin | None]] = field(default_factory=dict)
    use_defaults: bool = True

    def __post_init__(self) -> None:
        self.margins = _margins_of(self.margins, "margins")
        for name in ("ops", "dtypes"):
            raw = getattr(self, name)
            if not isinstance(raw, Mapping) or not all(isinstance(k, str) and k for k in raw):
                raise BaselineError(f"ait_baseline: {name}={raw!r} must be a dict keyed by non-empty strings")
            setattr(self, name, {k: _margins_of(v, f"{name}[{k!r}]") for k, v in raw.items()})
        self.dtypes = {k.replace("torch.", ""): v for k, v in self.dtypes.items()}
        if not isinstance(self.use_defaults, bool):
            raise BaselineError(f"ait_baseline: use_defaults={self.use_defaults!r} must be True or False")

    @classmethod
    def from_marker(cls, *layers: Mapping[str, Any], **kwargs: Any) -> RegressionRules:
        """Rules from ``@pytest.mark.ait_baseline(red=(0.05, 1e-4), ops={...}, dtypes={...}, use_defaults=...)``
        keywords (and dicts of the same keywords, later ones winning per metric)."""
        rules = cls()
        for layer in (*layers, kwargs):
            if not isinstance(layer, Mapping):
                raise BaselineError(f"ait_baseline: {layer!r} must be a dict of margins")
            layer = dict(layer)
            other = cls(ops=layer.pop("ops", {}), dtypes=layer.pop("dtypes", {}),
                        use_defaults=layer.pop("use_defaults", rules.use_defaults), margins=layer)
            rules = cls(margins={**rules.margins, **other.margins},
                        ops=_merge(rules.ops, other.ops), dtypes=_merge(rules.dtypes, other.dtypes),
                        use_defaults=other.use_defaults)
        return rules

    def margins_for(self, op_type: str, dtype: str, *names: str) -> dict[str, Margin]:
        out: dict[str, Margin | None] = default_margins(dtype) if self.use_defaults else {}
        out.update(self.margins)
        out.update(self.dtypes.get(str(dtype).replace("torch.", ""), {}))
        out.update(self.ops.get(op_type, {}))
        subjects = [s for s in names if s]
        for key, entry in self.ops.items():
            if key != op_type and any(fnmatchcase(s, key) for s in subjects):
                out.update(entry)
        return {k: v for k, v in out.items() if v is not None}


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


# --------------------------------------------------------------------------------------------------- the baseline

def rank_key(rank: str) -> str:
    """The device of a rank dir name ``{device}_{pid}``: the pid changes with every run, the device does not."""
    return str(rank).split("_", 1)[0]


@dataclass
class BaselineOp:
    """The accepted metrics of one compared op pair of one token and rank."""

    token: int
    rank: str
    order: int
    atb_op: str
    torch_module: str
    my_op_type: str = ""
    golden_op_type: str = ""
    golden_dtype: str = ""
    my_dtype: str = ""
    shape: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    added: dict[str, float] = field(default_factory=dict)  # cos/RED/KL minus the inputs' (ADDED_METRICS)
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.token, self.rank, self.atb_op, self.torch_module)

    @property
    def where(self) -> str:
        return f"{self.atb_op or '-'} <-> {self.torch_module or '-'} (token {self.token})"


def sort_key(op: BaselineOp) -> tuple:
    """Execution order: token, then the op's completion order (the order of the file's lines)."""
    return (op.token, op.order, op.rank, op.atb_op, op.torch_module)


@dataclass
class Baseline:
    """A comparison as accepted: metadata and one BaselineOp per compared pair, sorted in execution order."""

    ops: list[BaselineOp]
    package_version: str = ""
    mode: str = ""
    tokens: list[int] = field(default_factory=list)
    ranks: list[str] = field(default_factory=list)
    path: str = ""  # where it was read from (for messages)


def metric_value(row: Any, name: str) -> float:
    """One metric of a compared row (NaN when not computed)."""
    values = getattr(row.metrics, "values", None) or {}
    return float(values.get(name, math.nan))


def where(row: Any) -> str:
    """How a person names a row: ATB op path <-> torch module (token)."""
    return f"{row.atb_op or '-'} <-> {row.torch_module or '-'} (token {row.token_id})"


def _row_key(row: Any) -> tuple:
    return (row.token_id, rank_key(row.rank), row.atb_op, row.torch_module)


def _gated_rows(result: Any) -> list:
    return [r for r in result.rows if r.status == COMPARED and r.metrics is not None and r.token_id is not None]


def _less_precise(*dtypes: str) -> str:
    names = [d for d in dtypes if d]
    return max(names, key=lambda d: default_bounds(d).get("relative_euclidean_distance", 0.0)) if names else ""


def added_metrics(row: Any, mode: str = "added") -> dict[str, float]:
    """The ADDED_METRICS of ``row`` as judged: the error the op adds to its inputs' (its own error when the
    inputs' is unknown or ``mode`` is "absolute")."""
    effective = getattr(row, "effective", None)
    if not effective:
        effective = effective_metrics(row.metrics.values, getattr(row, "input_metrics", None), mode)
    return {k: float(effective[k]) for k in ADDED_METRICS if k in effective}


def baseline_from_result(result: Any, version: str = "") -> Baseline:
    """The baseline that accepts ``result`` as it is."""
    ops = []
    mode = getattr(getattr(result, "tolerance", None), "mode", "") or "added"
    for row in _gated_rows(result):
        m = row.metrics
        ops.append(BaselineOp(
            token=int(row.token_id), rank=rank_key(row.rank), order=int(row.order), atb_op=row.atb_op,
            torch_module=row.torch_module, my_op_type=row.my_op_type, golden_op_type=row.golden_op_type,
            golden_dtype=getattr(m.golden, "dtype", "") or "", my_dtype=getattr(m.my, "dtype", "") or "",
            shape=[int(d) for d in (getattr(m.my, "shape", None) or getattr(m.golden, "shape", None) or ())],
            metrics={k: quantize(v) for k, v in m.values.items() if k in METRICS},
            added={k: quantize(v) for k, v in added_metrics(row, mode).items()},
            bounds={k: quantize(v) for k, v in (row.bounds or {}).items()}))
    ops.sort(key=sort_key)
    return Baseline(ops=ops, package_version=version, mode=mode,
                    tokens=sorted({o.token for o in ops}), ranks=sorted({o.rank for o in ops}))


# ----------------------------------------------------------------------------------------------------- the check

@dataclass(frozen=True)
class Change:
    """One gated metric that moved beyond its margin: ``kind`` is "regressed" or "improved"."""

    metric: str
    was: float
    now: float
    margin: Margin
    kind: str
    added: bool = False  # the values are the error the op added

    def __str__(self) -> str:
        verb = "worse" if self.kind == "regressed" else "better"
        return (f"{self.metric}{' (added)' if self.added else ''} {self.was:.6g} -> {self.now:.6g} "
                f"({verb} than the baseline beyond its margin {self.margin})")


@dataclass
class OpRegression:
    """One op of this run next to its baseline entry."""

    row: Any  # compare.result.Row
    was: BaselineOp
    changes: list[Change] = field(default_factory=list)
    first: bool = False  # the earliest regressed op in execution order
    following: bool = False  # regressed after the first one (likely its consequence)

    @property
    def regressed(self) -> bool:
        return any(c.kind == "regressed" for c in self.changes)

    @property
    def improved(self) -> bool:
        return not self.regressed and any(c.kind == "improved" for c in self.changes)

    def delta(self, metric: str) -> float:
        """Now minus was, on the values as stored (an exact rerun gives 0.0)."""
        return quantize(metric_value(self.row, metric)) - self.was.metrics.get(metric, math.nan)


@dataclass
class RegressionResult:
    """The verdict of one comparison against its baseline."""

    ops: list[OpRegression]  # in execution order
    new: list  # rows of this run that the baseline does not know
    missing: list[BaselineOp]  # baseline entries this run did not compare
    baseline_path: str = ""

    @property
    def regressions(self) -> list[OpRegression]:
        return [o for o in self.ops if o.regressed]

    @property
    def improvements(self) -> list[OpRegression]:
        return [o for o in self.ops if o.improved]

    @property
    def first_regression(self) -> OpRegression | None:
        return next((o for o in self.ops if o.first), None)

    @property
    def passed(self) -> bool:
        """No op worse than its baseline and no accepted op lost (a new op is listed, not failed)."""
        return not self.regressions and not self.missing

    def by_row(self) -> dict[int, OpRegression]:
        return {id(o.row): o for o in self.ops}

    def summary(self) -> str:
        """The lines a person reads: first regression (root cause), then counts, improvements, new/missing ops."""
        lines = []
        first = self.first_regression
        if first is not None:
            lines.append(f"first regression: {where(first.row)}: "
                         + "; ".join(str(c) for c in first.changes if c.kind == "regressed"))
            following = len(self.regressions) - 1
            if following:
                later = next(o for o in self.ops if o.following)
                lines.append(f"then {following} later regressed op(s), marked as following it, e.g. {where(later.row)}")
        else:
            lines.append(f"no regression against the baseline ({len(self.ops)} ops checked)")
        if self.missing:
            lines.append(f"{len(self.missing)} baseline op(s) no longer compared, e.g. {self.missing[0].where}")
        if self.new:
            lines.append(f"{len(self.new)} op(s) not in the baseline (not gated until it is updated), "
                         f"e.g. {where(self.new[0])}")
        if self.improvements:
            best = self.improvements[0]
            lines.append(f"{len(self.improvements)} op(s) better than the baseline beyond the margin: the baseline "
                         f"can be tightened, e.g. {where(best.row)}: "
                         + "; ".join(str(c) for c in best.changes if c.kind == "improved"))
        if self.baseline_path:
            lines.append(f"baseline: {self.baseline_path}")
        return "\n".join(lines)


def _error(metric: str, value: float) -> float:
    """The metric as an error (bigger is worse): cosine similarity becomes 1 - cos."""
    return 1.0 - value if metric == "cosine_similarity" else value


def compare_metric(metric: str, was: float, now: float, margin: Margin, added: bool = False) -> Change | None:
    """The change of one metric beyond its margin, or None. ``now`` is quantized as the file stores it."""
    was, now = float(was), quantize(now)
    if math.isnan(was) and math.isnan(now) or was == now:
        return None
    if math.isnan(now):  # computed when accepted, not any more
        return Change(metric, was, now, margin, "regressed", added)
    if math.isnan(was):
        return None
    e_was, e_now = _error(metric, was), _error(metric, now)
    if math.isinf(e_was) or math.isinf(e_now):
        kind = "regressed" if e_now > e_was else "improved"
        return Change(metric, was, now, margin, kind, added)
    allowed = margin.allowed(e_was)
    if e_now - e_was > allowed:
        return Change(metric, was, now, margin, "regressed", added)
    if e_was - e_now > allowed:
        return Change(metric, was, now, margin, "improved", added)
    return None


def check_regression(result: Any, baseline: Baseline, rules: RegressionRules | None = None) -> RegressionResult:
    """Judge every compared op of ``result`` against its ``baseline`` entry (matched on token, rank device,
    ATB op path and torch module). The first regressed op in execution order is marked ``first``, later ones
    ``following``. Raises BaselineError when the baseline plainly belongs to another model or comparison."""
    rules = rules or RegressionRules()
    rows = sorted(_gated_rows(result), key=lambda r: (r.token_id, r.order, rank_key(r.rank)))
    known = {op.key: op for op in baseline.ops}
    seen: set[tuple] = set()
    ops, new = [], []
    for row in rows:
        key = _row_key(row)
        was = known.get(key)
        if was is None or key in seen:
            new.append(row)
            continue
        seen.add(key)
        dtype = _less_precise(was.golden_dtype, was.my_dtype,
                              getattr(row.metrics.golden, "dtype", ""), getattr(row.metrics.my, "dtype", ""))
        margins = rules.margins_for(row.my_op_type, dtype, row.atb_op_name, row.atb_op, row.torch_module)
        added_now = added_metrics(row, baseline.mode or "added")
        changes = []
        for name, margin in margins.items():
            if name in was.added and name in added_now:
                change = compare_metric(name, was.added[name], added_now[name], margin, added=True)
            else:
                change = compare_metric(name, was.metrics.get(name, math.nan), metric_value(row, name), margin)
            if change is not None:
                changes.append(change)
        ops.append(OpRegression(row, was, changes))
    missing = [op for op in baseline.ops if op.key not in seen]
    _refuse_foreign(baseline, missing, len(ops), len(rows))
    regressed = [o for o in ops if o.regressed]
    if regressed:
        regressed[0].first = True
        for o in regressed[1:]:
            o.following = True
    return RegressionResult(ops=ops, new=new, missing=missing, baseline_path=baseline.path)


def _refuse_foreign(baseline: Baseline, missing: list[BaselineOp], matched: int, compared: int) -> None:
    """A baseline sharing under half of its ops with this run is another model's (or a wrong file): an error,
    since judging it would either pass on nothing or report every op as new."""
    if not baseline.ops or not compared:
        return
    if matched * 2 < min(len(baseline.ops), compared):
        example = missing[0]
        raise BaselineError(f"{baseline.path or 'baseline'}: only {matched} of its {len(baseline.ops)} ops match the "
                            f"{compared} ops of this run (e.g. ops[{baseline.ops.index(example)}] {example.where} "
                            f"is not in it): a baseline "
                            f"of another model or comparison? Re-record it with --ait-update-baseline")
