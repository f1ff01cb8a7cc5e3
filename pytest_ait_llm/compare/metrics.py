"""Comparison metrics for one golden/my tensor pair, computed in ONE chunked pass over both payloads.

Why one pass: real dumps hold GB-size tensors that are memory-mapped. Reading each payload once, a chunk at a
time, keeps memory bounded (a few chunk-sized buffers, reused) and the run I/O-bound instead of seven times
I/O-bound. Every metric is therefore written as a streaming accumulation in float64; KL divergence uses an
online log-sum-exp. Definitions, and where they deliberately differ from ait/msit, are in docs/metrics.md.

Two forms of the pass give the same sums: the compiled one (``_kernel.c`` through ``fastpass.py``, ~1.5 ns per
element pair), used whenever it is built and both dtypes are floats, and the numpy one below (~7 ns), which is
the fallback and the reference the tests hold the compiled one to. The final formulas (``_metric_values``) are
shared. Both are float64 throughout and agree to ~1e-12 relative (docs/metrics.md says where the KL's floor is).
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import AitLlmError
from ..formats.dtypes import by_name
from ..formats.tensor import DEFAULT_CHUNK, RawTensor
from . import fastpass

METRICS = (
    "cosine_similarity",
    "max_relative_error",
    "mean_relative_error",
    "max_absolute_error",
    "mean_absolute_error",
    "kl_divergence",
    "relative_euclidean_distance",
)

#: The original tool's epsilon: relative errors ignore |golden| <= EPS, and a golden norm <= EPS counts as zero.
EPS = float(np.finfo(np.float32).eps)

#: Original fail-reason texts, kept verbatim as prefixes so reports stay greppable by users of ait/msit.
#: Largest step actually processed: the four working buffers of 32 Ki float64 stay in a core's L2 cache, which
#: measured ~20 % faster than 256 Ki steps on a Xeon with 2 MiB L2 per core (per-step Python overhead stays < 15 %).
CACHE_BLOCK = 1 << 15

SHAPE_MISMATCH = "data shape doesn't match."
GOLDEN_NAN = "golden_data includes NAN or inf."
MY_NAN = "my_data includes NAN or inf."


@dataclass
class TensorStats:
    """Summary of one tensor as the report shows it. max/min/mean are over finite elements (NaN if none)."""

    dtype: str
    shape: tuple
    numel: int
    max: float
    min: float
    mean: float
    nan_count: int
    inf_count: int


@dataclass
class PairMetrics:
    """Result of comparing one pair. ``values`` holds every METRICS key (NaN when not computed);
    ``fail_reason`` is "" exactly when the metrics were computed. ``custom`` maps a custom metric's name to its
    number or text; ``custom_messages`` keeps the optional message a custom metric returned beside its value."""

    values: dict[str, float]
    golden: TensorStats | None
    my: TensorStats | None
    fail_reason: str = ""
    custom: dict[str, object] = field(default_factory=dict)
    custom_messages: dict[str, str] = field(default_factory=dict)

    @property
    def compared(self) -> bool:
        return not self.fail_reason


# ----------------------------------------------------------------------------------------------------------------
# shapes


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def shapes_compatible(golden_shape: Sequence[int], my_shape: Sequence[int]) -> str | None:
    """How two shapes can be compared element-wise, or None.

    "equal": same shape. "squeeze": same shape once size-1 dims are dropped ([s,1,h] vs [1,s,h]).
    "swap01": one is the other with dims 0 and 1 swapped ([s,b,h] vs [b,s,h], b > 1): golden is read transposed.
    "broadcast": same trailing dims and one dim0 is k >= 2 times the other's (or the smaller lacks dim0 altogether):
    each of the k dim0-blocks of the larger is compared with the smaller, as if the smaller were repeated.
    The pairing code uses the rule name as evidence that two tensors belong together.
    """
    g = tuple(int(d) for d in golden_shape)
    m = tuple(int(d) for d in my_shape)
    if g == m:
        return "equal"
    ng, nm = prod(g), prod(m)
    if ng == nm and tuple(d for d in g if d != 1) == tuple(d for d in m if d != 1):
        return "squeeze"
    if (len(g) == len(m) >= 2 and g[0] == m[1] and g[1] == m[0] and g[2:] == m[2:] and g[0] != g[1]
            and ng == nm):
        return "swap01"
    if _broadcast_factor(g, m) is not None:
        return "broadcast"
    return None


def _broadcast_factor(g: tuple[int, ...], m: tuple[int, ...]) -> int | None:
    """k when the larger tensor is k stacked copies (along dim0) of the smaller's shape, else None."""
    big, small = (g, m) if prod(g) >= prod(m) else (m, g)
    if len(big) == len(small) + 1:
        small = (1,) + small
    if len(big) != len(small) or not big or big[1:] != small[1:] or small[0] < 1:
        return None
    if big[0] % small[0] or big[0] // small[0] < 2 or prod(small) == 0:
        return None
    return big[0] // small[0]


# ----------------------------------------------------------------------------------------------------------------
# chunk plumbing


def _flat(t: RawTensor) -> np.ndarray:
    """The flat storage of ``t`` limited to its logical element count (a view, never a copy)."""
    return t.data.reshape(-1)[: t.numel]


class _Widener:
    """Widens raw storage slices (any shape, possibly strided) into ONE reused float64 buffer.

    A fresh float64 array per chunk would fault in new pages on GB tensors: one buffer is reused.
    bf16 travels as 16-bit patterns: shifted into the high half of a uint32 it is the exact float32 value.
    """

    def __init__(self, t: RawTensor, size: int):
        self.bf16 = t.dtype == "bfloat16" and t.data.dtype.itemsize == 2 and t.data.dtype.kind in "ui"
        self.buf = np.empty(size, np.float64)
        self.u32 = np.empty(size, np.uint32) if self.bf16 else None

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        n = raw.size
        out = self.buf[:n]
        if self.bf16:
            u = self.u32[:n]
            np.copyto(u.reshape(raw.shape), raw, casting="unsafe")
            np.left_shift(u, 16, out=u)
            np.copyto(out, u.view(np.float32), casting="unsafe")
        else:
            np.copyto(out.reshape(raw.shape), raw, casting="unsafe")
        return out


# A plan yields aligned raw slices: (golden_raw, my_raw, count golden in its stats, count my in its stats).
_Plan = Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]


def _plan(golden: RawTensor, my: RawTensor, rule: str, chunk: int) -> _Plan:
    gf, mf = _flat(golden), _flat(my)
    if rule in ("equal", "squeeze"):
        for s in range(0, gf.size, chunk):
            yield gf[s:s + chunk], mf[s:s + chunk], True, True
    elif rule == "swap01":
        # golden (A, B, R) is compared in my's (B, A, R) order: golden[j, i, :] against my[i, j, :].
        a, b = int(golden.shape[0]), int(golden.shape[1])
        r = gf.size // (a * b)
        g3, m3 = gf.reshape(a, b, r), mf.reshape(b, a, r)
        if r <= chunk:
            rows = max(1, chunk // r)
            for i in range(b):
                for j0 in range(0, a, rows):
                    yield g3[j0:j0 + rows, i, :], m3[i, j0:j0 + rows, :], True, True
        else:
            for i in range(b):
                for j in range(a):
                    for k0 in range(0, r, chunk):
                        yield g3[j, i, k0:k0 + chunk], m3[i, j, k0:k0 + chunk], True, True
    elif rule == "broadcast":
        golden_is_big = gf.size >= mf.size
        big, small = (gf, mf) if golden_is_big else (mf, gf)
        n = small.size
        for rep in range(big.size // n):
            base = rep * n
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                if golden_is_big:
                    yield big[base + s:base + e], small[s:e], True, rep == 0
                else:
                    yield small[s:e], big[base + s:base + e], rep == 0, True
    else:  # pragma: no cover - guarded by shapes_compatible
        raise ValueError(rule)


class _StatsAcc:
    """Running max/min/sum over finite values plus NaN/inf counts of one tensor.

    ``chunk_max`` is the maximum of the last chunk added (over its finite values); the KL accumulation reuses it
    instead of reading the chunk again.
    """

    def __init__(self) -> None:
        self.nan = 0
        self.inf = 0
        self.fin_n = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.chunk_max = -math.inf

    def add(self, x: np.ndarray) -> bool:
        """Accumulate a chunk; True when every element of it is finite."""
        n = x.size
        s = float(x.sum())
        if math.isfinite(s):  # a NaN or inf anywhere would have made the sum non-finite
            self.sum += s
            self.fin_n += n
            self.chunk_max = float(x.max())
            self.min = min(self.min, float(x.min()))
            self.max = max(self.max, self.chunk_max)
            return True
        fin = np.isfinite(x)
        nf = int(np.count_nonzero(fin))
        nan = int(np.count_nonzero(np.isnan(x)))
        self.nan += nan
        self.inf += n - nf - nan
        self.chunk_max = -math.inf
        if nf:
            v = x[fin]
            self.sum += float(v.sum())
            self.fin_n += nf
            self.chunk_max = float(v.max())
            self.min = min(self.min, float(v.min()))
            self.max = max(self.max, self.chunk_max)
        return nf == n

    @classmethod
    def from_slots(cls, sums: dict[str, float], side: str) -> "_StatsAcc":
        """The same accumulator, read from the compiled pass's slots of one side ("golden" or "my")."""
        acc = cls()
        acc.nan, acc.inf, acc.fin_n = (int(sums[f"{side}_{k}"]) for k in ("nan", "inf", "finite"))
        acc.sum, acc.min, acc.max = (sums[f"{side}_{k}"] for k in ("sum", "min", "max"))
        return acc

    def result(self, t: RawTensor) -> TensorStats:
        nan = math.nan
        return TensorStats(
            dtype=str(t.dtype), shape=tuple(int(d) for d in t.shape), numel=int(t.numel),
            max=self.max if self.fin_n else nan, min=self.min if self.fin_n else nan,
            mean=self.sum / self.fin_n if self.fin_n else nan,
            nan_count=self.nan, inf_count=self.inf)


class _MetricAcc:
    """Streaming sums for every metric. Buffers are chunk-sized and reused; all accumulation is float64.

    Per chunk this is about 25 vectorised steps over cache-resident buffers; together they cost ~7.2 ns per element
    pair on one core of the 2-core Xeon (fp32 vs bf16), down from ~8.5 ns: the dot products go through ``_dot``
    (BLAS on short rows, ~2x einsum), the KL maxima come from the stats pass instead of a re-read, and the KL
    exponentials skip the shift subtraction while values stay within +-LSE_SAFE. exp() stays numpy's: torch's is
    faster alone, but every torch call enters an OpenMP region that, on a loaded 2-core box, measured 10-30x
    slower than numpy's single-threaded exp.
    """

    def __init__(self, size: int):
        self.d = np.empty(size, np.float64)  # m - g, then |m - g|
        self.e = np.empty(size, np.float64)  # exp(...) weights, then relative errors
        self.mask = np.empty(size, np.bool_)
        self.n = 0
        self.gm = self.gg = self.mm = self.dd = 0.0
        self.abs_sum = self.rel_sum = 0.0
        self.abs_max = self.rel_max = 0.0
        # online log-sum-exp with shifts M (see _lse_shift): S = sum(exp(x - M)), T = sum(exp(g - Mg) * (g - m))
        self.mg = self.mm_max = -math.inf
        self.sg = self.sm = self.t = 0.0

    def add(self, g: np.ndarray, m: np.ndarray, g_max: float, m_max: float) -> None:
        """Accumulate one aligned chunk pair; ``g_max``/``m_max`` are the chunks' maxima (all values finite)."""
        n = g.size
        d, e, mask = self.d[:n], self.e[:n], self.mask[:n]
        self.n += n
        self.gm += _dot(g, m)
        self.gg += _dot(g, g)
        self.mm += _dot(m, m)
        np.subtract(m, g, out=d)
        self.dd += _dot(d, d)

        shift = _lse_shift(self.mg, g_max)
        if shift != self.mg:
            scale = math.exp(self.mg - shift) if self.sg else 0.0
            self.sg *= scale
            self.t *= scale
            self.mg = shift
        _exp_shifted(g, self.mg, e)
        self.sg += float(e.sum())
        self.t -= _dot(e, d)
        shift = _lse_shift(self.mm_max, m_max)
        if shift != self.mm_max:
            self.sm *= math.exp(self.mm_max - shift) if self.sm else 0.0
            self.mm_max = shift
        _exp_shifted(m, self.mm_max, e)
        self.sm += float(e.sum())

        np.abs(d, out=d)
        self.abs_sum += float(d.sum())
        self.abs_max = max(self.abs_max, float(d.max()))
        np.abs(g, out=e)
        np.less_equal(e, EPS, out=mask)
        if mask.any():  # |g| <= eps contributes 0 (the original's definition): d / inf == 0
            np.copyto(e, np.inf, where=mask)
        np.divide(d, e, out=e)
        self.rel_sum += float(e.sum())
        self.rel_max = max(self.rel_max, float(e.max()))

    def result(self, golden_zero: bool, my_zero: bool) -> dict[str, float]:
        return _metric_values(self.n, self.gm, self.gg, self.mm, self.dd, self.abs_sum, self.abs_max, self.rel_sum,
                              self.rel_max, self.mg, self.sg, self.t, self.mm_max, self.sm, golden_zero, my_zero)


def _metric_values(n: float, gm: float, gg: float, mm: float, dd: float, abs_sum: float, abs_max: float,
                   rel_sum: float, rel_max: float, shift_g: float, sum_g: float, t: float, shift_m: float,
                   sum_m: float, golden_zero: bool, my_zero: bool) -> dict[str, float]:
    """The report's numbers from the sums of either pass (numpy or compiled): Σg·m, Σg², Σm², Σ(m-g)², the
    absolute/relative error sums and maxima, and the online log-sum-exp (shift, Σexp(x - shift)) of each side with
    t = Σexp(g - shift_g)·(g - m)."""
    cos, red = _cosine_and_red(gm, gg, mm, dd, golden_zero, my_zero)
    # KL(p_g || p_m) = sum p_g (g - m) + LSE(m) - LSE(g); the LSE difference is formed from the shifts and the
    # ratio of the scaled sums so that nearly equal tensors do not lose digits to cancellation.
    kl = t / sum_g + (shift_m - shift_g) + math.log(sum_m / sum_g)
    return {
        "cosine_similarity": cos,
        "max_relative_error": rel_max,
        "mean_relative_error": rel_sum / n,
        "max_absolute_error": abs_max,
        "mean_absolute_error": abs_sum / n,
        "kl_divergence": max(0.0, kl) if not math.isnan(kl) else math.nan,
        "relative_euclidean_distance": red,
    }


#: exp(x - shift) stays finite and its sum over any dump stays below 1e300 while x - shift <= LSE_SAFE; values more
#: than ~745 below the shift underflow to 0, which is below the float64 resolution of a sum holding exp(max - shift).
LSE_SAFE = 600.0


def _lse_shift(shift: float, chunk_max: float) -> float:
    """The shift of the online log-sum-exp after a chunk whose maximum is ``chunk_max``.

    0 while every value seen lies within +-LSE_SAFE (the usual case: exp() then runs on the chunk itself, no
    subtraction pass); otherwise the running maximum, moved only when a value would overflow.
    """
    if shift == -math.inf:  # first chunk
        return 0.0 if -LSE_SAFE <= chunk_max <= LSE_SAFE else chunk_max
    return chunk_max if chunk_max - shift > LSE_SAFE else shift


def _exp_shifted(x: np.ndarray, shift: float, out: np.ndarray) -> None:
    if shift == 0.0:
        np.exp(x, out=out)
    else:
        np.subtract(x, shift, out=out)
        np.exp(out, out=out)


#: Row length of the blocked dot products. OpenBLAS runs ``dot`` on all its threads above 10 000 elements, and with
#: pairs compared in parallel processes those threads fight over the cores (docs/performance.md): rows of 4096 keep
#: every BLAS call single-threaded whatever the chunk size.
DOT_ROW = 4096


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Σ a·b in float64 for contiguous 1-D chunks, as row-wise BLAS dots of DOT_ROW elements (never threaded)."""
    n = a.size
    head = n - n % DOT_ROW
    total = 0.0
    if head:
        total = float(np.vecdot(a[:head].reshape(-1, DOT_ROW), b[:head].reshape(-1, DOT_ROW)).sum())
    if head < n:
        total += float(np.dot(a[head:], b[head:]))
    return total


def _nan_values() -> dict[str, float]:
    return {k: math.nan for k in METRICS}


def _is_float_dtype(name: str) -> bool:
    try:
        return by_name(name).is_float
    except KeyError:
        return "float" in str(name) or "bf16" in str(name)


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def tensor_stats(t: RawTensor, *, chunk: int = DEFAULT_CHUNK) -> TensorStats:
    """max/min/mean over finite values and NaN/inf counts of one tensor (one chunked pass; empty is fine)."""
    acc = _StatsAcc()
    flat = _flat(t)
    chunk = max(1, int(chunk))
    if flat.size:
        widen = _Widener(t, min(chunk, flat.size))
        with np.errstate(all="ignore"):  # inf + -inf in a sum is expected data, not a warning for the user
            for s in range(0, flat.size, chunk):
                acc.add(widen(flat[s:s + chunk]))
    return acc.result(t)


def _nan_reason(prefix: str, st: TensorStats) -> str:
    return f"{prefix} ({st.nan_count} NaN, {st.inf_count} inf of {st.numel})"


def compare_tensors(golden: RawTensor, my: RawTensor, *, chunk: int = DEFAULT_CHUNK,
                    custom_metrics: Sequence[CustomMetric | str] = ()) -> PairMetrics:
    """Every metric of METRICS for one pair, plus both tensors' stats, in one fused chunked pass.

    Never raises for data problems: empty tensors, incompatible shapes, int-vs-float dtypes and NaN/inf become
    ``fail_reason`` (stats are still filled) and the metrics stay NaN.
    """
    kernel_chunk = max(1, int(chunk))  # the compiled pass blocks for the cache itself
    chunk = max(1, min(int(chunk), CACHE_BLOCK))
    customs = [load_custom_metric(c) if isinstance(c, str) else c for c in custom_metrics]
    result = PairMetrics(values=_nan_values(), golden=None, my=None,
                         custom={c.name: math.nan for c in customs})

    def not_compared(reason: str) -> PairMetrics:
        result.golden = tensor_stats(golden, chunk=chunk)
        result.my = tensor_stats(my, chunk=chunk)
        result.fail_reason = reason
        return result

    short = [f"{side} payload holds {t.data.size} elements but shape {_shape_text(t.shape)} needs {t.numel}"
             for side, t in (("golden", golden), ("my", my)) if t.data.size < t.numel]
    if short:
        return not_compared("; ".join(short))
    empty = [side for side, t in (("golden", golden), ("my", my)) if t.numel == 0]
    if empty:
        return not_compared(f"empty tensor ({', '.join(empty)})")
    rule = shapes_compatible(golden.shape, my.shape)
    if rule is None:
        return not_compared(f"{SHAPE_MISMATCH} golden {_shape_text(golden.shape)} vs my {_shape_text(my.shape)}")
    if _is_float_dtype(golden.dtype) != _is_float_dtype(my.dtype):
        return not_compared(f"dtype {golden.dtype} vs {my.dtype}: quantized or different tensor, not compared")

    if fastpass.usable(golden, my):
        finite = _compiled_pass(golden, my, rule, kernel_chunk, result)
    else:
        finite = _numpy_pass(golden, my, rule, chunk, result)
    if not finite:
        reasons = []
        if result.golden.nan_count or result.golden.inf_count:
            reasons.append(_nan_reason(GOLDEN_NAN, result.golden))
        if result.my.nan_count or result.my.inf_count:
            reasons.append(_nan_reason(MY_NAN, result.my))
        result.fail_reason = "; ".join(reasons)
        return result
    if customs:
        g_all, m_all = _aligned(golden, my, rule)
        for c in customs:
            value, message = c(g_all, m_all)
            result.custom[c.name] = value
            if message:
                result.custom_messages[c.name] = message
    return result


def _numpy_pass(golden: RawTensor, my: RawTensor, rule: str, chunk: int, result: PairMetrics) -> bool:
    """Fill ``result``'s stats and (when every value is finite) its metrics; False when some value is not."""
    size = min(chunk, max(golden.numel, my.numel))
    wg, wm = _Widener(golden, size), _Widener(my, size)
    sg, sm = _StatsAcc(), _StatsAcc()
    acc = _MetricAcc(size)
    finite = True
    with np.errstate(all="ignore"):  # NaN/inf/overflow are reported through fail_reason, never as warnings
        for graw, mraw, count_g, count_m in _plan(golden, my, rule, chunk):
            g, m = wg(graw), wm(mraw)
            ok_g = sg.add(g) if count_g else True
            ok_m = sm.add(m) if count_m else True
            finite = finite and ok_g and ok_m
            if finite:
                # a broadcast block already counted in the stats is not re-counted, so its maximum is read here
                acc.add(g, m, sg.chunk_max if count_g else float(g.max()), sm.chunk_max if count_m else float(m.max()))
        result.golden, result.my = sg.result(golden), sm.result(my)
        if finite:
            result.values = acc.result(_all_zero(result.golden), _all_zero(result.my))
    return finite


def _compiled_pass(golden: RawTensor, my: RawTensor, rule: str, chunk: int, result: PairMetrics) -> bool:
    """:func:`_numpy_pass` through the compiled kernel: same sums, same formulas, one C call per run."""
    sums = fastpass.run_full(golden, my, _plan(golden, my, rule, chunk))
    result.golden = _StatsAcc.from_slots(sums, "golden").result(golden)
    result.my = _StatsAcc.from_slots(sums, "my").result(my)
    if sums["finite"] != 1.0:
        return False
    result.values = _metric_values(**{k: sums[k] for k in fastpass.METRIC_SUMS},
                                   golden_zero=_all_zero(result.golden), my_zero=_all_zero(result.my))
    return True


def similarity(golden: RawTensor, my: RawTensor, *, chunk: int = DEFAULT_CHUNK) -> dict[str, float] | None:
    """Cosine similarity and relative euclidean distance only, from a lighter pass than :func:`compare_tensors`.

    This is what the engine measures on an op's *inputs*: the error the op received, against which the error it
    adds is judged. Same definitions and shape rules as the full pass; None when the pair cannot be compared
    (empty, short payload, incompatible shapes, int vs float, NaN/inf), so that such an input is simply not used.
    """
    kernel_chunk = max(1, int(chunk))
    chunk = max(1, min(int(chunk), CACHE_BLOCK))
    if golden.numel == 0 or my.numel == 0 or any(t.data.size < t.numel for t in (golden, my)):
        return None
    rule = shapes_compatible(golden.shape, my.shape)
    if rule is None or _is_float_dtype(golden.dtype) != _is_float_dtype(my.dtype):
        return None
    if fastpass.usable(golden, my):
        sums = fastpass.run_light(golden, my, _plan(golden, my, rule, kernel_chunk))
        gm, gg, mm, dd = (sums[k] for k in ("gm", "gg", "mm", "dd"))
    else:
        gm, gg, mm, dd = _numpy_dots(golden, my, rule, chunk)
    if not all(math.isfinite(x) for x in (gm, gg, mm, dd)):
        return None
    cos, red = _cosine_and_red(gm, gg, mm, dd, gg == 0, mm == 0)
    return {"cosine_similarity": cos, "relative_euclidean_distance": red}


def _numpy_dots(golden: RawTensor, my: RawTensor, rule: str, chunk: int) -> tuple[float, float, float, float]:
    """Σg·m, Σg², Σm², Σ(m-g)² in float64 (the numpy form of the light pass)."""
    size = min(chunk, max(golden.numel, my.numel))
    wg, wm = _Widener(golden, size), _Widener(my, size)
    d = np.empty(size, np.float64)
    gm = gg = mm = dd = 0.0
    with np.errstate(all="ignore"):
        for graw, mraw, _, _ in _plan(golden, my, rule, chunk):
            g, m = wg(graw), wm(mraw)
            diff = d[:g.size]
            np.subtract(m, g, out=diff)
            gm += _dot(g, m)
            gg += _dot(g, g)
            mm += _dot(m, m)
            dd += _dot(diff, diff)
    return gm, gg, mm, dd


def _cosine_and_red(gm: float, gg: float, mm: float, dd: float, golden_zero: bool,
                    my_zero: bool) -> tuple[float, float]:
    """Cosine similarity and relative euclidean distance from Σg·m, Σg², Σm², Σ(m-g)² (either pass, full or
    light): two all-zero tensors are identical (1.0), one all-zero one orthogonal (0.0); a golden norm <= EPS
    gives a distance of 0.0 if mine equals it, else inf."""
    if golden_zero and my_zero:
        cos = 1.0
    elif golden_zero or my_zero:
        cos = 0.0
    else:
        denom = _norm_product(gg, mm)
        cos = min(1.0, max(-1.0, gm / denom)) if denom > 0 else math.nan
    red = (0.0 if dd == 0 else math.inf) if gg <= EPS * EPS else math.sqrt(dd / gg)
    return cos, red


def _norm_product(gg: float, mm: float) -> float:
    """sqrt(gg) * sqrt(mm), as one square root when the product is representable: identical tensors then give a
    cosine of exactly 1.0 (sqrt(x)**2 is not always x)."""
    product = gg * mm
    return math.sqrt(product) if 0 < product < math.inf else math.sqrt(gg) * math.sqrt(mm)


def _all_zero(st: TensorStats) -> bool:
    return st.max == 0 and st.min == 0


def _aligned(golden: RawTensor, my: RawTensor, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Both tensors as flat float64 arrays in compared order (custom metrics need whole arrays)."""
    n = max(golden.numel, my.numel)
    g_all, m_all = np.empty(n, np.float64), np.empty(n, np.float64)
    size = min(DEFAULT_CHUNK, n)
    wg, wm = _Widener(golden, size), _Widener(my, size)
    pos = 0
    for graw, mraw, _, _ in _plan(golden, my, rule, size):
        k = graw.size
        g_all[pos:pos + k] = wg(graw)
        m_all[pos:pos + k] = wm(mraw)
        pos += k
    return g_all, m_all


# ----------------------------------------------------------------------------------------------------------------
# custom metrics


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _normalise_return(ret: object) -> tuple[object, str]:
    """(value, message) from a custom metric's return; TypeError when it is neither shape the original allowed."""
    message: object = ""
    value = ret
    if isinstance(ret, (tuple, list)):
        if len(ret) != 2:
            raise TypeError(f"returned a {type(ret).__name__} of length {len(ret)}, expected (value, message)")
        value, message = ret
    if message is None:
        message = ""
    if not isinstance(message, str):
        raise TypeError(f"returned message of type {type(message).__name__}, expected str")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, str):
        return value, _one_line(message)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value), _one_line(message)
    raise TypeError(f"returned {type(value).__name__}, expected a number, a str or (number|str, message)")


@dataclass(frozen=True)
class CustomMetric:
    """A user metric ``func(golden, my)`` over flat float64 arrays, named after the function."""

    name: str
    func: Callable[..., object]
    spec: str = ""

    def __call__(self, golden: np.ndarray, my: np.ndarray) -> tuple[object, str]:
        """(value, message); a failure becomes the text "error: <one line>" so one bad metric never aborts a run."""
        try:
            return _normalise_return(self.func(golden, my))
        except Exception as exc:  # noqa: BLE001 - user code; report, never crash
            return "error: " + _one_line(f"{type(exc).__name__}: {exc}"), ""


def load_custom_metric(spec: str) -> CustomMetric:
    """Load ``"path/to/file.py:func"`` and probe it once with ones(1) arrays, as the original did.

    Raises AitLlmError (one line, naming the spec) for a bad spec, a missing file or function, a non-callable,
    a name clashing with a built-in metric, an import error or a failing probe.
    """
    text = str(spec)
    path_text, sep, func_name = text.rpartition(":")
    if not sep or not path_text or not func_name.isidentifier():
        raise AitLlmError(f"custom metric {text!r}: expected 'path/to/file.py:function'")
    path = Path(path_text)
    if not path.is_file():
        raise AitLlmError(f"custom metric {text!r}: {path} is not a file")
    if func_name in METRICS:
        raise AitLlmError(f"custom metric {text!r}: name {func_name!r} clashes with a built-in metric")
    module_name = f"_ait_llm_custom_metric_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("not a Python source file")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code
        raise AitLlmError(f"custom metric {text!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if func is None:
        raise AitLlmError(f"custom metric {text!r}: {path} has no function {func_name!r}")
    if not callable(func):
        raise AitLlmError(f"custom metric {text!r}: {func_name!r} in {path} is not callable")
    try:
        _normalise_return(func(np.ones(1), np.ones(1)))
    except Exception as exc:  # noqa: BLE001 - user code
        raise AitLlmError(f"custom metric {text!r}: probe call with ones(1) failed: {type(exc).__name__}: {exc}") \
            from exc
    return CustomMetric(name=func_name, func=func, spec=text)
