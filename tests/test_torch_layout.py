"""Reading torch dumps: finding the dump from any of its levels, model_tree.json, and the tensor files."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import input_ids, tiny_llama
from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
from pytest_ait_llm.errors import FormatError, LayoutError
from pytest_ait_llm.formats.torch_layout import (MAX_TREE_DEPTH, load_model_tree, load_torch_tensor,
                                                 open_torch_dump, parse_model_tree)

SAMPLE = Path(__file__).parent / "data/ait-sample"


@pytest.fixture(scope="module")
def llama_dump(tmp_path_factory) -> Path:
    """A real dump of a 1-layer tiny Llama, generate(max_new_tokens=2): the {PID}_cpu dir."""
    model = tiny_llama(num_layers=1)
    with register_hook(model, DumpConfig(dump_path=tmp_path_factory.mktemp("dump"), token_range=(0, 1))) as handle:
        model.generate(input_ids(), max_new_tokens=2)
    return handle.dump_dir


# -- open_torch_dump ---------------------------------------------------------------------------------------------

def test_open_from_the_dump_dir_and_from_the_pid_dir(llama_dump):
    for path in (llama_dump.parent, llama_dump):
        dump = open_torch_dump(path)
        assert dump.root == llama_dump
        assert dump.tokens == [0, 1]
        assert dump.tree.name == "root" and dump.tree.type == "LlamaForCausalLM"


def test_open_from_a_token_dir_restricts_to_that_token(llama_dump):
    dump = open_torch_dump(llama_dump / "1")
    assert dump.root == llama_dump and dump.tokens == [1]
    with pytest.raises(LayoutError, match="no token 0"):
        dump.module_files(0, "root.lm_head")


@pytest.mark.parametrize("layout", ["msit_dump_20240101_120000/torch_tensors/cpu_4242",
                                    "ait_dump/torch_tensors/npu0_4242"])
def test_open_the_original_tools_layouts(llama_dump, tmp_path, layout):
    rank = tmp_path / layout
    shutil.copytree(llama_dump, rank)
    for path in (tmp_path, tmp_path / layout.split("/")[0], rank.parent, rank, rank / "0"):
        dump = open_torch_dump(path)
        assert dump.root == rank, path
    assert open_torch_dump(tmp_path).module_files(1, "root.lm_head").outputs == [
        rank / "1/root.lm_head/output.pth"]


def test_module_files_of_the_real_dump(llama_dump):
    dump = open_torch_dump(llama_dump)
    q = dump.module_files(0, "root.model.layers.0.self_attn.q_proj")
    assert [p.name for p in q.inputs] == ["input_0.pth"] and [p.name for p in q.outputs] == ["output.pth"]
    attn = dump.module_files(1, "root.model.layers.0.self_attn")
    assert [p.name for p in attn.outputs] == ["output_0.pth", "output_1.pth"]
    assert "skipped.json" not in {p.name for p in attn.inputs + attn.outputs}
    never_dumped = dump.module_files(0, "root.model.layers")
    assert never_dumped.inputs == [] and never_dumped.outputs == []


def test_module_files_are_in_numeric_order(tmp_path):
    rank = tmp_path / "123_cpu"
    folder = rank / "0" / "root.m"
    folder.mkdir(parents=True)
    (rank / "model_tree.json").write_text('{"name": "root", "type": "M", "children": []}')
    names = ["output_10.pth", "output_2.pth", "output_1_0.pth", "output_0_1.pth", "output_logits.pth",
             "input_hidden_states.pth", "input_1.pt", "input_0.npy", "skipped.json", "notes.txt"]
    for name in names:
        (folder / name).write_bytes(b"")
    files = open_torch_dump(rank).module_files(0, "root.m")
    assert [p.name for p in files.outputs] == ["output_0_1.pth", "output_1_0.pth", "output_2.pth",
                                               "output_10.pth", "output_logits.pth"]
    assert [p.name for p in files.inputs] == ["input_0.npy", "input_1.pt", "input_hidden_states.pth"]


def test_layout_errors_are_one_line(tmp_path, llama_dump):
    (tmp_path / "empty").mkdir()
    two = tmp_path / "two"
    shutil.copytree(llama_dump, two / "1_cpu")
    shutil.copytree(llama_dump, two / "2_cpu")
    no_tree = tmp_path / "no_tree" / "9_cpu"
    shutil.copytree(llama_dump, no_tree)
    (no_tree / "model_tree.json").unlink()
    cases = {tmp_path / "missing": "not a directory", tmp_path / "empty": "no torch dump found",
             two: "holds 2 torch dumps", no_tree: "no model_tree.json"}
    for path, message in cases.items():
        with pytest.raises(LayoutError, match=message) as info:
            open_torch_dump(path)
        assert "\n" not in str(info.value)


# -- model_tree.json ---------------------------------------------------------------------------------------------

def test_original_sample_tree_keeps_file_order():
    tree = load_model_tree(SAMPLE / "model_tree.json")
    assert (tree.name, tree.type, tree.depth, tree.order) == ("root.transformer.h.2", "BloomLayer", 0, 0)
    modules = list(tree.walk())
    assert [m.order for m in modules] == list(range(len(modules)))
    qkv = tree.find("root.transformer.h.2.self_attention.query_key_value")
    assert (qkv.type, qkv.depth, qkv.parent.name, qkv.is_leaf) == ("Linear", 2, "root.transformer.h.2.self_attention", True)
    assert [c.name.rsplit(".", 1)[1] for c in tree.children] == [
        "input_layernorm", "self_attention", "post_attention_layernorm", "mlp"]


def test_our_tree_orders_by_execution(llama_dump):
    tree = open_torch_dump(llama_dump).tree
    order = {m.name: m.order for m in tree.walk()}
    assert order["root"] == 0
    assert order["root.model.embed_tokens"] < order["root.model.layers.0"] < order["root.model.norm"] \
        < order["root.lm_head"]
    assert order["root.model.layers.0.self_attn.q_proj"] < order["root.model.layers.0.mlp.down_proj"]
    # the ModuleList never ran: numbered after everything that did, but walked where its layers ran
    assert order["root.model.layers"] == max(order.values())
    walk = [m.name for m in tree.walk()]
    assert walk.index("root.model.layers.0") < walk.index("root.model.norm")


def test_exec_order_sorts_children_and_puts_never_run_last():
    tree = parse_model_tree({"name": "root", "type": "M", "exec_order": 0, "children": [
        {"name": "root.spare", "type": "Linear", "exec_order": -1, "children": []},
        {"name": "root.b", "type": "ReLU", "exec_order": 5, "children": []},
        {"name": "root.list", "type": "ModuleList", "exec_order": -1, "children": [
            {"name": "root.list.0", "type": "Linear", "exec_order": 2}]},
    ]})
    assert [c.name for c in tree.children] == ["root.list", "root.b", "root.spare"]
    assert {m.name: m.order for m in tree.walk()} == {
        "root": 0, "root.list.0": 1, "root.b": 2, "root.list": 3, "root.spare": 4}


def _deep(levels: int) -> dict:
    node: dict = {"name": "leaf", "type": "T", "children": []}
    for i in range(levels):
        node = {"name": f"n{i}", "type": "T", "children": [node]}
    return node


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", "not an object"),
    ('{"type": "M"}', "no 'name'"),
    ('{"name": 3, "type": "M"}', "no 'name'"),
    ('{"name": "root", "type": ["M"]}', "no 'type'"),
    ('{"name": "root", "type": "M", "children": {}}', "not a list"),
    ('{"name": "root", "type": "M", "children": [1]}', "children\\[0\\] is int"),
    ('{"name": "root", "type": "M", "exec_order": "1", "children": []}', "exec_order"),
    (json.dumps(_deep(MAX_TREE_DEPTH + 5)), "deeper than"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply|not an object"),
    (b"\xff\xfe\x00", "cannot read"),
])
def test_bad_model_tree_is_a_one_line_format_error(tmp_path, content, message):
    path = tmp_path / "model_tree.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FormatError, match=message) as info:
        load_model_tree(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_trailing_garbage_from_the_original_writer_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "model_tree.json"
    path.write_text('{"name": "root", "type": "M", "children": []}\n   "type": "Linear"}]}]}')
    with pytest.warns(UserWarning, match="trailing data"):
        tree = load_model_tree(path)
    assert tree.name == "root"


def test_tree_module_import_does_not_import_torch():
    code = "import sys, pytest_ait_llm.formats.torch_layout; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- tensors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.int8, torch.bool])
def test_torch_tensor_round_trip(tmp_path, dtype):
    tensor = (torch.arange(12).reshape(3, 4) - 5).to(dtype)
    torch.save(tensor, tmp_path / "t.pth")
    raw = load_torch_tensor(tmp_path / "t.pth")
    assert raw.dtype == str(dtype).replace("torch.", "") and raw.shape == (3, 4)
    np.testing.assert_array_equal(raw.to_float64(), tensor.double().numpy())
    assert not raw.data.flags.owndata  # a view over the loaded storage, not a copy


def test_bfloat16_comes_back_as_bit_patterns(tmp_path):
    tensor = torch.tensor([[1.5, -2.25], [3.0e38, 1e-3]], dtype=torch.bfloat16)
    torch.save(tensor, tmp_path / "bf.pth")
    raw = load_torch_tensor(tmp_path / "bf.pth")
    assert (raw.dtype, raw.shape, raw.data.dtype) == ("bfloat16", (2, 2), np.uint16)
    np.testing.assert_array_equal(raw.to_float64(), tensor.double().numpy())


def test_a_saved_transposed_view_keeps_its_logical_values(tmp_path):
    tensor = torch.arange(6.0).reshape(2, 3)
    torch.save(tensor.t(), tmp_path / "t.pt")
    raw = load_torch_tensor(tmp_path / "t.pt")
    np.testing.assert_array_equal(raw.to_float64(), tensor.t().numpy())
    np.testing.assert_array_equal(raw.to_float64().reshape(-1), tensor.t().reshape(-1).numpy())


def test_legacy_non_zip_files_are_read(tmp_path):
    torch.save(torch.ones(3), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(load_torch_tensor(tmp_path / "old.pth").to_float64(), np.ones(3))


def test_npy_is_memory_mapped(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.float16).reshape(2, 3))
    raw = load_torch_tensor(tmp_path / "a.npy")
    assert isinstance(raw.data, np.memmap) and (raw.dtype, raw.shape) == ("float16", (2, 3))


class _Payload:
    """Unpickling this would create a file: the test checks that it never happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump", "torch.save-legacy"])
def test_code_executing_pickles_are_refused(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"x": _Payload(marker)}, path)
    elif writer == "torch.save-legacy":
        torch.save(_Payload(marker), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(FormatError, match="refused") as info:
        load_torch_tensor(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({"a": torch.ones(2)}, p), "holds a dict"),
    (lambda p: torch.save([torch.ones(2)], p), "holds a list"),
    (lambda p: p.write_bytes(b"definitely not torch"), "not a (plain )?(torch )?tensor file"),
    (lambda p: p.write_bytes(b""), "not a torch tensor file"),
    (lambda p: None, "no such file"),
])
def test_non_tensor_content_is_a_format_error(tmp_path, make, message):
    path = tmp_path / "x.pth"
    make(path)
    with pytest.raises(FormatError, match=message):
        load_torch_tensor(path)


def test_npy_of_objects_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="o.npy"):
        load_torch_tensor(tmp_path / "o.npy")


def test_dumped_tensors_load_back_equal(llama_dump):
    dump = open_torch_dump(llama_dump)
    path = dump.module_files(1, "root.lm_head").outputs[0]
    raw = load_torch_tensor(path)
    np.testing.assert_array_equal(raw.to_float64(), torch.load(path, weights_only=True).double().numpy())
    assert raw.path == path
