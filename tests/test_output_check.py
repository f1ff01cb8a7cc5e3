"""The output check (compare/output_check.py) on logits a user would recognise, the output-check marker keys, and
the exact comparison of integer tensors (compare/exact.py)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pytest_ait_llm.compare.output_check import OUTPUT_DEFAULTS, StepCheck, compare_logits, judge_steps
from pytest_ait_llm.compare.tolerance import Tolerance
from pytest_ait_llm.errors import ToleranceError

VOCAB = 32


def _logits(winner: int, runner_up: int, gap: float, rows: int = 1) -> np.ndarray:
    x = np.linspace(-1.0, 0.0, VOCAB)[None, :].repeat(rows, 0)
    x[:, runner_up] = 3.0
    x[:, winner] = 3.0 + gap
    return x


def test_identical_logits_agree_everywhere_with_zero_kl():
    a = _logits(5, 7, 0.5, rows=4)
    top1, topk, kl, ta, tb = compare_logits(a, a.copy())
    assert (top1, topk, kl, ta, tb) == (1.0, 1.0, 0.0, 5, 5)


def test_a_near_tie_resolved_the_other_way_changes_the_greedy_token_but_hardly_the_kl():
    a, b = _logits(5, 7, 0.01), _logits(7, 5, 0.01)
    top1, topk, kl, ta, tb = compare_logits(a, b)
    assert (top1, ta, tb) == (0.0, 5, 7)
    assert topk == 1.0  # the same five candidates, in another order
    assert 0 < kl < 1e-3


def test_only_the_last_positions_are_compared_when_one_side_keeps_the_last_position_only():
    prefill = np.concatenate([_logits(1, 2, 1.0, rows=15), _logits(9, 3, 1.0)])
    top1, _, _, ta, tb = compare_logits(prefill, _logits(9, 3, 1.0))
    assert (top1, ta, tb) == (1.0, 9, 9)


def _step(token, a_token, b_token, kl=1e-5, top1=None):
    return StepCheck(token, 1, 1.0 if top1 is None and a_token == b_token else (top1 or 0.0), 1.0, kl,
                     a_token, b_token)


def test_the_first_differing_greedy_token_is_named_first():
    steps = [_step(0, 85, 85), _step(1, 144, 144), _step(2, 85, 34), _step(3, 144, 19, kl=0.2)]
    breaches = judge_steps(steps, dict(OUTPUT_DEFAULTS))
    assert breaches[0] == "greedy token differs at step 2: A picks 85, B picks 34"
    assert "step 3: logits KL 0.2 > 0.001" in breaches


def test_without_output_bounds_nothing_is_judged():
    assert judge_steps([_step(0, 1, 2, kl=5.0)], {}) == []


def test_marker_keys_of_the_output_check():
    t = Tolerance.from_marker(cos=0.999, top1=0.5, logits_kl=0.01, logits="root.lm_head")
    assert t.output_bounds() == {"top1": 0.5, "logits_kl": 0.01}
    assert t.output["logits"] == "root.lm_head"
    assert t.bounds == {"cosine_similarity": 0.999}
    assert Tolerance.from_marker(use_defaults=False).output_bounds() == {}
    assert Tolerance.from_marker(t, topk=0.8).output_bounds() == {"top1": 0.5, "logits_kl": 0.01, "topk": 0.8}


@pytest.mark.parametrize("kwargs, text", [
    ({"top1": 1.5}, "top1=1.5 is outside [0, 1]"),
    ({"logits_kl": -1}, "logits_kl=-1 is negative"),
    ({"logits": 3}, "logits=3 must be an op/module name or an (A, B) pair"),
])
def test_bad_output_keys_are_named(kwargs, text):
    with pytest.raises(ToleranceError, match=re.escape(text)):
        Tolerance.from_marker(**kwargs)


def test_a_top1_bound_of_zero_lets_a_differing_token_by():
    assert judge_steps([_step(0, 85, 34)], {"top1": 0.0}) == []


def test_a_long_prefill_is_read_from_its_last_positions_only(tmp_path):
    from pytest_ait_llm.compare.output_check import MAX_POSITIONS, _load

    logits = np.arange((MAX_POSITIONS + 10) * 4, dtype=np.float32).reshape(1, MAX_POSITIONS + 10, 4)
    np.save(tmp_path / "output_logits.npy", logits)
    rows = _load(tmp_path / "output_logits.npy", None)
    assert rows.shape == (MAX_POSITIONS, 4) and rows[-1].tolist() == logits[0, -1].tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_low_precision_logits_are_read_exactly_and_the_kl_stays_float64(tmp_path, dtype):
    from pytest_ait_llm.compare.output_check import _load
    from pytest_ait_llm.formats.atb_bin import read_bin, write_bin
    from pytest_ait_llm.formats.dtypes import widen

    rng = np.random.default_rng(3)
    values = rng.standard_normal((1, 8, 50)).astype(np.float32) * 7
    path = write_bin(tmp_path / "outtensor0.bin", values, dtype=dtype)
    rows = _load(path, None)
    exact = widen(np.asarray(read_bin(path).data), dtype).reshape(-1, 50)
    assert rows.dtype == np.float32 and np.array_equal(rows.astype(np.float64), exact)
    # the same numbers as the float64 arrays: top-1, top-k, KL to the last bit
    assert compare_logits(rows, rows[::-1].copy()) == compare_logits(exact, exact[::-1].copy())
