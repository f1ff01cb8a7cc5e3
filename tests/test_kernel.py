"""The compiled pass (compare/_kernel.c): the same numbers as the numpy pass and an extended-precision reference,
to 1e-12 relative, on every instruction-set copy this CPU can run, and on the AArch64 (NEON) copy under qemu where
the cross toolchain is installed, at block edges, misaligned payloads, NaN/inf and extreme values."""
from __future__ import annotations

import math
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pytest_ait_llm.compare import fastpass
from pytest_ait_llm.compare.metrics import METRICS, compare_tensors, similarity
from pytest_ait_llm.formats.atb_bin import float32_to_bf16_bits
from pytest_ait_llm.formats.tensor import RawTensor

pytestmark = pytest.mark.skipif(fastpass._kernel is None, reason="the compiled pass is not built here")

ISAS = ["avx512", "avx2", "neon", "baseline", "aarch64 under qemu"]
ROOT = Path(__file__).resolve().parent.parent
CROSS_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which(
    "qemu-aarch64-static")

#: Where a KL divergence is tiny, both passes sit at float64's floor for its formula (a difference of terms of
#: size ~|m - g|): they agree to this much absolutely, and each is as far from an extended-precision reference.
KL_FLOOR = 1e-14


def test_the_compiled_pass_is_built_and_used_on_this_machine():
    """`make` builds it (gcc is on every CI machine); without it every compare runs ~4x slower, silently."""
    assert fastpass._kernel is not None
    assert fastpass.available()  # by default wherever it is built (docs/performance.md, "The compiled pass")
    if platform.machine() in ("x86_64", "AMD64"):
        assert fastpass.isa() in ("avx512", "avx2")  # every x86-64 server of the last decade has AVX2
    elif platform.machine() in ("aarch64", "arm64"):
        assert fastpass.isa() == "neon"


@pytest.fixture(scope="session")
def aarch64_harness(tmp_path_factory) -> Path:
    """bench/kernel_harness.c (the loops without Python) built for AArch64 with setup.py's flags, static."""
    if not (CROSS_CC and QEMU):
        pytest.skip("no AArch64 cross compiler or qemu-aarch64 here "
                    "(apt-get install gcc-aarch64-linux-gnu qemu-user; scripts/check_aarch64.sh)")
    exe = tmp_path_factory.mktemp("aarch64") / "kernel_harness"
    subprocess.run([CROSS_CC, "-O3", "-std=c11", "-ffp-contract=fast", "-static", "-o", str(exe),
                    str(ROOT / "bench" / "kernel_harness.c"), "-lm"], check=True, timeout=300)
    return exe


def emulated(harness: Path, mode: str):
    """fastpass.run_full / run_light, done by the AArch64 build of the loops under qemu: the same runs in, the
    same named sums out, so that compare_tensors finishes them exactly as it does the native pass's."""
    def run(golden: RawTensor, my: RawTensor, runs) -> dict[str, float]:
        records = [struct.pack("<qii", g.size, count_g, count_m) + np.ascontiguousarray(g).tobytes()
                   + np.ascontiguousarray(m).tobytes() for g, m, count_g, count_m in runs]
        kinds = [str(fastpass._kernel.KINDS[str(t.dtype)]) for t in (golden, my)]
        out = subprocess.run([QEMU, str(harness), "neon", *kinds, mode], input=b"".join(records),
                             capture_output=True, check=True, timeout=300).stdout.decode()
        names, values = zip(*(line.split() for line in out.splitlines()))
        assert names == fastpass.SLOTS  # one layout on both architectures
        return {name: float(v) for name, v in zip(names, values)}
    return run


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Run the test on one copy of the loops, then give the process its default back. The AArch64 copy runs in
    place of the native one under qemu (fastpass's two run functions swapped for the emulated build)."""
    kernel = fastpass._kernel
    default = kernel.isa()
    monkeypatch.setenv("AIT_LLM_KERNEL", "compiled")
    if request.param == "aarch64 under qemu":
        harness = request.getfixturevalue("aarch64_harness")
        monkeypatch.setattr(fastpass, "run_full", emulated(harness, "full"))
        monkeypatch.setattr(fastpass, "run_light", emulated(harness, "light"))
        yield request.param
        return
    try:
        kernel.set_isa(request.param)
    except ValueError:
        pytest.skip(f"{request.param} not available on this CPU")
    yield request.param
    kernel.set_isa(default)


def as_raw(values: np.ndarray, dtype: str) -> RawTensor:
    arr = np.asarray(values)
    if dtype == "bfloat16":  # round to nearest even, as torch does
        data = float32_to_bf16_bits(arr)
    else:
        data = arr.astype(dtype)
    return RawTensor(data.reshape(-1), dtype, tuple(arr.shape))


def numpy_pass(golden: RawTensor, my: RawTensor, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setenv("AIT_LLM_KERNEL", "numpy")
        return compare_tensors(golden, my, **kw)


def assert_same(got, want):
    assert got.fail_reason == want.fail_reason
    for name in METRICS:
        a, b = got.values[name], want.values[name]
        if math.isnan(b):
            assert math.isnan(a), name
        else:
            assert a == pytest.approx(b, rel=1e-12, abs=KL_FLOOR if name == "kl_divergence" else 1e-15), name
    for side in ("golden", "my"):
        g, w = getattr(got, side), getattr(want, side)
        assert (g.nan_count, g.inf_count, g.numel, g.dtype, g.shape) == (w.nan_count, w.inf_count, w.numel, w.dtype,
                                                                         w.shape), side
        for stat in ("max", "min"):
            assert getattr(g, stat) == getattr(w, stat) or (math.isnan(getattr(g, stat))
                                                             and math.isnan(getattr(w, stat))), (side, stat)
        assert g.mean == pytest.approx(w.mean, rel=1e-12, abs=1e-300) or math.isnan(w.mean), side


@pytest.mark.parametrize("gdtype,mdtype", [("float32", "bfloat16"), ("float32", "float16"), ("float64", "float32"),
                                           ("float16", "float16"), ("bfloat16", "float32")])
@pytest.mark.parametrize("n", [1, 7, 8, 1023, 1024, 1025, 5000])
def test_every_isa_copy_matches_the_numpy_pass(isa, monkeypatch, gdtype, mdtype, n):
    """Sizes straddle the vector width (2/4/8) and the 1024-element block: the tails are masked, not dropped."""
    rng = np.random.default_rng(n)
    g = rng.standard_normal(n) * 4
    g[::13] = 0.0  # |golden| <= EPS: no relative error
    m = g * (1 + 0.02 * rng.standard_normal(n)) + 1e-3
    golden, my = as_raw(g, gdtype), as_raw(m, mdtype)
    assert_same(compare_tensors(golden, my), numpy_pass(golden, my, monkeypatch))
    assert_same(compare_tensors(golden, my, chunk=5), numpy_pass(golden, my, monkeypatch))  # runs of 5 elements


def test_misaligned_payloads_are_read_correctly(isa, monkeypatch):
    """A .bin payload starts wherever its text header ends: float32 data at an odd byte offset."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal(3001).astype(np.float32)
    buf = bytearray(values.size * 4 + 3)
    buf[3:] = values.tobytes()
    odd = np.frombuffer(bytes(buf), np.float32, values.size, 3)
    assert not odd.flags.aligned
    golden = RawTensor(values, "float32", (values.size,))
    my = RawTensor(odd, "float32", (values.size,))
    result = compare_tensors(golden, my)
    assert result.values["cosine_similarity"] == 1.0 and result.values["max_absolute_error"] == 0.0
    assert result.my.min == values.min() and result.my.max == values.max()


@pytest.mark.parametrize("where", [0, 1023, 1024, 4999])
def test_nan_and_inf_anywhere_are_counted_exactly(isa, monkeypatch, where):
    rng = np.random.default_rng(2)
    g = rng.standard_normal(5000).astype(np.float32)
    m = g.copy()
    m[where] = np.nan
    m[(where + 7) % 5000] = np.inf
    m[(where + 9) % 5000] = -np.inf
    golden, my = as_raw(g, "float32"), as_raw(m, "float32")
    got = compare_tensors(golden, my)
    assert got.my.nan_count == 1 and got.my.inf_count == 2
    assert got.fail_reason.startswith("my_data includes NAN or inf.")
    assert_same(got, numpy_pass(golden, my, monkeypatch))


def test_extreme_values_keep_every_metric_finite_and_exact(isa, monkeypatch):
    """Logits around +-1000 move the log-sum-exp shift; float64 values past float32's range take the exact
    division; tiny values underflow exp() without a warning."""
    rng = np.random.default_rng(3)
    g = np.concatenate([rng.standard_normal(3000) * 5 - 900, rng.standard_normal(3000) * 5 + 1000,
                        rng.standard_normal(2000) * 1e39, rng.standard_normal(500) * 1e-30])
    m = g * (1 + 1e-3 * rng.standard_normal(g.size))
    golden, my = as_raw(g, "float64"), as_raw(m, "float64")
    got = compare_tensors(golden, my, chunk=1000)
    assert all(math.isfinite(v) for v in got.values.values())
    assert_same(got, numpy_pass(golden, my, monkeypatch))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_half_precision_bit_pattern_widens_exactly(isa, dtype):
    """All 65536 patterns: normals, subnormals, signed zeros, infinities and NaNs, as numpy/torch read them."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if dtype == "float16":
        exact = bits.view(np.float16).astype(np.float64)
        data = bits.view(np.float16)
    else:
        with np.errstate(invalid="ignore"):  # NaN patterns
            exact = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        data = bits
    finite = exact[np.isfinite(exact)]
    got = compare_tensors(RawTensor(data, dtype, (bits.size,)), RawTensor(data, dtype, (bits.size,)))
    assert got.golden.nan_count == int(np.isnan(exact).sum())
    assert got.golden.inf_count == int(np.isinf(exact).sum())
    assert (got.golden.min, got.golden.max) == (finite.min(), finite.max())
    assert got.golden.mean == pytest.approx(finite.mean(), rel=1e-12)
    # and the finite ones compare as identical
    fin = RawTensor(data[np.isfinite(exact)], dtype, (finite.size,))
    same = compare_tensors(fin, fin).values
    assert same["max_absolute_error"] == 0.0 and same["relative_euclidean_distance"] == 0.0


def test_light_pass_matches_on_every_isa(isa, monkeypatch):
    rng = np.random.default_rng(4)
    g = rng.standard_normal(4099)
    m = g + 0.01 * rng.standard_normal(4099)
    golden, my = as_raw(g, "float32"), as_raw(m, "bfloat16")
    got = similarity(golden, my)
    with monkeypatch.context() as ctx:
        ctx.setenv("AIT_LLM_KERNEL", "numpy")
        want = similarity(golden, my)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12), name


def test_unknown_isa_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="instruction set sparc is not available here"):
        fastpass._kernel.set_isa("sparc")


def test_numpy_mode_switch(monkeypatch):
    monkeypatch.setenv("AIT_LLM_KERNEL", "numpy")
    assert not fastpass.available()
    monkeypatch.setenv("AIT_LLM_KERNEL", "compiled")
    assert fastpass.available()
    monkeypatch.setenv("AIT_LLM_KERNEL", "bogus")  # ignored, as AIT_LLM_EXECUTOR's unknown values are
    assert fastpass.available()


@pytest.mark.parametrize("spread", [1e-3, 0.02, 0.08, 0.3, 2.0])
def test_kl_is_exact_whatever_the_distance_between_golden_and_mine(isa, monkeypatch, spread):
    """exp(m) is formed as exp(g) * exp(m - g) with a Taylor series whose degree follows the block's largest
    |m - g| (up to 0.02, 0.1, 0.34), and as a second exp() beyond: every regime gives the float64 reference's KL."""
    rng = np.random.default_rng(5)
    g = rng.uniform(-3, 3, 3 * 1024 + 5)
    m = g + rng.uniform(-spread, spread, g.size)
    golden, my = as_raw(g, "float64"), as_raw(m, "float64")
    got = compare_tensors(golden, my).values["kl_divergence"]
    assert got == pytest.approx(wide_kl(g, m), rel=1e-12, abs=KL_FLOOR)
    assert got == pytest.approx(numpy_pass(golden, my, monkeypatch).values["kl_divergence"], rel=1e-12, abs=KL_FLOOR)


def wide_kl(g: np.ndarray, m: np.ndarray) -> float:
    """KL(softmax(g) || softmax(m)) in extended precision: in float64, log-softmax differences of nearly equal
    tensors lose digits."""
    wide_g, wide_m = g.astype(np.longdouble), m.astype(np.longdouble)

    def log_softmax(x):
        return x - (x.max() + np.log(np.sum(np.exp(x - x.max()))))

    lp_g, lp_m = log_softmax(wide_g), log_softmax(wide_m)
    return float(np.sum(np.exp(lp_g) * (lp_g - lp_m)))


@pytest.mark.parametrize("case", ["spread", "few dominate", "biased", "few dominate, far biased", "large logits",
                                  "tiny difference"])
@pytest.mark.parametrize("mine", ["float32", "bfloat16", "float16"])
def test_kl_of_a_half_precision_port_is_the_float64_kl(isa, monkeypatch, case, mine):
    """A port's usual pair (float32 golden, bf16/fp16/fp32 mine, close to each other): the KL is the numpy pass's
    and the extended-precision reference's to 1e-12 relative, also when a few values dominate the softmax, when
    m - g has a mean far from 0 (which the KL does not see) and when the tensors differ by a few ulps."""
    rng = np.random.default_rng(11)
    n = 5 * 1024 + 3
    g = rng.standard_normal(n)
    if case.startswith("few dominate"):
        g[[17, 2000, 4999]] = [14.0, 13.5, 13.9]
    elif case == "large logits":
        g = 10 * g
    g = g.astype(np.float32).astype(np.float64)
    bias = {"biased": 0.01, "few dominate": 0.01, "few dominate, far biased": 0.1}.get(case, 0.0)
    m = g * (1 + 1e-6 * rng.standard_normal(n)) if case == "tiny difference" else g + rng.normal(bias, 0.003, n)
    golden, my = as_raw(g, "float32"), as_raw(m, mine)
    m_stored = my.to_float64()  # what mine holds after rounding to its dtype
    got = compare_tensors(golden, my).values["kl_divergence"]
    assert got == pytest.approx(wide_kl(g, m_stored), rel=1e-12, abs=KL_FLOOR)
    assert got == pytest.approx(numpy_pass(golden, my, monkeypatch).values["kl_divergence"], rel=1e-12, abs=KL_FLOOR)
