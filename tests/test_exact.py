"""compare/exact.py: integer tensors compared element by element, in int64."""
from __future__ import annotations

import numpy as np

from pytest_ait_llm.compare.exact import exact_difference
from pytest_ait_llm.formats.tensor import RawTensor


def _raw(values, dtype) -> RawTensor:
    data = np.asarray(values, dtype=dtype)
    return RawTensor(data=data.reshape(-1), dtype=np.dtype(dtype).name, shape=data.shape)


def test_int8_activations_are_compared_exactly():
    golden = _raw(np.arange(-64, 64).reshape(2, 64), np.int8)
    mine = golden.data.copy().reshape(2, 64)
    mine[0, 3] += 1
    mine[1, 7] -= 3
    values = exact_difference(golden, _raw(mine, np.int8))
    assert values == {"differing_elements": 2.0, "differing_share": 2 / 128, "max_abs_difference": 3.0}


def test_int32_values_far_apart_are_not_close_and_floats_are_left_to_the_float_metrics():
    a = _raw([0, 2 ** 31 - 1], np.int32)
    b = _raw([0, -2 ** 31], np.int32)
    assert exact_difference(a, b)["max_abs_difference"] == float(2 ** 32 - 1)
    assert exact_difference(_raw([1.0], np.float32), _raw([1.0], np.float32)) is None
    assert exact_difference(_raw([1, 2], np.int8), _raw([1, 2, 3], np.int8)) is None  # shapes differ
