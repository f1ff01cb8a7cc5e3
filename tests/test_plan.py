"""The plan: which files are compared with which, as data, each side read with its own options."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm.compare.plan import CompareOptions, input_pairs, make_plan
from pytest_ait_llm.formats.atb_layout import open_atb_dump
from pytest_ait_llm.formats.torch_layout import open_torch_dump


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    golden = golden_llama_dump(tmp_path_factory.mktemp("golden"), num_layers=2)
    my, _ = write_mirror(golden, tmp_path_factory.mktemp("my"), num_layers=2)
    return Path(golden.root), my


def _plan(golden: Path, my: Path, options: CompareOptions):
    return make_plan(open_torch_dump(golden), open_atb_dump(my), options)


def test_every_task_names_existing_files_in_order_of_completion(dumps):
    plan = _plan(*dumps, CompareOptions())
    assert plan.tasks and plan.tokens == [0, 1]
    for task in plan.tasks:
        assert task.golden.is_file() and task.my.is_file() and not task.skip
        assert task.row.golden_path == str(task.golden) and task.row.status == "compared"
        assert all(f.is_file() for f in task.golden_inputs + task.my_inputs)
    token0 = [t.row.order for t in plan.tasks if t.row.token_id == 0]
    assert len(token0) == len(plan.tasks) // 2 and len(set(token0)) > len(token0) // 2


def test_golden_inputs_are_read_with_the_golden_sides_options(dumps, tmp_path):
    """A golden input file that is a symlink out of its dump: followed when the golden side allows it, whatever
    the ATB side allows."""
    golden, my = dumps
    copy = tmp_path / "golden" / golden.name
    shutil.copytree(golden, copy)
    task = next(t for t in _plan(copy, my, CompareOptions()).tasks
                if t.row.torch_module.endswith("layers.1.self_attn.q_proj") and t.row.token_id == 0)
    outside = tmp_path / "elsewhere.pth"
    shutil.copy(task.golden_inputs[0], outside)
    os.unlink(task.golden_inputs[0])
    os.symlink(outside, task.golden_inputs[0])

    golden_only = CompareOptions.from_kwargs(golden_allow_symlinks=True, my_allow_symlinks=False)
    my_only = CompareOptions.from_kwargs(golden_allow_symlinks=False, my_allow_symlinks=True)
    assert [p[0] for p in input_pairs(task, golden_only)] == [task.golden_inputs[0]]
    assert input_pairs(task, my_only) == []


def test_options_from_the_api_keywords_are_checked_once(dumps):
    options = CompareOptions.from_kwargs(tokens=[1], ranks=[0, None], max_bin_bytes=1 << 20, allow_symlinks=True)
    assert options.tokens == (1,) and options.ranks == frozenset({"0"})
    assert options.golden.max_bytes == options.my.max_bytes == 1 << 20
    assert options.golden.allow_symlinks is options.my.allow_symlinks is True
    plan = _plan(*dumps, options)
    assert plan.tokens == [1] and {t.row.token_id for t in plan.tasks} == {1}
