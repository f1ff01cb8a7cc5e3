"""Drive the compiled fused pass (``_kernel.c``) over a pair's aligned runs; metrics.py finishes the numbers.

The extension is optional (setup.py builds it where a C compiler exists). :func:`usable` says whether a pair can
take it: both sides float32/float64/float16/bfloat16 in their storage dtype. Everything else, and every machine
without the extension, takes the numpy pass in metrics.py.

``AIT_LLM_KERNEL=numpy`` forces the numpy pass, ``=compiled`` the compiled one. By default the compiled pass runs
wherever it is built: its AVX2/AVX-512 copies measured ~4x the numpy pass or more, its 2-lane copy 1.7-1.8x
numpy held to the same vector width (SSE2, what an x86-64 without AVX2 runs; the same loops are NEON's on AArch64,
where their speed is not measured: docs/performance.md, "The compiled pass").
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

#: The storage dtypes the kernel reads for each logical dtype it knows (its element kinds: _kernel.KINDS).
_STORAGE = {"float32": ("float32",), "float64": ("float64",), "bfloat16": ("uint16", "int16"),
            "float16": ("float16",)}

#: The names of the state's slots, in order, and the sums metrics._metric_values takes (as named there): both
#: from the C module, which lists them once.
SLOTS: tuple[str, ...] = _kernel.SLOTS if _kernel else ()
METRIC_SUMS: tuple[str, ...] = _kernel.METRIC_SUMS if _kernel else ()

KERNEL_ENV = "AIT_LLM_KERNEL"


def available() -> bool:
    """True when the compiled pass is built and chosen (see the module docstring); an unknown value of
    AIT_LLM_KERNEL means the default, as AIT_LLM_EXECUTOR does."""
    if _kernel is None:
        return False
    mode = os.environ.get(KERNEL_ENV, "").strip().lower()
    if mode in ("numpy", "compiled"):
        return mode == "compiled"
    return True


def isa() -> str | None:
    """The instruction set of the compiled loops in use ("avx512", "avx2", "neon", "baseline"), None if not
    built."""
    return None if _kernel is None else _kernel.isa()


def usable(golden: RawTensor, my: RawTensor) -> bool:
    return available() and _kind(golden) is not None and _kind(my) is not None


def _kind(t: RawTensor) -> int | None:
    dtype = str(t.dtype)
    return _kernel.KINDS.get(dtype) if t.data.dtype.name in _STORAGE.get(dtype, ()) else None


def run_full(golden: RawTensor, my: RawTensor,
             runs: Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]) -> dict[str, float]:
    """Every sum of the fused pass over ``runs`` (metrics.py's plan: aligned raw slices and whether to count each
    side in its stats), by slot name. Slices that are not contiguous are copied one run at a time."""
    state = np.array(_kernel.STATE_START, np.float64)
    gk, mk = _kind(golden), _kind(my)
    for g, m, count_g, count_m in runs:
        _kernel.full(_contiguous(g), gk, _contiguous(m), mk, state, count_g, count_m)
    return dict(zip(SLOTS, state.tolist()))


def run_light(golden: RawTensor, my: RawTensor,
              runs: Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]) -> dict[str, float]:
    """Only the four dot products ("gm", "gg", "mm", "dd") and "n" over ``runs``."""
    state = np.array(_kernel.STATE_START, np.float64)
    gk, mk = _kind(golden), _kind(my)
    for g, m, _, _ in runs:
        _kernel.light(_contiguous(g), gk, _contiguous(m), mk, state)
    return dict(zip(SLOTS, state.tolist()))


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
