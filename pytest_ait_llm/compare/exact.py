"""Integer tensors (quantized activations, indices, token ids) compared exactly.

Cosine or relative distance say little about an int8 activation or an index tensor: one index off is a wrong
gather, however close in value. What matters is how many elements differ and by how much, counted in int64 over
the same chunked walk as the float pass (no float rounding: two int32 values 2^31 apart are not "close").
"""
from __future__ import annotations

import numpy as np

from ..formats.dtypes import by_name
from ..formats.tensor import DEFAULT_CHUNK, RawTensor
from .metrics import _plan, shapes_compatible

#: The columns this adds to a row (CSV columns after the original ones), in order.
EXACT_COLUMNS = ("differing_elements", "differing_share", "max_abs_difference")


def is_integer(dtype: str) -> bool:
    try:
        return not by_name(dtype).is_float
    except KeyError:
        return False


def exact_difference(golden: RawTensor, my: RawTensor, *, chunk: int = DEFAULT_CHUNK) -> dict[str, float] | None:
    """{differing_elements, differing_share, max_abs_difference} for two integer tensors of compatible shapes;
    None when either is not an integer tensor or the shapes cannot be compared (the float pass says why)."""
    if not (is_integer(golden.dtype) and is_integer(my.dtype)):
        return None
    rule = shapes_compatible(golden.shape, my.shape)
    if rule is None or golden.numel == 0 or my.numel == 0 or any(t.data.size < t.numel for t in (golden, my)):
        return None
    count = total = 0
    worst = 0
    for graw, mraw, _, _ in _plan(golden, my, rule, max(1, int(chunk))):
        g = np.asarray(graw).astype(np.int64)
        m = np.asarray(mraw).astype(np.int64)
        diff = np.abs(m - g)
        count += int(np.count_nonzero(diff))
        total += diff.size
        if diff.size:
            worst = max(worst, int(diff.max()))
    return {"differing_elements": float(count), "differing_share": count / total if total else 0.0,
            "max_abs_difference": float(worst)}

