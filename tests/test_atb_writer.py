"""AtbDumpWriter: the files land where the ATB probe would put them, for every -time/-stp/-er setting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_ait_llm.dump.atb_writer import AtbDumpWriter, parse_token_range
from pytest_ait_llm.errors import AitLlmError, FormatError
from pytest_ait_llm.formats.atb_bin import read_bin
from pytest_ait_llm.formats.atb_topology import load_topology

SAMPLE = Path(__file__).parent / "data/ait-sample/Bloom7BFlashAttentionModel.json"
OP = "3_BloomLayer/0_LayerNormOperation"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _save_one(tmp_path: Path, **kwargs) -> tuple[AtbDumpWriter, list[str]]:
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=77, **kwargs)
    writer.save_tensors(0, OP, inputs=[np.ones(2, np.float16), np.zeros(3, np.int32)],
                        outputs=[np.full(2, 5.0, np.float32)])
    op_dir = writer.root / "tensors" / "0_77" / "0" / OP
    return writer, _files(op_dir)


@pytest.mark.parametrize("time, expected", [
    (1, ["after/intensor0.bin", "after/intensor1.bin", "after/outtensor0.bin"]),
    (0, ["before/intensor0.bin", "before/intensor1.bin", "before/outtensor0.bin"]),
    (2, ["after/intensor0.bin", "after/intensor1.bin", "after/outtensor0.bin",
         "before/intensor0.bin", "before/intensor1.bin", "before/outtensor0.bin"]),
    (3, ["after/outtensor0.bin", "before/intensor0.bin", "before/intensor1.bin"]),
])
def test_time_decides_before_and_after(tmp_path, time, expected):
    _, files = _save_one(tmp_path, time=time)
    assert files == expected


@pytest.mark.parametrize("part, expected", [
    (0, ["after/intensor0.bin", "after/intensor1.bin"]),
    (1, ["after/outtensor0.bin"]),
])
def test_part_filters_inputs_and_outputs(tmp_path, part, expected):
    assert _save_one(tmp_path, part=part)[1] == expected


def test_msit_time3_with_part_outputs_only(tmp_path):
    assert _save_one(tmp_path, time=3, part=1, layout="msit")[1] == ["after/outtensor0.bin"]


def test_written_tensors_read_back_and_no_temp_files_remain(tmp_path):
    writer, _ = _save_one(tmp_path)
    op_dir = writer.root / "tensors" / "0_77" / "0" / OP
    np.testing.assert_array_equal(read_bin(op_dir / "after" / "outtensor0.bin").to_float64(), [5.0, 5.0])
    assert read_bin(op_dir / "after" / "intensor1.bin").dtype == "int32"
    assert not [f for f in _files(tmp_path) if f.endswith(".tmp") or "/." in f]


def test_none_entries_keep_their_index(tmp_path):
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=1)
    writer.save_tensors(0, OP, inputs=[None, np.ones(1, np.float32)], outputs=[])
    assert _files(writer.token_dir(0)) == [f"{OP}/after/intensor1.bin"]


def test_torch_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=1)
    t = torch.arange(4, dtype=torch.float32).to(torch.bfloat16)
    writer.save_tensors(0, OP, inputs=[], outputs=[t])
    back = read_bin(writer.token_dir(0) / OP / "after" / "outtensor0.bin")
    assert back.dtype == "bfloat16"
    np.testing.assert_array_equal(back.to_float64(), [0, 1, 2, 3])


def test_tokens_outside_the_range_are_not_written(tmp_path):
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=1, token_range=((3, 5), (7, 7)))
    for token in range(10):
        writer.save_tensors(token, OP, inputs=[], outputs=[np.ones(1, np.float32)])
    written = sorted(int(p.name) for p in (writer.root / "tensors" / "0_1").iterdir())
    assert written == [3, 4, 5, 7]


def test_roots_for_ait_and_msit(tmp_path):
    assert AtbDumpWriter(tmp_path, model_name="M").root == tmp_path / "ait_dump"
    msit = AtbDumpWriter(tmp_path, model_name="M", layout="msit", timestamp="20240131_235959")
    assert msit.root == tmp_path / "msit_dump_20240131_235959"
    assert AtbDumpWriter(tmp_path, model_name="M", layout="msit").root.name.startswith("msit_dump_")


def test_write_topology_writes_model_and_layer_files(tmp_path):
    writer = AtbDumpWriter(tmp_path, model_name="Bloom", pid=99)
    model_path = writer.write_topology(json.loads(SAMPLE.read_text()))
    assert model_path == writer.root / "model" / "99" / "Bloom7BFlashAttentionModel.json"
    assert load_topology(model_path).find("LinearOperation_3_4_0") is not None
    layer = load_topology(writer.root / "layer" / "99" / "Bloom7bCommonLayer_3.json")
    assert layer.ops[0].rel_dir == "3_BloomLayer" and len(layer) == 21


def test_write_topology_rejects_what_readers_would_reject(tmp_path):
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=1)
    with pytest.raises(FormatError, match="opType missing"):
        writer.write_topology({"modelName": "M", "nodes": [{"opName": "X_0"}]})
    with pytest.raises(FormatError, match="file name"):
        writer.write_topology({"modelName": "../M", "nodes": []})
    assert not writer.root.exists()


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "", "a/../../b"])
def test_rel_dir_must_stay_inside_the_token_dir(tmp_path, bad):
    writer = AtbDumpWriter(tmp_path, model_name="M", pid=1)
    with pytest.raises(AitLlmError, match="rel_dir"):
        writer.save_tensors(0, bad, inputs=[], outputs=[np.ones(1, np.float32)])


@pytest.mark.parametrize("kwargs, fragment", [
    ({"time": 4}, "time=4"), ({"part": 3}, "part=3"), ({"layout": "x"}, "layout"),
    ({"token_range": ((5, 3),)}, "token_range"), ({"timestamp": "yesterday"}, "timestamp"),
])
def test_bad_constructor_arguments(tmp_path, kwargs, fragment):
    with pytest.raises(AitLlmError, match=fragment):
        AtbDumpWriter(tmp_path, model_name="M", **kwargs)


# ------------------------------------------------------------------------------------------ environment

def test_env_off_gives_no_writer():
    assert AtbDumpWriter.from_env("M", env={}) is None
    assert AtbDumpWriter.from_env("M", env={"ATB_SAVE_TENSOR": "0"}) is None


def test_env_defaults_match_the_ait_defaults(tmp_path):
    writer = AtbDumpWriter.from_env("M", env={"ATB_SAVE_TENSOR": "1", "ATB_OUTPUT_DIR": f"{tmp_path}/"})
    assert writer.root == tmp_path / "ait_dump"
    assert (writer.time, writer.part, writer.token_range, writer.device_id) == (1, 2, ((0, 0),), 0)
    assert writer.wants_token(0) and not writer.wants_token(1)


def test_env_range_device_pid_and_msit_mode(tmp_path):
    writer = AtbDumpWriter.from_env("M", env={
        "ATB_SAVE_TENSOR": "1", "ATB_OUTPUT_DIR": str(tmp_path), "ATB_SAVE_TENSOR_RANGE": "3,5,7,7",
        "ATB_SAVE_TENSOR_TIME": "1", "ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER": "1", "ATB_SAVE_TENSOR_PART": "2",
        "ATB_DEVICE_ID": "3", "ATB_CUR_PID": "4321",
    })
    assert [t for t in range(10) if writer.wants_token(t)] == [3, 4, 5, 7]
    assert writer.time == 3 and writer.root.name.startswith("msit_dump_")
    writer.save_tensors(4, OP, inputs=[np.ones(1, np.float32)], outputs=[np.ones(1, np.float32)])
    assert _files(writer.root / "tensors") == [f"3_4321/4/{OP}/after/outtensor0.bin",
                                               f"3_4321/4/{OP}/before/intensor0.bin"]


def test_env_description_only_writes_no_tensors(tmp_path):
    writer = AtbDumpWriter.from_env("M", env={"ATB_SAVE_TENSOR": "2", "ATB_OUTPUT_DIR": str(tmp_path)})
    assert not writer.wants_token(0)
    writer.save_tensors(0, OP, inputs=[np.ones(1, np.float32)], outputs=[])
    assert not (writer.root / "tensors").exists()


@pytest.mark.parametrize("variable, value", [
    ("ATB_SAVE_TENSOR_RANGE", "3,5,7"), ("ATB_SAVE_TENSOR_RANGE", "a,b"), ("ATB_SAVE_TENSOR_RANGE", "5,3"),
    ("ATB_SAVE_TENSOR_RANGE", "-1,2"), ("ATB_SAVE_TENSOR_TIME", "4"), ("ATB_SAVE_TENSOR_PART", "both"),
    ("ATB_SAVE_TENSOR", "yes"), ("ATB_DEVICE_ID", "-1"), ("ATB_CUR_PID", "pid"),
    ("ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER", "2"), ("ATB_TIMESTAMP", "noon"),
])
def test_malformed_env_values_name_the_variable(tmp_path, variable, value):
    env = {"ATB_SAVE_TENSOR": "1", "ATB_OUTPUT_DIR": str(tmp_path), variable: value}
    with pytest.raises(AitLlmError) as info:
        AtbDumpWriter.from_env("M", env=env)
    assert variable in str(info.value) and "\n" not in str(info.value)


def test_parse_token_range():
    assert parse_token_range("0,0") == ((0, 0),)
    assert parse_token_range(" 3, 5,7,7") == ((3, 5), (7, 7))
