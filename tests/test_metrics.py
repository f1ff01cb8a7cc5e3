"""Metrics of one tensor pair: equal to straightforward references, robust to the inputs real dumps contain."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pytest_ait_llm.compare.metrics import (
    EPS, METRICS, CustomMetric, PairMetrics, compare_tensors, load_custom_metric, shapes_compatible, tensor_stats,
)
from pytest_ait_llm.compare import fastpass
from pytest_ait_llm.errors import AitLlmError
from pytest_ait_llm.formats.tensor import RawTensor


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def metric_pass(request, monkeypatch):
    """Every test here runs on both forms of the pass: the compiled kernel and the numpy fallback."""
    if request.param == "compiled" and not fastpass.available():
        pytest.skip("the compiled pass is not built here")
    monkeypatch.setenv("AIT_LLM_KERNEL", request.param)
    return request.param


def raw(values, dtype: str, shape=None) -> RawTensor:
    """A RawTensor as a loader would build it (bf16 as uint16 bit patterns, round-to-nearest like torch)."""
    arr = np.asarray(values)
    shape = tuple(arr.shape) if shape is None else tuple(shape)
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(arr, np.float32)).to(torch.bfloat16).view(torch.int16)
        data = bits.numpy().view(np.uint16)
    else:
        data = arr.astype(dtype)
    return RawTensor(data.reshape(-1), dtype, shape)


def reference(g: np.ndarray, m: np.ndarray) -> dict[str, float]:
    """Every metric computed the plain way on whole float64 arrays (no streaming, no chunks)."""
    g = g.reshape(-1).astype(np.float64)
    m = m.reshape(-1).astype(np.float64)
    d = np.abs(m - g)
    rel = np.where(np.abs(g) > EPS, d / np.where(np.abs(g) > EPS, np.abs(g), 1.0), 0.0)
    lp_g = g - np.logaddexp.reduce(g)
    lp_m = m - np.logaddexp.reduce(m)
    return {
        "cosine_similarity": float(g @ m / (np.linalg.norm(g) * np.linalg.norm(m))),
        "max_relative_error": float(rel.max()),
        "mean_relative_error": float(rel.mean()),
        "max_absolute_error": float(d.max()),
        "mean_absolute_error": float(d.mean()),
        "kl_divergence": max(0.0, float(np.sum(np.exp(lp_g) * (lp_g - lp_m)))),
        "relative_euclidean_distance": float(np.sqrt(np.sum(d ** 2) / np.sum(g ** 2))),
    }


def assert_metrics_close(got: PairMetrics, want: dict[str, float], rtol: float = 1e-9) -> None:
    assert got.fail_reason == "", got.fail_reason
    for name in METRICS:
        assert got.values[name] == pytest.approx(want[name], rel=rtol, abs=1e-13), name


def noisy_pair(rng, shape, rel_noise=1e-2, zeros_every=17):
    g = rng.standard_normal(shape).astype(np.float32)
    g.reshape(-1)[::zeros_every] = 0.0  # exact zeros: relative error must ignore them
    m = g * (1 + rel_noise * rng.standard_normal(shape).astype(np.float32)) + 1e-3
    return g, m


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_fused_metrics_equal_plain_float64_reference(dtype):
    rng = np.random.default_rng(1)
    g, m = noisy_pair(rng, (3, 1000))
    gt, mt = raw(g, dtype), raw(m, dtype)

    result = compare_tensors(gt, mt, chunk=997)

    # the reference sees exactly the values stored in the dtype, widened to float64
    assert_metrics_close(result, reference(gt.to_float64(), mt.to_float64()))
    stored = gt.to_float64()
    assert (result.golden.max, result.golden.min) == (stored.max(), stored.min())
    assert result.golden.mean == pytest.approx(stored.mean(), rel=1e-12)
    assert (result.golden.dtype, result.golden.shape, result.golden.numel) == (dtype, (3, 1000), 3000)
    assert (result.golden.nan_count, result.golden.inf_count) == (0, 0)


@pytest.mark.parametrize("gdtype,mdtype", [("int8", "int8"), ("int32", "int64"), ("float16", "float32"),
                                           ("bfloat16", "float32")])
def test_same_kind_dtypes_of_different_widths_are_compared(gdtype, mdtype):
    rng = np.random.default_rng(2)
    g = rng.integers(-20, 20, size=500)
    m = g + rng.integers(-1, 2, size=500)
    gt, mt = raw(g, gdtype), raw(m, mdtype)
    assert_metrics_close(compare_tensors(gt, mt), reference(gt.to_float64(), mt.to_float64()))


def test_ait_definitions_as_torch_computes_them():
    """cosine, relative errors and KL as the original defined them with torch ops (spec section 5)."""
    rng = np.random.default_rng(3)
    g, m = noisy_pair(rng, (4096,), rel_noise=0.05)
    result = compare_tensors(raw(g, "float32"), raw(m, "float32"), chunk=1000)

    tg, tm = torch.from_numpy(g).double(), torch.from_numpy(m).double()
    cos = torch.cosine_similarity(tg, tm, dim=0).item()
    masked = tg.abs() > EPS
    rel = torch.where(masked, (tm / torch.where(masked, tg, torch.ones_like(tg)) - 1).abs(), torch.zeros_like(tg))
    kl = torch.nn.functional.kl_div(torch.log_softmax(tm, 0), torch.softmax(tg, 0), reduction="sum").item()

    assert result.values["cosine_similarity"] == pytest.approx(cos, rel=1e-12)
    assert result.values["max_relative_error"] == pytest.approx(rel.max().item(), rel=1e-9)
    assert result.values["mean_relative_error"] == pytest.approx(rel.mean().item(), rel=1e-9)
    assert result.values["kl_divergence"] == pytest.approx(max(kl, 0.0), rel=1e-9, abs=1e-13)


def test_kl_survives_large_logits_without_overflow():
    """Streaming log-sum-exp: logits around 1000 would overflow a naive exp()."""
    rng = np.random.default_rng(4)
    g = 1000 + 5 * rng.standard_normal(5000)
    m = g + 0.1 * rng.standard_normal(5000)
    result = compare_tensors(raw(g, "float64"), raw(m, "float64"), chunk=64)
    kl = torch.nn.functional.kl_div(torch.log_softmax(torch.from_numpy(m), 0), torch.softmax(torch.from_numpy(g), 0),
                                    reduction="sum").item()
    assert math.isfinite(result.values["kl_divergence"])
    assert result.values["kl_divergence"] == pytest.approx(kl, rel=1e-6)


def test_chunk_size_does_not_change_results():
    rng = np.random.default_rng(5)
    g, m = noisy_pair(rng, (8, 333))
    small = compare_tensors(raw(g, "bfloat16"), raw(m, "bfloat16"), chunk=7)
    large = compare_tensors(raw(g, "bfloat16"), raw(m, "bfloat16"), chunk=1 << 20)
    for name in METRICS:
        assert small.values[name] == pytest.approx(large.values[name], rel=1e-12, abs=1e-15), name
    assert small.golden == large.golden and small.my == large.my


def test_identical_tensors_give_perfect_metrics():
    g = np.linspace(-3, 3, 1001, dtype=np.float32)
    result = compare_tensors(raw(g, "float32"), raw(g, "float32"))
    v = result.values
    assert v["cosine_similarity"] == pytest.approx(1.0, abs=1e-15)
    for name in METRICS[1:]:
        assert v[name] == 0.0, name


def test_all_zero_tensors_and_one_all_zero_side():
    zeros, ones = np.zeros(64, np.float32), np.ones(64, np.float32)
    both = compare_tensors(raw(zeros, "float32"), raw(zeros, "float32")).values
    assert both["cosine_similarity"] == 1.0 and both["relative_euclidean_distance"] == 0.0
    mine_zero = compare_tensors(raw(ones, "float32"), raw(zeros, "float32")).values
    assert mine_zero["cosine_similarity"] == 0.0
    golden_zero = compare_tensors(raw(zeros, "float32"), raw(ones, "float32")).values
    assert golden_zero["cosine_similarity"] == 0.0
    assert golden_zero["relative_euclidean_distance"] == math.inf  # any error against a zero golden is unbounded
    assert golden_zero["max_relative_error"] == 0.0  # |g| <= eps is masked, as in the original


def test_absolute_error_counts_elements_where_golden_is_zero():
    """ait masked absolute error by |g| > eps, hiding garbage written where the golden is 0."""
    g = np.array([0.0, 1.0, 2.0, 0.0], np.float32)
    m = np.array([5.0, 1.0, 2.0, 0.0], np.float32)
    v = compare_tensors(raw(g, "float32"), raw(m, "float32")).values
    assert v["max_absolute_error"] == 5.0
    assert v["mean_absolute_error"] == 1.25
    assert v["max_relative_error"] == 0.0


@pytest.mark.filterwarnings("error")  # NaN/inf in dumps is data: no numpy RuntimeWarning may leak to the user
@pytest.mark.parametrize("side", ["golden", "my"])
def test_nan_and_inf_are_counted_with_the_original_reason(side):
    rng = np.random.default_rng(6)
    good = rng.standard_normal(4096).astype(np.float32)
    bad = good.copy()
    bad[[5, 100, 4000]] = np.nan
    bad[7] = -np.inf
    bad[2000] = np.inf
    gt, mt = (raw(bad, "float16"), raw(good, "float16")) if side == "golden" else \
        (raw(good, "float16"), raw(bad, "float16"))

    result = compare_tensors(gt, mt, chunk=1000)

    prefix = "golden_data includes NAN or inf." if side == "golden" else "my_data includes NAN or inf."
    assert result.fail_reason == f"{prefix} (3 NaN, 2 inf of 4096)"
    assert all(math.isnan(result.values[k]) for k in METRICS)
    stats = result.golden if side == "golden" else result.my
    finite = raw(bad, "float16").to_float64()
    finite = finite[np.isfinite(finite)]
    assert (stats.nan_count, stats.inf_count) == (3, 2)
    assert (stats.max, stats.min) == (finite.max(), finite.min())
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-12)


def test_nan_on_both_sides_names_both():
    a = np.array([np.nan, 1.0, 2.0], np.float32)
    b = np.array([1.0, np.inf, np.nan], np.float32)
    reason = compare_tensors(raw(a, "float32"), raw(b, "float32")).fail_reason
    assert reason == ("golden_data includes NAN or inf. (1 NaN, 0 inf of 3); "
                      "my_data includes NAN or inf. (1 NaN, 1 inf of 3)")


def test_all_nan_tensor_has_nan_stats():
    st = tensor_stats(raw(np.full(10, np.nan, np.float32), "float32"))
    assert st.nan_count == 10 and math.isnan(st.max) and math.isnan(st.mean)


@pytest.mark.parametrize("gshape,mshape,reason", [
    ((0,), (4,), "empty tensor (golden)"),
    ((2, 2), (0, 2), "empty tensor (my)"),
    ((0,), (0,), "empty tensor (golden, my)"),
])
def test_empty_tensors_are_reported_not_crashed(gshape, mshape, reason):
    gt = raw(np.ones(gshape, np.float16), "float16")
    mt = raw(np.ones(mshape, np.float16), "float16")
    result = compare_tensors(gt, mt)
    assert result.fail_reason == reason
    assert all(math.isnan(result.values[k]) for k in METRICS)
    empty = result.golden if gshape[0] == 0 else result.my
    assert empty.numel == 0 and math.isnan(empty.max)


@pytest.mark.parametrize("gshape,mshape,rule", [
    ((4, 3, 8), (4, 3, 8), "equal"),
    ((16, 1, 8), (1, 16, 8), "squeeze"),
    ((16, 8), (1, 16, 8), "squeeze"),
    ((5, 3, 8), (3, 5, 8), "swap01"),
    ((5, 3), (3, 5), "swap01"),
    ((1, 5, 8), (3, 5, 8), "broadcast"),
    ((6, 5, 8), (2, 5, 8), "broadcast"),
    ((5, 8), (4, 5, 8), "broadcast"),
    ((2, 3, 4), (4, 3, 2), None),
    ((4, 5), (4, 6), None),
    ((4, 5), (6, 5), None),
])
def test_shape_rules(gshape, mshape, rule):
    assert shapes_compatible(gshape, mshape) == rule


def test_squeezed_layouts_compare_element_wise():
    rng = np.random.default_rng(7)
    g = rng.standard_normal((16, 1, 8)).astype(np.float32)
    m = (g * 1.01).reshape(1, 16, 8)
    result = compare_tensors(raw(g, "float32"), raw(m, "float32"))
    assert_metrics_close(result, reference(g, m))
    assert result.values["relative_euclidean_distance"] == pytest.approx(0.01, rel=1e-5)  # m rounded to fp32


@pytest.mark.parametrize("chunk", [7, 20, 1 << 16])
def test_swapped_batch_and_sequence_dims_compare_golden_transposed(chunk):
    rng = np.random.default_rng(8)
    g = rng.standard_normal((6, 3, 10)).astype(np.float32)  # [s, b, h]
    m = np.ascontiguousarray(g.transpose(1, 0, 2)) * (1 + 0.01 * rng.standard_normal((3, 6, 10)))  # [b, s, h]
    result = compare_tensors(raw(g, "float32"), raw(m, "float32"), chunk=chunk)
    aligned = raw(g, "float32").to_float64().transpose(1, 0, 2)
    assert_metrics_close(result, reference(aligned, raw(m, "float32").to_float64()))
    # a plain flat comparison would be far off: the transposition is what makes it match
    assert result.values["relative_euclidean_distance"] < 0.02


@pytest.mark.parametrize("golden_is_small", [True, False])
def test_batch_broadcast_compares_every_slice_against_the_smaller(golden_is_small):
    rng = np.random.default_rng(9)
    small = rng.standard_normal((1, 5, 8)).astype(np.float32)
    big = np.concatenate([small * (1 + 0.01 * k) for k in range(3)]).astype(np.float32)  # slices 0 %, 1 %, 2 % off
    gt, mt = (raw(small, "float32"), raw(big, "float32")) if golden_is_small else \
        (raw(big, "float32"), raw(small, "float32"))

    result = compare_tensors(gt, mt, chunk=9)

    repeated = np.tile(small, (3, 1, 1))
    want = reference(repeated, big) if golden_is_small else reference(big, repeated)
    assert_metrics_close(result, want)
    small_stats = result.golden if golden_is_small else result.my
    assert small_stats.numel == 40 and small_stats.mean == pytest.approx(float(small.mean()), rel=1e-6)


def test_shape_mismatch_keeps_the_original_reason_as_prefix_and_fills_stats():
    gt = raw(np.ones((2, 3, 4), np.float16), "float16")
    mt = raw(np.ones((4, 3, 2), np.float16), "float16")
    result = compare_tensors(gt, mt)
    assert result.fail_reason == "data shape doesn't match. golden [2, 3, 4] vs my [4, 3, 2]"
    assert result.golden.max == 1.0 and result.my.shape == (4, 3, 2)
    assert all(math.isnan(result.values[k]) for k in METRICS)


def test_quantized_int8_against_float16_is_not_compared():
    gt = raw(np.arange(-8, 8), "int8")
    mt = raw(np.arange(-8, 8) * 0.1, "float16")
    result = compare_tensors(gt, mt)
    assert result.fail_reason == "dtype int8 vs float16: quantized or different tensor, not compared"
    assert all(math.isnan(result.values[k]) for k in METRICS)
    assert result.golden.min == -8 and result.my.dtype == "float16"


def test_truncated_payload_is_reported_not_crashed():
    short = RawTensor(np.ones(10, np.float16), "float16", (4, 4))
    result = compare_tensors(short, raw(np.ones((4, 4)), "float16"))
    assert "golden payload holds 10 elements" in result.fail_reason


# ---------------------------------------------------------------------------------------------------------------
# custom metrics

CUSTOM_SOURCE = '''
import numpy as np

def max_diff(golden, my):
    return float(np.max(np.abs(golden - my)))

def verdict(golden, my):
    return ("ok" if np.allclose(golden, my) else "differs", "checked %d elements" % golden.size)

def fragile(golden, my):
    if golden.size > 1:
        raise ValueError("cannot handle\\nmore than one element")
    return 0.0

def wrong_type(golden, my):
    return [1, 2, 3]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def metric_file(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(CUSTOM_SOURCE)
    return path


def test_custom_metric_value_lands_in_pair_metrics(metric_file):
    metric = load_custom_metric(f"{metric_file}:max_diff")
    assert isinstance(metric, CustomMetric) and metric.name == "max_diff"
    g = np.arange(10, dtype=np.float32)
    m = g.copy()
    m[3] += 0.5
    result = compare_tensors(raw(g, "float32"), raw(m, "float32"),
                             custom_metrics=[metric, load_custom_metric(f"{metric_file}:verdict")])
    assert result.custom == {"max_diff": 0.5, "verdict": "differs"}
    assert result.custom_messages == {"verdict": "checked 10 elements"}


def test_custom_metric_sees_the_aligned_arrays(metric_file):
    """For a transposed pair the custom metric gets golden in my's order, so identical data gives 0."""
    g = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    m = np.ascontiguousarray(g.transpose(1, 0, 2))
    result = compare_tensors(raw(g, "float32"), raw(m, "float32"), custom_metrics=[f"{metric_file}:max_diff"])
    assert result.custom["max_diff"] == 0.0


def test_exception_in_custom_metric_becomes_cell_text(metric_file):
    metric = load_custom_metric(f"{metric_file}:fragile")  # the ones(1) probe passes
    result = compare_tensors(raw(np.ones(4), "float32"), raw(np.ones(4), "float32"), custom_metrics=[metric])
    assert result.fail_reason == ""
    assert result.custom["fragile"] == "error: ValueError: cannot handle more than one element"


def test_custom_metric_not_run_when_pair_not_compared(metric_file):
    result = compare_tensors(raw(np.ones(4), "float32"), raw(np.ones(5), "float32"),
                             custom_metrics=[f"{metric_file}:max_diff"])
    assert result.fail_reason.startswith("data shape doesn't match.")
    assert math.isnan(result.custom["max_diff"])


@pytest.mark.parametrize("spec,needle", [
    ("no_colon_here", "expected 'path/to/file.py:function'"),
    ("{dir}/missing.py:f", "is not a file"),
    ("{file}:absent", "has no function 'absent'"),
    ("{file}:NOT_A_FUNCTION", "is not callable"),
    ("{file}:wrong_type", "probe call with ones(1) failed"),
    ("{file}:cosine_similarity", "clashes with a built-in metric"),
])
def test_bad_custom_metric_specs_fail_at_load_with_one_line(metric_file, spec, needle):
    spec = spec.format(dir=metric_file.parent, file=metric_file)
    with pytest.raises(AitLlmError) as info:
        load_custom_metric(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_custom_metric_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import definitely_not_a_module_xyz\n")
    with pytest.raises(AitLlmError, match="importing .* failed: ModuleNotFoundError"):
        load_custom_metric(f"{path}:f")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_light_input_pass_agrees_with_the_full_pass(dtype):
    from pytest_ait_llm.compare.metrics import similarity

    rng = np.random.default_rng(7)
    g = rng.standard_normal((3, 5000)).astype(np.float32)
    m = g * 1.03 + rng.standard_normal(g.shape).astype(np.float32) * 0.01
    golden = RawTensor(g.reshape(-1), "float32", g.shape)
    my = raw(m, dtype)
    full = compare_tensors(golden, my).values
    light = similarity(golden, my)
    assert light["cosine_similarity"] == pytest.approx(full["cosine_similarity"], abs=1e-12)
    assert light["relative_euclidean_distance"] == pytest.approx(full["relative_euclidean_distance"], rel=1e-9)
    # what the full pass reports as not comparable, the light pass does not use
    assert similarity(golden, RawTensor(np.full(15000, np.nan, np.float32), "float32", g.shape)) is None
    assert similarity(golden, RawTensor(np.ones(7, np.float32), "float32", (7,))) is None
