"""The merged comparison of a split op: the metrics of the concatenation over ranks, without building it."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pytest_ait_llm.compare.merged import compare_merged, worst_shard
from pytest_ait_llm.compare.metrics import compare_tensors
from pytest_ait_llm.formats.atb_bin import read_bin, write_bin
from pytest_ait_llm.formats.tensor import RawTensor
from pytest_ait_llm.mapping.ranks import REPLICATED, SPLIT, UNKNOWN, decide, split_dim


def _raw(a: np.ndarray) -> RawTensor:
    a = np.ascontiguousarray(a)
    return RawTensor(a, str(a.dtype), tuple(a.shape))


@pytest.fixture(params=["numpy", "compiled"])
def kernel(request, monkeypatch):
    from pytest_ait_llm.compare import fastpass

    if request.param == "compiled" and fastpass._kernel is None:
        pytest.skip("the compiled pass is not built here")
    monkeypatch.setenv("AIT_LLM_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("dim,sizes", [(2, (6, 6, 6, 6)), (1, (3, 7)), (0, (1, 2)), (2, (5, 19))])
def test_merged_metrics_are_those_of_the_concatenation(kernel, dim, sizes):
    rng = np.random.default_rng(dim)
    golden = rng.standard_normal((3, 10, 24)).astype(np.float32)
    mine = (golden + 0.01 * rng.standard_normal(golden.shape)).astype(np.float32)
    shape = list(golden.shape)
    shape[dim] = sum(sizes)
    golden, mine = golden[tuple(slice(0, n) for n in shape)], mine[tuple(slice(0, n) for n in shape)]
    shards = np.split(mine, np.cumsum(sizes)[:-1], axis=dim)

    merged, shares = compare_merged(_raw(golden), [_raw(s) for s in shards], dim, chunk=37)
    whole = compare_tensors(_raw(golden), _raw(mine))
    assert merged.fail_reason == ""
    for name, value in whole.values.items():
        assert merged.values[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert (merged.my.shape, merged.my.max, merged.my.min) == (whole.my.shape, whole.my.max, whole.my.min)
    assert merged.my.mean == pytest.approx(whole.my.mean, rel=1e-12)
    assert sum(s.error_share for s in shares) == pytest.approx(1.0)


def test_shares_point_at_the_shard_that_carries_the_error(kernel):
    rng = np.random.default_rng(1)
    golden = rng.standard_normal((8, 64)).astype(np.float32)
    shards = [golden[:, 16 * r:16 * (r + 1)].copy() for r in range(4)]
    shards[2] *= 1.05
    merged, shares = compare_merged(_raw(golden), [_raw(s) for s in shards], 1)
    assert worst_shard(shares) == 2
    assert shares[2].error_share == pytest.approx(1.0)
    assert shares[2].relative_euclidean_distance == pytest.approx(0.05, rel=1e-5)  # float32 rounding of 1.05
    assert merged.values["relative_euclidean_distance"] < 0.05  # diluted over the four shards


def test_bf16_shards_from_files_compare_like_the_whole_file(tmp_path, kernel):
    rng = np.random.default_rng(2)
    golden = rng.standard_normal((2, 5, 32)).astype(np.float32)
    write_bin(tmp_path / "whole.bin", golden * 1.001, dtype="bfloat16")
    for r in range(4):
        write_bin(tmp_path / f"rank{r}.bin", golden[..., 8 * r:8 * (r + 1)] * 1.001, dtype="bfloat16")
    shards = [read_bin(tmp_path / f"rank{r}.bin") for r in range(4)]
    merged, _ = compare_merged(_raw(golden), shards, 2)
    whole = compare_tensors(_raw(golden), read_bin(tmp_path / "whole.bin"))
    assert merged.my.dtype == "bfloat16"
    for name, value in whole.values.items():
        assert merged.values[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_memory_stays_bounded_by_a_chunk_not_the_concatenation(tmp_path, kernel):
    golden = np.random.default_rng(3).standard_normal((512, 4096)).astype(np.float32)  # 8 MiB
    np.save(tmp_path / "golden.npy", golden)
    for r in range(4):
        write_bin(tmp_path / f"rank{r}.bin", golden[:, 1024 * r:1024 * (r + 1)])
    golden_map = np.load(tmp_path / "golden.npy", mmap_mode="r")
    shards = [read_bin(tmp_path / f"rank{r}.bin") for r in range(4)]
    tracemalloc.start()
    try:
        merged, _ = compare_merged(RawTensor(golden_map, "float32", golden.shape), shards, 1, chunk=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert merged.values["cosine_similarity"] == 1.0
    assert peak < golden.nbytes / 4  # below one shard's size: the concatenation is never built


def test_data_problems_are_reasons_not_exceptions(kernel):
    golden = np.ones((4, 8), np.float32)
    shards = [np.ones((4, 4), np.float32), np.ones((4, 3), np.float32)]
    merged, shares = compare_merged(_raw(golden), [_raw(s) for s in shards], 1)
    assert "do not concatenate along dim 1" in merged.fail_reason and shares == []
    bad = [np.ones((4, 4), np.float32), np.full((4, 4), np.nan, np.float32)]
    merged, _ = compare_merged(_raw(golden), [_raw(s) for s in bad], 1)
    assert merged.fail_reason.startswith("my_data includes NAN or inf. (16 NaN")


def test_distribution_is_decided_from_shapes_content_and_rank_params():
    full = (1, 8, 64)
    assert split_dim(full, [(1, 8, 32), (1, 8, 32)]) == (2, (32, 32))
    assert split_dim(full, [(8, 16)] * 4) == (2, (16, 16, 16, 16))  # leading size-1 dims do not matter
    assert split_dim(full, [(1, 8, 30), (1, 8, 30)]) is None
    # a shard that merely has the full shape of another module is not a fit for it
    assert decide((1, 8, 64), [(1, 8, 64)] * 2, content="distinct", all_reduced=False).kind == UNKNOWN
    assert decide((1, 8, 128), [(1, 8, 64)] * 2, content="distinct", all_reduced=False).kind == SPLIT
    assert decide((1, 8, 64), [(1, 8, 64)] * 2, content="same", all_reduced=False).kind == REPLICATED
    # rank params: the row-parallel output is the full, reduced tensor even where ranks disagree on it
    assert decide((1, 8, 64), [(1, 8, 64)] * 2, content="distinct", all_reduced=True).kind == REPLICATED
    reason = decide((1, 8, 64), [(1, 8, 24)] * 2, content="distinct", all_reduced=False).reason
    assert reason == "shards [1, 8, 24], [1, 8, 24] concatenate along no dim to [1, 8, 64]"
