"""Scaling out: each token and each rank of a dump is its own pytest test, spread over xdist workers."""
from __future__ import annotations

import re
import shutil

import pytest

import numpy  # noqa: F401  (loaded before pytester's in-process runs, which cannot re-import it)
import torch  # noqa: F401

import pytest_ait_llm.api  # noqa: F401
from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm.api import run_compare

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def two_token_two_rank(tmp_path_factory):
    """A golden dump of 2 tokens and an ATB dump of the same 2 tokens on 2 ranks."""
    out = tmp_path_factory.mktemp("scale")
    golden = golden_llama_dump(out / "golden", num_layers=2, seq=6)
    root, _ = write_mirror(golden, out / "atb", num_layers=2)
    shutil.copytree(root / "tensors" / "0_4242", root / "tensors" / "1_4242")
    return golden.root, root


TEST_SRC = '''
def test_piece(torch_dump, atb_dump, compare_ops, ait_token, ait_rank):
    result = compare_ops(torch_dump, atb_dump, tokens=[ait_token], ranks=[ait_rank])
    assert {row.token_id for row in result.compared} == {ait_token}
    assert {row.rank for row in result.compared} == {ait_rank}
'''


def test_tokens_and_ranks_become_separate_tests_spread_over_workers(pytester, two_token_two_rank):
    golden, my = two_token_two_rank
    pytester.makepyfile(test_port=TEST_SRC)
    result = pytester.runpytest("-p", "xdist", "-n", "2", "-v", f"--ait-golden-path={golden}",
                                f"--ait-my-path={my}", "--ait-token-range=0,1", "--ait-output=out")
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    ids = set(re.findall(r"test_piece\[(token\d-rank\d_\d+)\]", out))
    assert ids == {"token0-rank0_4242", "token1-rank0_4242", "token0-rank1_4242", "token1-rank1_4242"}
    csvs = re.findall(r"^OK\s+test_port.py::test_piece\[[^\]]+\]: (\S+)$", out, re.M)
    assert len(set(csvs)) == 4


def test_a_token_that_is_not_in_the_dump_fails_instead_of_passing_on_nothing(two_token_two_rank):
    golden, my = two_token_two_rank
    result = run_compare(golden, my, tokens=[7], write_csv=False)
    assert not result.passed and "nothing was compared" in result.failure_message()
