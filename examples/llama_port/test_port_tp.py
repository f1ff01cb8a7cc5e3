"""The precision tests a team keeps for the tensor-parallel build of the port (``PORT_TP=2``: two ranks, Megatron
layout, ``LinearParallelOperation`` for o_proj/down_proj), against the same single-device golden.

The ranks are compared as one: a split op's row is the concatenation of its shards (``rank`` = ``merged``), a
replicated op is compared on every rank and across ranks.
"""
from __future__ import annotations

import sys

import pytest

port = sys.modules["llama_port_port"]  # port.py, imported under this name by conftest.py
port_tp = port.load_sibling("llama_port_port_tp", "port_tp.py")

TP = {"PORT_TP": "2"}


@pytest.mark.ait_tolerance(cos=0.999, red=0.02)
def test_healthy_tp_port(torch_dump, ait_exec_run, compare_ops):
    tp_dump = ait_exec_run(env=TP)
    assert len(tp_dump.ranks) == 2
    result = compare_ops(torch_dump, tp_dump)
    merged = [r for r in result.compared if r.rank == "merged"]
    assert merged and all(len(r.my_path.split(";")) == 2 for r in merged)  # q/k/v, gate/up: both shards


@pytest.mark.ait_tolerance(cos=0.999, red=0.02)
def test_shard_bug_is_named_with_its_rank(torch_dump, ait_exec_run, compare_ops):
    bug = port_tp.TP_BUGS["shard_scale"]
    with pytest.raises(AssertionError) as failure:
        compare_ops(torch_dump, ait_exec_run(env={**TP, "PORT_TP_BUG": "shard_scale"}))
    first_lines = str(failure.value).strip().splitlines()[:2]
    assert bug.rel_dir in first_lines[0] and bug.torch_module in first_lines[0], failure.value
    assert "rank 1's shard" in first_lines[1], failure.value


@pytest.mark.ait_tolerance(cos=0.999, red=0.02)
def test_ranks_that_disagree_on_a_replicated_tensor_are_caught(torch_dump, ait_exec_run, compare_ops):
    bug = port_tp.TP_BUGS["allreduce_skew"]
    with pytest.raises(AssertionError) as failure:
        compare_ops(torch_dump, ait_exec_run(env={**TP, "PORT_TP_BUG": "allreduce_skew"}))
    message = str(failure.value)
    assert bug.rel_dir in message.splitlines()[0], message
    assert "differs between ranks: rank 1 vs rank 0" in message, message
