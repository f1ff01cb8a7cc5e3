"""Tolerances: which metric values an op may show, and the verdict on one op's metrics.

Why "added" mode is the default: in a port, error accumulates along the model. Judging every op on its absolute
output error makes all ops after the first bad one fail too, and makes deep models fail on rounding alone. An op
is only to blame for the error it *adds*, i.e. its output error minus the error already present in its inputs.
The numbers in DEFAULT_BOUNDS and their reasoning are documented in docs/metrics.md.
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping

from ..errors import ToleranceError
from ..formats.dtypes import by_name
from .metrics import METRICS

#: Short names accepted wherever a metric is named (marker kwargs, ops/dtypes entries, bounds given to judge()).
ALIASES: dict[str, str] = {
    "cos": "cosine_similarity",
    "kl": "kl_divergence",
    "red": "relative_euclidean_distance",
    "rel_euclid": "relative_euclidean_distance",
    "max_rel": "max_relative_error",
    "mean_rel": "mean_relative_error",
    "max_abs": "max_absolute_error",
    "mean_abs": "mean_absolute_error",
    **{name: name for name in METRICS},
}

#: Metrics where bigger is better; every other metric is an upper bound.
LOWER_BOUNDED = frozenset({"cosine_similarity"})

#: Metrics judged on the error an op adds (output minus input) in "added" mode; the rest are always absolute.
ADDED_METRICS = ("cosine_similarity", "relative_euclidean_distance", "kl_divergence")

MODES = ("added", "absolute")

#: Default bounds per dtype of the compared pair (the less precise side). Only cosine and relative euclidean
#: distance: max relative error explodes on near-zero goldens (msit's report: cos 1.0 beside max rel error 378).
#: RED is a small multiple of the unit roundoff u (bf16 2^-8, fp16 2^-11, fp32 2^-24); sources in docs/metrics.md.
DEFAULT_BOUNDS: dict[str, dict[str, float]] = {
    "bfloat16": {"cosine_similarity": 0.999, "relative_euclidean_distance": 0.02},
    "float16": {"cosine_similarity": 0.999, "relative_euclidean_distance": 0.004},
    "float32": {"cosine_similarity": 0.99999, "relative_euclidean_distance": 1e-5},
    "float64": {"cosine_similarity": 0.99999, "relative_euclidean_distance": 1e-10},
    "integer": {"relative_euclidean_distance": 0.0},
}

#: Dtype names with no DEFAULT_BOUNDS row of their own get the loosest float row rather than no gate at all.
_FALLBACK_ROW = "bfloat16"


_NO_VALUE = object()


def canonical_metric(name: str, *, where: str = "ait_tolerance", value: object = _NO_VALUE) -> str:
    """Full metric name for ``name`` or one of its ALIASES; ToleranceError naming it (and its value) otherwise."""
    key = str(name)
    if key in ALIASES:
        return ALIASES[key]
    close = difflib.get_close_matches(key, list(ALIASES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = "" if value is _NO_VALUE else f"={value!r}"
    raise ToleranceError(f"{where}: unknown metric {key!r}{shown}{hint} (known: {', '.join(METRICS)}; aliases: "
                         f"{', '.join(k for k in ALIASES if k not in METRICS)})")


def _dtype_key(name: str) -> str:
    """Canonical dtype name ("bf16", "torch.bfloat16" -> "bfloat16"); unknown names come back unchanged."""
    try:
        return by_name(name).name
    except KeyError:
        return str(name)


def _is_known_dtype(name: str) -> bool:
    try:
        by_name(name)
        return True
    except KeyError:
        return False


def _bound(metric: str, value: object, label: str) -> float:
    """A validated bound: a real number, not NaN, cosine within [-1, 1], upper bounds >= 0 (inf allowed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ToleranceError(f"ait_tolerance: {label}={value!r} is not a number")
    v = float(value)
    if math.isnan(v):
        raise ToleranceError(f"ait_tolerance: {label}={value!r} is not a number")
    if metric in LOWER_BOUNDED and not -1.0 <= v <= 1.0:
        raise ToleranceError(f"ait_tolerance: {label}={value!r} is outside [-1, 1]")
    if metric not in LOWER_BOUNDED and v < 0:
        raise ToleranceError(f"ait_tolerance: {label}={value!r} is negative (an upper bound must be >= 0)")
    return v


def _bounds(raw: object, label: str = "") -> dict[str, float]:
    """{canonical metric: bound} from a user mapping of metric names/aliases to numbers.
    ``label`` locates the mapping in messages ("" for the marker's own keywords, "ops['X']" for an entry)."""
    if not isinstance(raw, Mapping):
        raise ToleranceError(f"ait_tolerance: {label or 'bounds'}={raw!r} must be a dict of {{metric: bound}}")
    out: dict[str, float] = {}
    for key, value in raw.items():
        metric = canonical_metric(key, where=f"ait_tolerance: {label}" if label else "ait_tolerance", value=value)
        out[metric] = _bound(metric, value, f"{label}[{key!r}]" if label else str(key))
    return out


def _nested(raw: object, label: str, *, dtype_keys: bool = False) -> dict[str, dict[str, float]]:
    if not isinstance(raw, Mapping):
        what = "dtype" if dtype_keys else "op type or glob"
        raise ToleranceError(f"ait_tolerance: {label}={raw!r} must be a dict of {{{what}: {{metric: bound}}}}")
    out: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise ToleranceError(f"ait_tolerance: {label} key {key!r} must be a non-empty string")
        if dtype_keys and not _is_known_dtype(key):
            raise ToleranceError(f"ait_tolerance: {label}[{key!r}]: unknown dtype {key!r}")
        name = _dtype_key(key) if dtype_keys else key
        merged = out.setdefault(name, {})
        merged.update(_bounds(value, f"{label}[{key!r}]"))
    return out


def _skip(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        return (raw,) if raw else ()
    if isinstance(raw, (list, tuple, set, frozenset)) and all(isinstance(p, str) and p for p in raw):
        return tuple(raw)
    raise ToleranceError(f"ait_tolerance: skip={raw!r} must be a glob string or a list of glob strings")


def _mode(raw: object) -> str:
    if raw not in MODES:
        raise ToleranceError(f"ait_tolerance: mode={raw!r} must be one of {', '.join(MODES)}")
    return str(raw)


_STRUCTURAL = ("ops", "dtypes", "skip", "mode", "use_defaults")
#: Keys of the output check (compare/output_check.py): its bounds, and ``logits``, the tensor it reads.
OUTPUT_KEYS = ("top1", "topk", "logits_kl", "logits")


def _output(raw: object) -> dict:
    """Validated output-check keys: bounds in [0, 1] for top1/topk, >= 0 for logits_kl; logits a name or a pair."""
    if not isinstance(raw, Mapping):
        raise ToleranceError(f"ait_tolerance: output={raw!r} must be a dict of {{{', '.join(OUTPUT_KEYS)}: ...}}")
    out: dict = {}
    for key, value in raw.items():
        if key == "logits":
            ok = isinstance(value, str) and value or (isinstance(value, (tuple, list)) and len(value) == 2
                                                      and all(isinstance(v, str) and v for v in value))
            if not ok:
                raise ToleranceError(f"ait_tolerance: logits={value!r} must be an op/module name or an (A, B) pair")
            out[key] = value if isinstance(value, str) else tuple(value)
        elif key in OUTPUT_KEYS:
            v = _bound("relative_euclidean_distance", value, key)
            if key != "logits_kl" and v > 1:
                raise ToleranceError(f"ait_tolerance: {key}={value!r} is outside [0, 1]")
            out[key] = v
        else:
            raise ToleranceError(f"ait_tolerance: unknown output-check key {key!r} (known: {', '.join(OUTPUT_KEYS)})")
    return out


def _split_kwargs(kwargs: dict) -> dict:
    """Marker keywords as Tolerance fields: structural keys stay, output-check keys go to ``output``, everything
    else is a metric bound."""
    layer = {k: kwargs.pop(k) for k in _STRUCTURAL if k in kwargs}
    output = {k: kwargs.pop(k) for k in OUTPUT_KEYS if k in kwargs}
    if output:
        layer["output"] = output
    layer["bounds"] = kwargs
    return layer


def default_bounds(dtype: str) -> dict[str, float]:
    """Default bounds for a pair whose (less precise) dtype is ``dtype``. A fresh dict the caller may change."""
    key = _dtype_key(dtype)
    if key in DEFAULT_BOUNDS:
        return dict(DEFAULT_BOUNDS[key])
    try:
        is_float = by_name(key).is_float
    except KeyError:
        is_float = True
    return dict(DEFAULT_BOUNDS[_FALLBACK_ROW if is_float else "integer"])


@dataclass
class Tolerance:
    """What an op may show: base bounds, per-op and per-dtype overrides, ops to skip, and the judging mode.

    ``ops`` keys are an op type ("SelfAttentionOperation") or an fnmatch glob on the op name, its rel_dir or the
    paired torch module name ("*layers.0*"). Constructing one validates and canonicalises every entry.
    """

    bounds: dict[str, float] = field(default_factory=dict)
    ops: dict[str, dict[str, float]] = field(default_factory=dict)
    dtypes: dict[str, dict[str, float]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    mode: str = "added"
    use_defaults: bool = True
    output: dict = field(default_factory=dict)  # output-check bounds and the logits' name (OUTPUT_KEYS)

    def __post_init__(self) -> None:
        self.output = _output(self.output)
        self.bounds = _bounds(self.bounds)
        self.ops = _nested(self.ops, "ops")
        self.dtypes = _nested(self.dtypes, "dtypes", dtype_keys=True)
        self.skip = _skip(self.skip)
        self.mode = _mode(self.mode)
        if not isinstance(self.use_defaults, bool):
            raise ToleranceError(f"ait_tolerance: use_defaults={self.use_defaults!r} must be True or False")

    @classmethod
    def from_marker(cls, *args: object, **kwargs: object) -> Tolerance:
        """A Tolerance from ``@pytest.mark.ait_tolerance(...)`` arguments.

        Keyword arguments are metric bounds (full names or aliases: ``cos=0.999, red=0.01``) plus ``ops=``,
        ``dtypes=``, ``skip=`` (a glob or a list), ``mode=`` ("added"/"absolute") and ``use_defaults=``.
        Positional arguments may be Tolerance objects or dicts of the same keywords; later layers override
        earlier ones per metric, keywords override all. Anything invalid raises ToleranceError naming the key.
        """
        layers: list[dict] = []
        for i, arg in enumerate(args):
            if isinstance(arg, Tolerance):
                layers.append({"bounds": arg.bounds, "ops": arg.ops, "dtypes": arg.dtypes, "skip": arg.skip,
                               "mode": arg.mode, "use_defaults": arg.use_defaults, "output": arg.output})
            elif isinstance(arg, Mapping):
                layers.append(_split_kwargs(dict(arg)))
            else:
                raise ToleranceError(f"ait_tolerance: positional argument {i + 1} ({arg!r}) must be a dict of "
                                     f"bounds or a Tolerance")
        layers.append(_split_kwargs(dict(kwargs)))
        result = cls()
        for layer in layers:
            result = result.merged(cls(**layer), keep_mode="mode" not in layer,
                                   keep_defaults="use_defaults" not in layer)
        return result

    def merged(self, other: Tolerance, *, keep_mode: bool = False, keep_defaults: bool = False) -> Tolerance:
        """``other`` layered over ``self``: bounds and per-key entries merge per metric (other wins), skip globs
        accumulate, mode and use_defaults come from ``other`` unless ``keep_mode``/``keep_defaults``."""
        ops = {k: dict(v) for k, v in self.ops.items()}
        for k, v in other.ops.items():
            ops.setdefault(k, {}).update(v)
        dtypes = {k: dict(v) for k, v in self.dtypes.items()}
        for k, v in other.dtypes.items():
            dtypes.setdefault(k, {}).update(v)
        return Tolerance(
            bounds={**self.bounds, **other.bounds}, ops=ops, dtypes=dtypes,
            skip=tuple(dict.fromkeys(self.skip + other.skip)),
            mode=self.mode if keep_mode else other.mode,
            use_defaults=self.use_defaults if keep_defaults else other.use_defaults,
            output={**self.output, **other.output})

    def bounds_for(self, op_type: str, op_name: str, dtype: str, *names: str) -> dict[str, float]:
        """Effective bounds for one op: defaults(dtype) < base bounds < dtypes[dtype] < ops[op_type] < op globs
        (matched on op_name and ``names`` such as rel_dir and torch module name; later globs win)."""
        out = default_bounds(dtype) if self.use_defaults else {}
        out.update(self.bounds)
        out.update(self.dtypes.get(_dtype_key(dtype), {}))
        if op_type in self.ops:
            out.update(self.ops[op_type])
        subjects = [s for s in (op_name, *names) if s]
        for key, entry in self.ops.items():
            if key != op_type and any(fnmatchcase(s, key) for s in subjects):
                out.update(entry)
        return out

    def output_bounds(self) -> dict[str, float]:
        """The output check's bounds: its defaults (unless use_defaults=False) under the ones given."""
        from .output_check import OUTPUT_DEFAULTS

        out = dict(OUTPUT_DEFAULTS) if self.use_defaults else {}
        out.update((k, v) for k, v in self.output.items() if k != "logits")
        return out

    def is_skipped(self, op_type: str, op_name: str, *names: str) -> bool:
        """True when any skip glob matches the op type, op name, or one of ``names`` (rel_dir, module name)."""
        subjects = [s for s in (op_type, op_name, *names) if s]
        return any(fnmatchcase(s, pat) for pat in self.skip for s in subjects)


@dataclass(frozen=True)
class Breach:
    """One metric outside its limit. ``added`` is True when the value is the error the op added."""

    metric: str
    value: float
    limit: float
    kind: str  # "min" (value must be >= limit) or "max" (value must be <= limit)
    added: bool = False
    where: str = ""  # where the error arose when it is not this op's own output (e.g. unpaired ops upstream)

    def __str__(self) -> str:
        suffix = (" (added)" if self.added else "") + (f" {self.where}" if self.where else "")
        if math.isnan(self.value):
            return f"{self.metric} nan (not computed; limit {'>=' if self.kind == 'min' else '<='} " \
                   f"{self.limit:.6g}){suffix}"
        sign = "<" if self.kind == "min" else ">"
        return f"{self.metric} {self.value:.6g} {sign} {self.limit:.6g}{suffix}"


def _effective(metrics: Mapping[str, float], input_metrics: Mapping[str, float] | None,
               mode: str) -> tuple[dict[str, float], set[str]]:
    """(metrics as judged, names judged on added error)."""
    mode = _mode(mode)
    eff = {k: float(v) for k, v in metrics.items()}
    added: set[str] = set()
    if mode != "added" or not input_metrics:
        return eff, added
    for name in ADDED_METRICS:
        out = eff.get(name, math.nan)
        inp = input_metrics.get(name, math.nan)
        if inp is None or math.isnan(out) or math.isnan(float(inp)):
            continue  # nothing known about the input: judge the output as it is
        inp = float(inp)
        if name == "cosine_similarity":
            eff[name] = 1.0 - max(0.0, inp - out)
        else:
            eff[name] = max(0.0, out - inp) if not (math.isinf(out) and math.isinf(inp)) else out
        added.add(name)
    return eff, added


def effective_metrics(metrics: Mapping[str, float], input_metrics: Mapping[str, float] | None = None,
                      mode: str = "added") -> dict[str, float]:
    """The metric values judge() compares with the bounds (in added mode, the error the op itself added)."""
    return _effective(metrics, input_metrics, mode)[0]


def judge(metrics: Mapping[str, float], bounds: Mapping[str, float], *,
          input_metrics: Mapping[str, float] | None = None, mode: str = "added") -> list[Breach]:
    """Breaches of ``bounds`` by ``metrics``, in METRICS order (empty list: the op passes).

    A bounded metric that is NaN (not computed) is a breach. In "added" mode with ``input_metrics`` (same metrics
    on the op's inputs, worst over inputs) cosine, relative euclidean distance and KL are judged on the added error.
    """
    limits = {canonical_metric(k, where="judge"): float(v) for k, v in bounds.items()}
    eff, added = _effective(metrics, input_metrics, mode)
    breaches = []
    for name in METRICS:
        if name not in limits:
            continue
        limit, value = limits[name], eff.get(name, math.nan)
        lower = name in LOWER_BOUNDED
        if math.isnan(value) or (value < limit if lower else value > limit):
            breaches.append(Breach(name, value, limit, "min" if lower else "max", name in added))
    return breaches
