"""An op's input error is taken from the pair that compares the op producing that input, when the two dumps of
the tensor are the same; otherwise the input files are read. Reports must be the same either way."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from atb_mirror import golden_llama_dump, rewritten_copy, write_mirror
from pytest_ait_llm.compare import engine as engine_mod
from pytest_ait_llm.compare.engine import sample_digest
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.formats.atb_bin import write_bin
from pytest_ait_llm.formats.tensor import RawTensor

LAYERS = 3


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    golden = golden_llama_dump(tmp_path_factory.mktemp("golden"), num_layers=LAYERS)
    my, _ = write_mirror(golden, tmp_path_factory.mktemp("my"), num_layers=LAYERS)
    return golden, my


def _counting(monkeypatch):
    """Counts input pairs read through (in a worker, or in the parent after a sample differed) and all of them."""
    seen = {"inputs": 0, "read": 0}
    matched, read_here, read_after = (engine_mod._input_tensors, engine_mod._similarity_or_none,
                                      engine_mod.Engine._input_error)

    def inputs(*args):
        got = matched(*args)
        seen["inputs"] += len(got)
        return got

    def read(*args):
        seen["read"] += 1
        return read_here(*args)

    def read_later(self, *args):
        seen["read"] += 1
        return read_after(self, *args)

    monkeypatch.setattr(engine_mod, "_input_tensors", inputs)
    monkeypatch.setattr(engine_mod, "_similarity_or_none", read)
    monkeypatch.setattr(engine_mod.Engine, "_input_error", read_later)
    return seen


def _rows(result):
    return {(r.token_id, r.atb_op, r.data_id): r for r in result.compared}


def test_reused_input_errors_equal_the_ones_read_from_the_files(dumps, tmp_path, monkeypatch):
    golden, my = dumps
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "serial")
    seen = _counting(monkeypatch)
    reused_run = run_compare(golden, my, output_dir=tmp_path / "a")
    reused = seen["inputs"] - seen["read"]
    assert reused > seen["read"] > 0  # layer inputs and norm outputs feed the next op: most are reused
    monkeypatch.setattr(engine_mod, "sample_digest", lambda t, **kw: os.urandom(16))  # no sample ever matches
    seen.update(inputs=0, read=0)
    read = run_compare(golden, my, output_dir=tmp_path / "b")
    assert seen["read"] == seen["inputs"] > 0
    a, b = _rows(reused_run), _rows(read)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].input_metrics is None) == (b[key].input_metrics is None), key
        if a[key].input_metrics:
            for name, value in b[key].input_metrics.items():
                assert a[key].input_metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-15), (key, name)
        assert a[key].passed == b[key].passed and a[key].breaches == b[key].breaches, key


def test_an_input_changed_after_its_producer_was_dumped_is_read_not_reused(dumps, tmp_path, monkeypatch):
    """The consumer's own intensor file differs from the producer's outtensor (an in-place write in between):
    its input error must come from the file, i.e. show the change."""
    golden, my = dumps
    mine = tmp_path / "my"
    # the q_proj of layer 1 reads the output of that layer's input norm; spoil its copy of that tensor only
    target = rewritten_copy(my, mine, "intensor0.bin", lambda values: values * 1.5)
    monkeypatch.setenv("AIT_LLM_EXECUTOR", "serial")
    result = run_compare(golden, mine, output_dir=tmp_path / "out")
    consumer = [r for r in result.compared if Path(r.my_path).parent.parent == target.parent.parent]
    assert consumer, "the spoiled op was compared"
    for row in consumer:
        assert row.input_metrics is not None
        assert row.input_metrics["relative_euclidean_distance"] > 0.3  # the 50 % error in its input file is seen


def same_tensor(a, b) -> bool:
    return sample_digest(a) == sample_digest(b)


def test_sample_digest_covers_dtype_shape_and_sampled_bytes():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(100_000).astype(np.float32)
    a = RawTensor(values, "float32", (100_000,))
    assert same_tensor(a, RawTensor(values.copy(), "float32", (100_000,)))
    assert not same_tensor(a, RawTensor(values.reshape(1000, 100), "float32", (1000, 100)))
    assert not same_tensor(a, RawTensor(values.astype(np.float16), "float16", (100_000,)))
    ends, windows = engine_mod.SAMPLE_ENDS, engine_mod.SAMPLE_WINDOWS
    in_a_window = ends + (100_000 - 2 * ends) // windows * (windows // 2) + 3
    for where in (0, 500, in_a_window, 99_999):  # at an end, in a sampled window, the last element
        changed = values.copy()
        changed[where] += 1.0
        assert not same_tensor(a, RawTensor(changed, "float32", (100_000,))), where
    small = values[:3000].copy()
    other = small.copy()
    other[1500] = 7.0  # small tensors are compared whole
    assert not same_tensor(RawTensor(small, "float32", (3000,)), RawTensor(other, "float32", (3000,)))


@pytest.mark.parametrize("suffix", [".bin", ".pth"])
def test_a_sample_read_from_the_file_has_the_digest_of_the_mapped_one(tmp_path, suffix):
    """Inputs are sampled with pread() (their pages are not mapped yet), outputs through their maps: a tensor must
    get one digest either way, and a change in a sampled window must change it."""
    import torch

    from pytest_ait_llm.compare.engine import ReadOptions

    values = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
    ends, windows = engine_mod.SAMPLE_ENDS, engine_mod.SAMPLE_WINDOWS
    in_a_window = ends + (values.size - 2 * ends) // windows * 3 + 5
    digests = []
    for k, data in enumerate((values, np.where(np.arange(values.size) == in_a_window, 9.0, values))):
        path = tmp_path / f"t{k}{suffix}"
        if suffix == ".bin":
            write_bin(path, data.astype(np.float32).reshape(400, 500))
        else:
            torch.save(torch.from_numpy(data.astype(np.float32).reshape(400, 500)), path)
        tensor = ReadOptions().load(path)
        assert tensor.offset is not None
        digests.append((sample_digest(tensor, from_file=True), sample_digest(tensor)))
    assert digests[0][0] == digests[0][1] and digests[1][0] == digests[1][1]
    assert digests[0][0] != digests[1][0]
