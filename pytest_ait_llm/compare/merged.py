"""Metrics of a split op's concatenation over ranks, without building the concatenated tensor.

Every metric of the fused pass is a sum or an extremum over element pairs, so it does not depend on the order the
pairs come in: feeding the pass rank 0's file against its slice of the golden, then rank 1's against the next
slice, and so on, gives the metrics of the concatenation in rank order. Each run is a block of whole rows of one
shard, so memory stays bounded by a chunk (plus the mapped files), never N times the largest file.

Between ranks the running Σg·m, Σg², Σm², Σ(m-g)² are noted, so each rank's own cosine and relative distance come
for free: the share of the error each shard carries (localisation: "gate_proj, rank 1's shard").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from math import prod
from typing import Iterator, Sequence

import numpy as np

from ..formats.tensor import DEFAULT_CHUNK, RawTensor
from . import fastpass
from .metrics import (CACHE_BLOCK, GOLDEN_NAN, MY_NAN, PairMetrics, _all_zero, _cosine_and_red, _flat,
                      _is_float_dtype, _MetricAcc, _metric_values, _nan_reason, _nan_values, _StatsAcc, _Widener,
                      tensor_stats)


#: Elements per run of the compiled pass: a golden slice copied into the reused buffer is still in the cache when
#: the pass reads it.
RUN = 1 << 16


@dataclass
class ShardShare:
    """One rank's part of a merged comparison: its own cosine and relative distance against its golden slice, and
    its share of the total squared error Σ(m-g)²."""

    cosine_similarity: float
    relative_euclidean_distance: float
    error_share: float


@dataclass(frozen=True)
class _Concatenated:
    """What the stats need of the merged "my" side: dtype, shape and element count (no storage)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _runs(golden: RawTensor, shards: Sequence[RawTensor], dim: int, rank: int, chunk: int) -> Iterator[tuple]:
    """Aligned (golden slice, shard rows) runs of one rank: whole rows of the shard, about ``chunk`` elements."""
    outer = prod(int(d) for d in golden.shape[:dim])
    inner = prod(int(d) for d in golden.shape[dim + 1:])
    full = int(golden.shape[dim])
    start = sum(int(s.shape[dim]) for s in shards[:rank])
    width = int(shards[rank].shape[dim])
    g3 = _flat(golden).reshape(outer, full, inner)[:, start:start + width, :]
    m3 = _flat(shards[rank]).reshape(outer, width, inner)
    rows = max(1, chunk // max(1, width * inner))
    for o in range(0, outer, rows):
        yield g3[o:o + rows], m3[o:o + rows], True, True


def _kernel_state() -> np.ndarray:
    return np.array(fastpass._kernel.STATE_START, np.float64)


def _kernel_sums(state: np.ndarray) -> dict[str, float]:
    """The compiled pass's state by slot name (the names _metric_values and the stats take)."""
    return dict(zip(fastpass.SLOTS, state.tolist()))


def _dots(state: np.ndarray) -> tuple[float, float, float, float]:
    """The running Σg·m, Σg², Σm², Σ(m-g)² of the compiled pass's state."""
    return tuple(float(state[fastpass.SLOTS.index(k)]) for k in ("gm", "gg", "mm", "dd"))


def _copied(view: np.ndarray, buf: np.ndarray) -> np.ndarray:
    out = buf[: view.size].reshape(view.shape)
    np.copyto(out, view)
    return out


def _side(sums: dict[str, float], side: str) -> _StatsAcc:
    acc = _StatsAcc()
    acc.nan, acc.inf, acc.fin_n = (int(sums[f"{side}_{k}"]) for k in ("nan", "inf", "finite"))
    acc.sum, acc.min, acc.max = (sums[f"{side}_{k}"] for k in ("sum", "min", "max"))
    return acc


_SUMS = ("n", "gm", "gg", "mm", "dd", "abs_sum", "abs_max", "rel_sum", "rel_max", "shift_g", "sum_g", "t",
         "shift_m", "sum_m")


def compare_merged(golden: RawTensor, shards: Sequence[RawTensor], dim: int, *,
                   chunk: int = DEFAULT_CHUNK) -> tuple[PairMetrics, list[ShardShare]]:
    """Every metric of the concatenation of ``shards`` along ``dim`` (rank order) against ``golden``, and each
    shard's share, in one fused pass over the files as they are.

    ``golden``'s shape must equal the shards' shapes except along ``dim``, where their extents sum to golden's (the
    caller decided the split, see mapping/ranks.py). Data problems become ``fail_reason`` as in compare_tensors.
    """
    shape = tuple(int(d) for d in golden.shape)
    merged_shape = shape[:dim] + (sum(int(s.shape[dim]) for s in shards),) + shape[dim + 1:]
    my_view = _Concatenated(str(shards[0].dtype), merged_shape)
    result = PairMetrics(values=_nan_values(), golden=None, my=None)

    def not_compared(reason: str) -> tuple[PairMetrics, list[ShardShare]]:
        result.golden = tensor_stats(golden, chunk=min(chunk, CACHE_BLOCK))
        result.fail_reason = reason
        return result, []

    if merged_shape != shape or any(len(s.shape) != len(shape) for s in shards):
        return not_compared(f"shards {[list(s.shape) for s in shards]} do not concatenate along dim {dim} to golden "
                            f"{list(shape)}")
    short = [f"rank {r}'s payload holds {s.data.size} elements but shape {list(s.shape)} needs {s.numel}"
             for r, s in enumerate(shards) if s.data.size < s.numel]
    if golden.data.size < golden.numel:
        short.insert(0, f"golden payload holds {golden.data.size} elements but needs {golden.numel}")
    if short:
        return not_compared("; ".join(short))
    if golden.numel == 0:
        return not_compared("empty tensor (golden)")
    if len({str(s.dtype) for s in shards}) > 1 or _is_float_dtype(golden.dtype) != _is_float_dtype(shards[0].dtype):
        return not_compared(f"dtypes golden {golden.dtype} vs shards {[str(s.dtype) for s in shards]}: not compared")

    dots: list[tuple[float, float, float, float]] = []  # running Σg·m, Σg², Σm², Σ(m-g)² after each rank
    if all(fastpass.usable(golden, s) for s in shards):
        state = _kernel_state()
        gk = fastpass._kind(golden)
        step = max(1, min(int(chunk), RUN))
        # one reused buffer for the golden slices, which are strided: a fresh array per run costs page faults
        gbuf = np.empty(step + max(int(s.shape[dim]) * prod(shape[dim + 1:]) for s in shards), golden.data.dtype)
        for r, shard in enumerate(shards):
            mk = fastpass._kind(shard)
            for g, m, cg, cm in _runs(golden, shards, dim, r, step):
                if not g.flags.c_contiguous:
                    g = _copied(g, gbuf)
                fastpass._kernel.full(g, gk, fastpass._contiguous(m), mk, state, cg, cm)
            dots.append(_dots(state))
        sums = _kernel_sums(state)
        sg, sm = _side(sums, "golden"), _side(sums, "my")
        finite = sums["finite"] == 1.0
        values = {k: sums[k] for k in _SUMS}
    else:
        step = max(1, min(int(chunk), CACHE_BLOCK))
        size = max(min(step, golden.numel), max(int(s.shape[dim]) * prod(shape[dim + 1:]) for s in shards))
        wg = _Widener(golden, size)
        sg, sm, acc = _StatsAcc(), _StatsAcc(), _MetricAcc(size)
        finite = True
        with np.errstate(all="ignore"):
            for r, shard in enumerate(shards):
                wm = _Widener(shard, size)
                for graw, mraw, _, _ in _runs(golden, shards, dim, r, step):
                    g, m = wg(graw), wm(mraw)
                    finite = sg.add(g) and finite
                    finite = sm.add(m) and finite
                    if finite:
                        acc.add(g, m, sg.chunk_max, sm.chunk_max)
                dots.append((acc.gm, acc.gg, acc.mm, acc.dd))
        values = {"n": acc.n, "gm": acc.gm, "gg": acc.gg, "mm": acc.mm, "dd": acc.dd, "abs_sum": acc.abs_sum,
                  "abs_max": acc.abs_max, "rel_sum": acc.rel_sum, "rel_max": acc.rel_max, "shift_g": acc.mg,
                  "sum_g": acc.sg, "t": acc.t, "shift_m": acc.mm_max, "sum_m": acc.sm}
    result.golden, result.my = sg.result(golden), sm.result(my_view)
    if not finite:
        reasons = [_nan_reason(p, st) for p, st in ((GOLDEN_NAN, result.golden), (MY_NAN, result.my))
                   if st.nan_count or st.inf_count]
        result.fail_reason = "; ".join(reasons)
        return result, []
    result.values = _metric_values(*(values[k] for k in _SUMS), _all_zero(result.golden), _all_zero(result.my))
    return result, _shares(dots)


def _shares(dots: list[tuple[float, float, float, float]]) -> list[ShardShare]:
    total_dd = dots[-1][3] if dots else 0.0
    out, before = [], (0.0, 0.0, 0.0, 0.0)
    for after in dots:
        gm, gg, mm, dd = (a - b for a, b in zip(after, before))
        cos, red = _cosine_and_red(gm, gg, mm, dd, gg == 0, mm == 0)
        out.append(ShardShare(cos, red, dd / total_dd if total_dd > 0 else 0.0))
        before = after
    return out


def share_text(shares: Sequence[ShardShare]) -> str:
    """"rank 0 1%, rank 1 99%": each shard's share of the squared error."""
    return ", ".join(f"rank {r} {s.error_share:.0%}" for r, s in enumerate(shares))


def worst_shard(shares: Sequence[ShardShare]) -> int | None:
    """The rank whose shard carries the largest share of the error (None without error)."""
    if not shares or all(s.error_share == 0 or math.isnan(s.error_share) for s in shares):
        return None
    return max(range(len(shares)), key=lambda r: shares[r].error_share)


def compare_split(golden: RawTensor, shards: Sequence[RawTensor], dim: int,
                  start: int = 0) -> tuple[PairMetrics, list[ShardShare]]:
    """A split op's comparison: every rank's shard merged (``start`` 0, the shards covering golden's ``dim``), or
    one rank's shard against its slice of the golden from ``start`` (the per-rank view; no shares then).
    Shards may lack golden's leading size-1 dims ([s, h] shards of a [1, s, h] golden)."""
    from .metrics import compare_tensors

    lead = len(golden.shape) - len(shards[0].shape)
    if lead > 0:
        shards = [RawTensor(s.data, s.dtype, (1,) * lead + tuple(s.shape), s.path) for s in shards]
    width = sum(int(s.shape[dim]) for s in shards) if all(len(s.shape) > dim for s in shards) else -1
    if start == 0 and width == int(golden.shape[dim]):
        return compare_merged(golden, shards, dim)
    shape = tuple(int(d) for d in golden.shape)
    if len(shards) != 1 or width < 1 or start + width > shape[dim] or golden.data.size < golden.numel:
        metrics, _ = compare_merged(golden, shards, dim)  # says why they do not fit
        return metrics, []
    outer, inner = prod(shape[:dim]), prod(shape[dim + 1:])
    part = _flat(golden).reshape(outer, shape[dim], inner)[:, start:start + width, :]
    piece = RawTensor(np.ascontiguousarray(part), golden.dtype, shape[:dim] + (width,) + shape[dim + 1:])
    return compare_tensors(piece, shards[0]), []
