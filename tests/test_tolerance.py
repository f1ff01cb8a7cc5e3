"""Tolerances: defaults that catch real bugs but pass healthy rounding, judged on the error an op adds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pytest_ait_llm.compare.metrics import METRICS, compare_tensors
from pytest_ait_llm.compare.tolerance import (
    DEFAULT_BOUNDS, Breach, Tolerance, default_bounds, effective_metrics, judge,
)
from pytest_ait_llm.errors import ToleranceError
from pytest_ait_llm.formats.tensor import RawTensor


def raw(values, dtype: str) -> RawTensor:
    arr = np.asarray(values)
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(arr, np.float32)).to(torch.bfloat16).view(torch.int16)
        return RawTensor(bits.numpy().view(np.uint16).reshape(-1), dtype, arr.shape)
    return RawTensor(arr.astype(dtype).reshape(-1), dtype, arr.shape)


@pytest.fixture
def activations():
    return np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# defaults


def test_five_percent_scale_error_passes_cosine_but_breaches_default_bf16_bounds(activations):
    golden = raw(activations, "bfloat16")
    mine = raw(activations * 1.05, "bfloat16")
    values = compare_tensors(golden, mine).values

    assert values["cosine_similarity"] > 0.9999  # cosine alone would call this port healthy
    breaches = judge(values, default_bounds("bfloat16"), mode="absolute")
    assert [b.metric for b in breaches] == ["relative_euclidean_distance"]
    assert breaches[0].value == pytest.approx(0.05, rel=0.05)
    assert str(breaches[0]).startswith("relative_euclidean_distance 0.05")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_healthy_rounding_of_an_fp32_tensor_passes_the_default_bounds(activations, dtype):
    values = compare_tensors(raw(activations, "float32"), raw(activations, dtype)).values
    assert values["relative_euclidean_distance"] > 0  # the rounding is really there
    assert judge(values, default_bounds(dtype), mode="absolute") == []


def test_fp32_reordered_accumulation_passes_fp32_defaults():
    """A matmul computed in a different order (fp32 vs float64 accumulation) is healthy for an fp32 port."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((32, 512)), rng.standard_normal((512, 64))
    golden = a @ b
    mine = (a.astype(np.float32) @ b.astype(np.float32))
    values = compare_tensors(raw(golden, "float32"), raw(mine, "float32")).values
    assert judge(values, default_bounds("float32"), mode="absolute") == []


def test_default_bounds_table_and_dtype_names():
    assert default_bounds("bf16") == DEFAULT_BOUNDS["bfloat16"] == {"cosine_similarity": 0.999,
                                                                     "relative_euclidean_distance": 0.02}
    assert default_bounds("torch.float16")["relative_euclidean_distance"] == 0.004
    assert default_bounds("float32") == {"cosine_similarity": 0.99999, "relative_euclidean_distance": 1e-5}
    assert default_bounds("int8") == {"relative_euclidean_distance": 0.0}
    assert default_bounds("float8_e4m3fn") == DEFAULT_BOUNDS["bfloat16"]  # unknown float: loosest row, not no gate
    bounds = default_bounds("float16")
    bounds["cosine_similarity"] = 0.0
    assert DEFAULT_BOUNDS["float16"]["cosine_similarity"] == 0.999  # callers get a copy


def test_integer_tensors_must_match_exactly():
    ids = np.arange(100)
    assert judge(compare_tensors(raw(ids, "int32"), raw(ids, "int64")).values, default_bounds("int32")) == []
    off = ids.copy()
    off[50] += 1
    breaches = judge(compare_tensors(raw(ids, "int32"), raw(off, "int32")).values, default_bounds("int32"))
    assert [b.metric for b in breaches] == ["relative_euclidean_distance"]


# ---------------------------------------------------------------------------------------------------------------
# judging


def _noisy(x, rel, seed):
    return x * (1 + rel * np.random.default_rng(seed).standard_normal(x.shape))


def test_added_mode_blames_an_op_only_for_the_error_it_adds(activations):
    bounds = default_bounds("bfloat16")
    golden_in = activations.astype(np.float64)
    my_in = _noisy(golden_in, 0.03, seed=2)  # 3 % already arrives from upstream: above the 2 % default
    input_metrics = compare_tensors(raw(golden_in, "float64"), raw(my_in, "float64")).values

    golden_out = 2 * golden_in  # the op itself (a scale) is exact in the port ...
    faithful = compare_tensors(raw(golden_out, "float64"), raw(2 * my_in, "float64")).values
    assert judge(faithful, bounds, input_metrics=input_metrics) == []
    assert judge(faithful, bounds, input_metrics=input_metrics, mode="absolute") != []  # upstream error shows

    buggy = compare_tensors(raw(golden_out, "float64"), raw(2 * my_in * 1.05, "float64")).values  # ... or adds 5 %
    breaches = judge(buggy, bounds, input_metrics=input_metrics)
    assert [b.metric for b in breaches] == ["relative_euclidean_distance"]
    assert breaches[0].added and str(breaches[0]).endswith("(added)")
    assert breaches[0].value == pytest.approx(buggy["relative_euclidean_distance"]
                                              - input_metrics["relative_euclidean_distance"])


def test_effective_metrics_in_added_mode():
    out = {"cosine_similarity": 0.98, "relative_euclidean_distance": 0.05, "kl_divergence": 1e-3,
           "max_absolute_error": 2.0}
    inp = {"cosine_similarity": 0.99, "relative_euclidean_distance": 0.06, "kl_divergence": 4e-4,
           "max_absolute_error": 1.0}
    eff = effective_metrics(out, inp, "added")
    assert eff["cosine_similarity"] == pytest.approx(0.99)  # 1 - (0.99 - 0.98)
    assert eff["relative_euclidean_distance"] == 0.0  # the op reduced the error: adds nothing
    assert eff["kl_divergence"] == pytest.approx(6e-4)
    assert eff["max_absolute_error"] == 2.0  # not an "added" metric: judged as is
    assert effective_metrics(out, inp, "absolute") == out
    assert effective_metrics(out, None) == out


def test_breach_text_and_order():
    values = {"cosine_similarity": 0.9812, "relative_euclidean_distance": 0.3, "max_absolute_error": 0.5}
    breaches = judge(values, {"red": 0.02, "max_abs": 1.0, "cos": 0.999}, mode="absolute")
    assert [str(b) for b in breaches] == ["cosine_similarity 0.9812 < 0.999",
                                          "relative_euclidean_distance 0.3 > 0.02"]
    assert breaches[0] == Breach("cosine_similarity", 0.9812, 0.999, "min", False)
    added = Breach("cosine_similarity", 0.9812, 0.999, "min", True)
    assert str(added) == "cosine_similarity 0.9812 < 0.999 (added)"


def test_not_computed_metric_breaches_its_bound():
    values = {k: math.nan for k in METRICS}
    breaches = judge(values, {"cos": 0.99, "kl": 1e-3})
    assert [b.metric for b in breaches] == ["cosine_similarity", "kl_divergence"]
    assert "nan" in str(breaches[0])
    assert judge(values, {}) == []


def test_values_on_the_limit_pass():
    assert judge({"cosine_similarity": 0.999, "kl_divergence": 1e-4}, {"cos": 0.999, "kl": 1e-4}) == []


def test_judge_rejects_unknown_bound_names():
    with pytest.raises(ToleranceError, match="cosin"):
        judge({"cosine_similarity": 1.0}, {"cosin": 0.9})


# ---------------------------------------------------------------------------------------------------------------
# Tolerance from the marker


def test_marker_kwargs_accept_aliases_and_full_names():
    tol = Tolerance.from_marker(cos=0.99, kl=1e-3, red=0.01, max_rel=1, mean_rel=0.1, max_abs=2, mean_abs=0.5,
                                mode="absolute")
    assert tol.bounds == {"cosine_similarity": 0.99, "kl_divergence": 1e-3, "relative_euclidean_distance": 0.01,
                          "max_relative_error": 1.0, "mean_relative_error": 0.1, "max_absolute_error": 2.0,
                          "mean_absolute_error": 0.5}
    assert tol.mode == "absolute"
    assert Tolerance.from_marker(rel_euclid=0.1).bounds == Tolerance.from_marker(
        relative_euclidean_distance=0.1).bounds
    assert Tolerance.from_marker().mode == "added"


@pytest.mark.parametrize("kwargs,needle", [
    ({"cos": "high"}, "cos='high'"),
    ({"cosine_simlarity": 0.99}, "'cosine_simlarity'"),
    ({"ops": 5}, "ops=5"),
    ({"cos": 1.5}, "cos=1.5"),
    ({"red": -0.1}, "red=-0.1"),
    ({"kl": float("nan")}, "kl=nan"),
    ({"cos": True}, "cos=True"),
    ({"ops": {"LinearOperation": {"cos": "x"}}}, "ops['LinearOperation']['cos']='x'"),
    ({"ops": {"LinearOperation": 0.9}}, "ops['LinearOperation']=0.9"),
    ({"dtypes": {"fp8": {"cos": 0.9}}}, "unknown dtype 'fp8'"),
    ({"skip": 3}, "skip=3"),
    ({"mode": "relative"}, "mode='relative'"),
])
def test_marker_errors_name_the_key(kwargs, needle):
    with pytest.raises(ToleranceError) as info:
        Tolerance.from_marker(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_positional_arguments_layer_under_keywords():
    base = Tolerance(bounds={"cos": 0.9}, ops={"LinearOperation": {"red": 0.1}}, mode="absolute")
    tol = Tolerance.from_marker(base, {"skip": "*Dropout*", "red": 0.5}, cos=0.95)
    assert tol.bounds == {"cosine_similarity": 0.95, "relative_euclidean_distance": 0.5}
    assert tol.ops == {"LinearOperation": {"relative_euclidean_distance": 0.1}}
    assert tol.skip == ("*Dropout*",)
    assert tol.mode == "absolute"  # kept from the base: no later layer set it
    with pytest.raises(ToleranceError, match="positional argument 1"):
        Tolerance.from_marker(0.99)


def test_bounds_for_precedence():
    tol = Tolerance.from_marker(
        cos=0.99, max_abs=1.0,
        dtypes={"bf16": {"cos": 0.98, "kl": 1e-2}},
        ops={
            "*layers.1*": {"kl": 5e-2},  # glob, given first
            "SelfAttentionOperation": {"cos": 0.97, "max_abs": 3.0},  # exact type: applied before any glob
            "*attn*": {"max_abs": 4.0},  # glob, given last: wins over earlier entries
        })
    # defaults (bf16 red 0.02) < base < dtype < op type < globs in order
    assert tol.bounds_for("SelfAttentionOperation", "SelfAttention_3", "bfloat16",
                          "3_Layer/1_SelfAttentionOperation", "root.model.layers.1.self_attn") == {
        "cosine_similarity": 0.97, "relative_euclidean_distance": 0.02, "max_absolute_error": 4.0,
        "kl_divergence": 5e-2}
    # another op of the same model only gets base + dtype
    assert tol.bounds_for("LinearOperation", "Linear_0", "bfloat16", "root.model.layers.0.mlp") == {
        "cosine_similarity": 0.98, "relative_euclidean_distance": 0.02, "max_absolute_error": 1.0,
        "kl_divergence": 1e-2}
    # fp16 pair: no dtype entry, fp16 default red
    assert tol.bounds_for("LinearOperation", "Linear_0", "float16")["relative_euclidean_distance"] == 0.004


def test_use_defaults_false_leaves_only_user_bounds():
    tol = Tolerance.from_marker(kl=1e-3, use_defaults=False)
    assert tol.bounds_for("LinearOperation", "Linear_0", "bfloat16") == {"kl_divergence": 1e-3}


def test_is_skipped_matches_type_name_and_extra_names():
    tol = Tolerance.from_marker(skip=["*Dropout*", "root.lm_head", "*/0_LinearOperation"])
    assert tol.is_skipped("DropoutOperation", "x")
    assert tol.is_skipped("LinearOperation", "Linear_9", "root.lm_head")
    assert tol.is_skipped("LinearOperation", "Linear_9", "3_Layer/0_LinearOperation")
    assert not tol.is_skipped("LinearOperation", "Linear_9", "3_Layer/1_LinearOperation", "root.model.norm")
    assert Tolerance.from_marker(skip="Rms*").is_skipped("RmsNormOperation", "n")
