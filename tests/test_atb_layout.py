"""Opening ATB dumps: from any level of the tree, ait and msit roots, a deterministic topology choice."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hang_guard import guarded
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.errors import LayoutError
from pytest_ait_llm.formats.atb_bin import read_bin
from pytest_ait_llm.formats.atb_layout import find_atb_dumps, op_dir, op_files, open_atb_dump
from pytest_ait_llm.formats.atb_topology import parse_topology

SAMPLE = Path(__file__).parent / "data/ait-sample/Bloom7BFlashAttentionModel.json"
PID = 4242
LINEAR = "LinearOperation_3_4_0"


def _value(token: int, order: int) -> float:
    return token * 1000.0 + order


def build_dump(out: Path, *, layout: str = "ait", save_time: int = 1, tokens=(0, 1), write_topology: bool = True,
               timestamp: str | None = None) -> AtbDumpWriter:
    """A Bloom-sample dump: every op writes one input and one output whose value encodes (token, op order)."""
    writer = AtbDumpWriter(out, model_name="Bloom", pid=PID, device_id=0, token_range=((0, max(tokens)),),
                           time=save_time, layout=layout, timestamp=timestamp)
    topo_json = json.loads(SAMPLE.read_text())
    if write_topology:
        writer.write_topology(topo_json)
    for token in tokens:
        for op in parse_topology(topo_json).walk():
            value = np.full(2, _value(token, op.order), np.float32)
            writer.save_tensors(token, op.rel_dir, inputs=[-value], outputs=[value])
    return writer


@pytest.fixture
def ait_dump(tmp_path) -> Path:
    return build_dump(tmp_path / "out").root


def _linear_output(dump, token: int) -> float:
    rank = dump.ranks[0]
    files = op_files(rank.token_dirs[token], rank.topology().find(LINEAR))
    assert len(files.outputs) == 1
    return float(read_bin(files.outputs[0]).to_float64()[0])


def test_open_from_root(ait_dump):
    dump = open_atb_dump(ait_dump)
    assert dump.root == ait_dump and dump.tokens == [0, 1]
    (rank,) = dump.ranks
    assert (rank.device_id, rank.pid, rank.path.name) == (0, PID, f"0_{PID}")
    assert rank.topology().model_name == "Bloom7BFlashAttentionModel"
    assert rank.topology() is rank.topology()  # cached
    order = rank.topology().find(LINEAR).order
    assert _linear_output(dump, 0) == _value(0, order)
    assert _linear_output(dump, 1) == _value(1, order)


def test_open_from_the_output_dir_rank_dir_tensors_dir_and_token_dir(ait_dump):
    rank_dir = ait_dump / "tensors" / f"0_{PID}"
    for path in (ait_dump.parent, rank_dir, ait_dump / "tensors", str(rank_dir)):
        dump = open_atb_dump(path)
        assert dump.root == ait_dump and dump.tokens == [0, 1]
    only_one = open_atb_dump(rank_dir / "1")
    assert only_one.tokens == [1] and only_one.root == ait_dump
    assert list(only_one.ranks[0].token_dirs) == [1]
    assert _linear_output(only_one, 1) == _value(1, 6)


def test_inputs_and_outputs_of_every_op(ait_dump):
    rank = open_atb_dump(ait_dump).ranks[0]
    for op in rank.topology().walk():
        files = op_files(rank.token_dirs[0], op)
        assert [p.name for p in files.outputs] == ["outtensor0.bin"]
        assert [p.name for p in files.inputs] == ["intensor0.bin"]
        assert read_bin(files.inputs[0]).to_float64()[0] == -_value(0, op.order)


def test_msit_root_inputs_before_outputs_after(tmp_path):
    root = build_dump(tmp_path, layout="msit", save_time=3, timestamp="20250102_030405").root
    assert root.name == "msit_dump_20250102_030405"
    for path in (tmp_path, root):
        dump = open_atb_dump(path)
        rank = dump.ranks[0]
        files = op_files(rank.token_dirs[0], rank.topology().find(LINEAR))
        assert files.inputs[0].parent.name == "before" and files.outputs[0].parent.name == "after"


def test_outputs_fall_back_to_before(tmp_path):
    dump = open_atb_dump(build_dump(tmp_path, save_time=0, tokens=(0,)).root)
    rank = dump.ranks[0]
    files = op_files(rank.token_dirs[0], rank.topology().find(LINEAR))
    assert files.outputs[0].parent.name == "before" and files.inputs[0].parent.name == "before"


def test_tensor_files_sort_numerically(tmp_path):
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=PID)
    writer.write_topology(json.loads(SAMPLE.read_text()))
    outs = [np.full(1, i, np.float32) for i in range(12)]
    writer.save_tensors(0, "3_BloomLayer", inputs=[], outputs=outs)
    rank = open_atb_dump(writer.root).ranks[0]
    files = op_files(rank.token_dirs[0], rank.topology().ops[0])
    assert [p.name for p in files.outputs] == [f"outtensor{i}.bin" for i in range(12)]


def test_missing_op_folder_gives_empty_files(ait_dump):
    rank = open_atb_dump(ait_dump).ranks[0]
    linear = rank.topology().find(LINEAR)
    shutil.rmtree(rank.token_dirs[0] / linear.rel_dir)
    files = op_files(rank.token_dirs[0], linear)
    assert files.inputs == [] and files.outputs == []


def test_msit_offset_top_level_folders_resolve_by_type(ait_dump):
    rank = open_atb_dump(ait_dump).ranks[0]
    token_dir = rank.token_dirs[0]
    (token_dir / "3_BloomLayer").rename(token_dir / "4_BloomLayer")
    linear = rank.topology().find(LINEAR)
    assert op_dir(token_dir, linear) == token_dir / "4_BloomLayer/4_ParallelLinearBaseV2/0_LinearOperation"
    assert read_bin(op_files(token_dir, linear).outputs[0]).to_float64()[0] == _value(0, linear.order)

    # two candidate folders for one topology op: ambiguous, so nothing is guessed
    shutil.copytree(token_dir / "4_BloomLayer", token_dir / "9_BloomLayer")
    assert op_dir(token_dir, linear) is None


def test_choice_among_several_topologies_is_deterministic(ait_dump):
    model_dir = ait_dump / "model" / str(PID)
    decoy = {"modelName": "AAA_Decoder", "nodes": [{"opName": "DecoderLayer_41", "opType": "DecoderLayer"}]}
    (model_dir / "AAA_Decoder.json").write_text(json.dumps(decoy))
    rank = open_atb_dump(ait_dump).ranks[0]
    assert len(rank.topology_paths) == 2
    assert rank.topology().model_name == "Bloom7BFlashAttentionModel"

    # a tie (same top-level folders) goes to the first name in sorted order, whatever listdir says
    twin = json.loads(SAMPLE.read_text())
    twin["modelName"] = "AAA_Twin"
    (model_dir / "AAA_Twin.json").write_text(json.dumps(twin))
    assert open_atb_dump(ait_dump).ranks[0].topology().model_name == "AAA_Twin"


def test_unparsable_extra_topology_is_skipped_and_recorded(ait_dump):
    (ait_dump / "model" / str(PID) / "0_broken.json").write_text("{")
    rank = open_atb_dump(ait_dump).ranks[0]
    assert rank.topology().model_name == "Bloom7BFlashAttentionModel"
    assert len(rank.skipped_topologies) == 1 and "0_broken.json" in rank.skipped_topologies[0]


def test_layer_only_dump(ait_dump):
    shutil.rmtree(ait_dump / "model")
    rank = open_atb_dump(ait_dump).ranks[0]
    assert rank.topology_paths == [] and len(rank.layer_paths) == 1
    topo = rank.topology()
    linear = topo.find(LINEAR)
    assert linear.rel_dir == "3_BloomLayer/4_ParallelLinearBaseV2/0_LinearOperation"
    assert _linear_output(open_atb_dump(ait_dump), 0) == _value(0, linear.order)


def test_missing_topology_says_where_it_was_expected(tmp_path):
    root = build_dump(tmp_path, tokens=(0,), write_topology=False).root
    dump = open_atb_dump(root)
    assert dump.tokens == [0]
    with pytest.raises(LayoutError) as info:
        dump.ranks[0].topology()
    assert f"model/{PID}/*.json" in str(info.value) and "\n" not in str(info.value)


def test_only_numeric_token_dirs_and_rank_dirs_count(ait_dump):
    rank_dir = ait_dump / "tensors" / f"0_{PID}"
    for name in ("tmp", "1a", "x_1"):
        (rank_dir / name).mkdir()
    (ait_dump / "tensors" / "notes_txt").mkdir()
    (ait_dump / "tensors" / "README").write_text("hi")
    dump = open_atb_dump(ait_dump)
    assert [r.path.name for r in dump.ranks] == [f"0_{PID}"] and dump.tokens == [0, 1]


def test_several_ranks_are_sorted(tmp_path):
    for device in (1, 0):
        writer = AtbDumpWriter(tmp_path, model_name="M", pid=100 + device, device_id=device)
        writer.save_tensors(0, "0_X", inputs=[], outputs=[np.ones(1, np.float32)])
    dump = open_atb_dump(tmp_path)
    assert [(r.device_id, r.pid) for r in dump.ranks] == [(0, 100), (1, 101)]


@pytest.mark.parametrize("make", ["empty", "missing", "file", "no_ranks"])
def test_unknown_paths_say_what_was_expected(tmp_path, make):
    path = tmp_path / "thing"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    elif make == "no_ranks":
        (path / "tensors").mkdir(parents=True)
    with pytest.raises(LayoutError) as info:
        open_atb_dump(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "expected" in message


def test_two_roots_are_ambiguous_but_discoverable(tmp_path):
    build_dump(tmp_path, tokens=(0,))
    build_dump(tmp_path, layout="msit", save_time=3, tokens=(0,), timestamp="20250101_000000")
    with pytest.raises(LayoutError, match="2 ATB dump roots"):
        open_atb_dump(tmp_path)
    assert [p.name for p in find_atb_dumps(tmp_path)] == ["ait_dump", "msit_dump_20250101_000000"]
    assert find_atb_dumps(tmp_path / "ait_dump") == [tmp_path / "ait_dump"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loops_do_not_hang(tmp_path):
    root = build_dump(tmp_path / "runs" / "a", tokens=(0,)).root
    loop_home = tmp_path / "runs"
    (loop_home / "loop").symlink_to(loop_home, target_is_directory=True)
    (root / "tensors" / f"0_{PID}" / "0" / "self").symlink_to(root, target_is_directory=True)
    (root / "tensors" / "loop").symlink_to(root / "tensors", target_is_directory=True)

    found = guarded(find_atb_dumps, tmp_path, max_depth=10)
    dump = guarded(open_atb_dump, root)
    guarded(dump.ranks[0].topology)
    with pytest.raises(LayoutError):
        guarded(open_atb_dump, loop_home)
    assert found == [root]
