"""Drive the compiled fused pass (``_kernel.c``) over a pair's aligned runs; metrics.py finishes the numbers.

The extension is optional (setup.py builds it where a C compiler exists). :func:`usable` says whether a pair can
take it: both sides float32/float64/float16/bfloat16 in their storage dtype. Everything else, and every machine
without the extension, takes the numpy pass in metrics.py.

``AIT_LLM_KERNEL=numpy`` forces the numpy pass, ``=compiled`` the compiled one. By default the compiled pass runs
where its vector loops do (AVX2 or AVX-512): its plain-C copy, all other CPUs get, measured slower than numpy's own
vectorised loops on x86-64, so those CPUs keep the numpy pass unless asked.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ..formats.tensor import RawTensor

try:
    from . import _kernel
except ImportError:  # built without a C compiler: the numpy pass does the work
    _kernel = None

#: Element kinds of _kernel.c, by logical dtype, with the storage dtypes each accepts.
_KINDS = {"float32": (0, ("float32",)), "float64": (1, ("float64",)), "bfloat16": (2, ("uint16", "int16")),
          "float16": (3, ("float16",))}

#: State slots (the S_* enum of _kernel.c).
(N, GM, GG, MM, DD, ABS_SUM, ABS_MAX, REL_SUM, REL_MAX, SHIFT_G, SUM_G, T, SHIFT_M, SUM_M, FINITE,
 G_STATS, M_STATS, KL_TOP, KL_CENTRE) = (*range(15), 15, 21, 27, 28)
STATE_SIZE = 29
#: Per side, 6 slots from G_STATS / M_STATS: NaN count, inf count, finite count, finite sum, min, max.
NAN, INF, FIN, SUM, MIN, MAX = range(6)


KERNEL_ENV = "AIT_LLM_KERNEL"


def available() -> bool:
    """True when the compiled pass is built and chosen (see the module docstring); an unknown value of
    AIT_LLM_KERNEL means the default, as AIT_LLM_EXECUTOR does."""
    if _kernel is None:
        return False
    mode = os.environ.get(KERNEL_ENV, "").strip().lower()
    if mode in ("numpy", "compiled"):
        return mode == "compiled"
    return _kernel.isa() != "baseline"


def isa() -> str | None:
    """The instruction set of the compiled loops in use ("avx512", "avx2", "baseline"), None if not built."""
    return None if _kernel is None else _kernel.isa()


def usable(golden: RawTensor, my: RawTensor) -> bool:
    return available() and _kind(golden) is not None and _kind(my) is not None


def _kind(t: RawTensor) -> int | None:
    spec = _KINDS.get(str(t.dtype))
    return spec[0] if spec and t.data.dtype.name in spec[1] else None


def new_state() -> np.ndarray:
    state = np.zeros(STATE_SIZE, np.float64)
    state[[SHIFT_G, SHIFT_M]] = -np.inf
    state[FINITE] = 1.0
    state[KL_TOP] = -np.inf
    for base in (G_STATS, M_STATS):
        state[base + MIN], state[base + MAX] = np.inf, -np.inf
    return state


def run_full(golden: RawTensor, my: RawTensor, runs: Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]) -> np.ndarray:
    """Every sum of the fused pass over ``runs`` (metrics.py's plan: aligned raw slices and whether to count each
    side in its stats). Slices that are not contiguous are copied one run at a time."""
    state = new_state()
    gk, mk = _kind(golden), _kind(my)
    for g, m, count_g, count_m in runs:
        _kernel.full(_contiguous(g), gk, _contiguous(m), mk, state, count_g, count_m)
    return state


def run_light(golden: RawTensor, my: RawTensor, runs: Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]) -> np.ndarray:
    """Only the four dot products (GM, GG, MM, DD) over ``runs``."""
    state = new_state()
    gk, mk = _kind(golden), _kind(my)
    for g, m, _, _ in runs:
        _kernel.light(_contiguous(g), gk, _contiguous(m), mk, state)
    return state


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
