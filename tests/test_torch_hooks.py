"""The torch-side dump: what a user finds on disk after running their model under register_hook."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_models import input_ids, tiny_bloom, tiny_llama
from pytest_ait_llm.dump import torch_hooks
from pytest_ait_llm.dump.torch_hooks import DumpConfig, device_label, register_hook


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _hooks_left(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
            or m._forward_pre_hooks_with_kwargs]


def _load(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)


class _Recorder:
    """The test's own reference: every module's inputs and outputs per token, captured independently."""

    def __init__(self, model: nn.Module):
        self.token = -1
        self.outputs: dict[tuple[int, str], object] = {}
        self.inputs: dict[tuple[int, str], tuple] = {}
        self.handles = [model.register_forward_pre_hook(self._count)]
        for name, module in model.named_modules():
            full = f"root.{name}" if name else "root"
            self.handles.append(module.register_forward_hook(self._keep(full)))

    def _count(self, module, args):
        self.token += 1

    def _keep(self, name):
        def hook(module, args, output):
            key = (self.token, name)
            if key not in self.outputs:
                self.outputs[key] = _clone(output)
                self.inputs[key] = _clone(args)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """One tiny Llama generate(max_new_tokens=2) under the dump hooks, with an independent reference capture."""
    model = tiny_llama()
    recorder = _Recorder(model)
    dump_path = tmp_path_factory.mktemp("llama_dump")
    with register_hook(model, DumpConfig(dump_path=dump_path, token_range=(0, 1))) as handle:
        generated = model.generate(input_ids(), max_new_tokens=2)
    recorder.remove()
    return SimpleNamespace(model=model, handle=handle, dump_dir=handle.dump_dir, ref=recorder,
                           generated=generated)


# -- layout ------------------------------------------------------------------------------------------------------

def test_generate_two_tokens_writes_token_dirs_0_and_1_and_the_tree(llama_run):
    assert llama_run.dump_dir.name == f"{os.getpid()}_cpu"
    assert sorted(p.name for p in llama_run.dump_dir.iterdir()) == ["0", "1", "model_tree.json"]
    assert llama_run.handle.token_count == 2


@pytest.mark.parametrize("token", [0, 1])
@pytest.mark.parametrize("relpath", [
    "root.model.embed_tokens/output.pth",
    "root.model.layers.0.input_layernorm/output.pth",
    "root.model.layers.0.self_attn.q_proj/input_0.pth",
    "root.model.layers.0.self_attn.q_proj/output.pth",
    "root.model.layers.0.self_attn/output_0.pth",      # attention returns (output, weights)
    "root.model.layers.0.self_attn/input_hidden_states.pth",  # HF passes it by keyword
    "root.model.layers.1.mlp.down_proj/output.pth",
    "root.model.layers.1/output.pth",
    "root.model.norm/output.pth",
    "root.lm_head/output.pth",
    "root/output_logits.pth",                           # CausalLMOutputWithPast, saved per key
    "root/input_input_ids.pth",
])
def test_files_a_user_expects_exist(llama_run, token, relpath):
    assert (llama_run.dump_dir / str(token) / relpath).is_file()


def test_no_temporary_files_are_left(llama_run):
    assert not [f for f in _files(llama_run.dump_dir) if f.endswith(".tmp") or "/." in f]


# -- values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [0, 1])
def test_saved_outputs_equal_the_module_outputs(llama_run, token):
    checked = 0
    for (tid, name), output in llama_run.ref.outputs.items():
        if tid != token:
            continue
        folder = llama_run.dump_dir / str(token) / name
        if isinstance(output, torch.Tensor):
            saved = _load(folder / "output.pth")
            assert saved.dtype == output.dtype and torch.equal(saved, output), name
            checked += 1
        elif isinstance(output, tuple):
            for i, element in enumerate(output):
                if isinstance(element, torch.Tensor):
                    assert torch.equal(_load(folder / f"output_{i}.pth"), element), f"{name}[{i}]"
                    checked += 1
    assert checked > 30  # every Linear, norm, layer, attention ... of a 2-layer Llama
    logits = llama_run.ref.outputs[(token, "root")].logits
    assert torch.equal(_load(llama_run.dump_dir / str(token) / "root/output_logits.pth"), logits)


def test_decode_token_sees_one_new_position(llama_run):
    prefill = _load(llama_run.dump_dir / "0/root.model.layers.0.self_attn.q_proj/output.pth")
    decode = _load(llama_run.dump_dir / "1/root.model.layers.0.self_attn.q_proj/output.pth")
    assert prefill.shape[1] == input_ids().shape[1] and decode.shape[1] == 1


def test_saved_inputs_equal_the_module_inputs(llama_run):
    name = "root.model.layers.1.mlp.down_proj"
    (reference,) = llama_run.ref.inputs[(0, name)]
    assert torch.equal(_load(llama_run.dump_dir / "0" / name / "input_0.pth"), reference)


def test_a_view_is_saved_without_its_base_storage(tmp_path):
    class Slicer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("big", torch.randn(512, 512))

        def forward(self, x):
            return self.big[:2, 3:5] * 1 + x, self.big[:, 7]  # the second output is a strided view

    model = Slicer()
    with register_hook(model, DumpConfig(dump_path=tmp_path)) as handle:
        _, column = model(torch.zeros(2, 2))
    saved = _load(handle.dump_dir / "0/root/output_1.pth")
    assert torch.equal(saved, column)
    assert saved.untyped_storage().nbytes() == 512 * 4  # not the 1 MiB buffer
    assert (handle.dump_dir / "0/root/output_1.pth").stat().st_size < 64 * 1024


# -- model_tree.json ---------------------------------------------------------------------------------------------

def test_model_tree_names_types_and_execution_order(llama_run):
    tree = json.loads((llama_run.dump_dir / "model_tree.json").read_text())
    assert (tree["name"], tree["type"]) == ("root", "LlamaForCausalLM")
    nodes = {}

    def walk(node, out):
        nodes[node["name"]] = node
        out.append(node["name"])
        for child in node["children"]:
            walk(child, out)
        return out

    preorder = walk(tree, [])
    assert set(preorder) == {"root." + n if n else "root" for n, _ in llama_run.model.named_modules()}
    assert nodes["root.model.layers.0.self_attn.q_proj"]["type"] == "Linear"
    assert nodes["root.model.layers.0.input_layernorm"]["type"] == "LlamaRMSNorm"
    order = ["root.model.embed_tokens", "root.model.layers.0", "root.model.layers.0.self_attn.q_proj",
             "root.model.layers.1", "root.model.norm", "root.lm_head"]
    assert [nodes[n]["exec_order"] for n in order] == sorted(nodes[n]["exec_order"] for n in order)
    assert [preorder.index(n) for n in order] == sorted(preorder.index(n) for n in order)
    # the ModuleList never runs itself, yet sits where its layers ran: before the final norm
    assert nodes["root.model.layers"]["exec_order"] == -1
    assert preorder.index("root.model.layers") < preorder.index("root.model.norm")


def test_modules_that_never_run_come_last_with_exec_order_minus_1(tmp_path):
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(2, 2)  # declared first, never called
            self.b = nn.ReLU()
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))

    model = WithSpare()
    with register_hook(model, DumpConfig(dump_path=tmp_path)) as handle:
        model(torch.ones(1, 2))
    tree = json.loads((handle.dump_dir / "model_tree.json").read_text())
    assert [(c["name"], c["exec_order"]) for c in tree["children"]] == [
        ("root.a", 1), ("root.b", 2), ("root.spare", -1)]


def test_model_tree_is_written_for_the_first_dumped_token_even_if_not_token_0(tmp_path):
    model = tiny_llama(num_layers=1)
    with register_hook(model, DumpConfig(dump_path=tmp_path, token_range=(1,))) as handle:
        model.generate(input_ids(), max_new_tokens=3)
    assert sorted(p.name for p in handle.dump_dir.iterdir()) == ["1", "model_tree.json"]


# -- removal and independence ------------------------------------------------------------------------------------

def test_remove_leaves_no_hook_and_later_runs_write_nothing(tmp_path):
    model = tiny_llama(num_layers=1)
    assert _hooks_left(model) == []
    handle = register_hook(model, DumpConfig(dump_path=tmp_path, token_range=range(10)))
    assert _hooks_left(model) != []
    model.generate(input_ids(), max_new_tokens=2)
    before = _files(tmp_path)
    handle.remove()
    handle.remove()  # idempotent
    assert _hooks_left(model) == []
    model.generate(input_ids(), max_new_tokens=2)
    assert _files(tmp_path) == before
    assert handle.token_count == 2


def test_two_handles_on_two_models_count_and_write_independently(tmp_path):
    first, second = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 3))
    with register_hook(first, DumpConfig(dump_path=tmp_path / "a", token_range=(0,))) as a, \
            register_hook(second, DumpConfig(dump_path=tmp_path / "b", token_range=(1,))) as b:
        for _ in range(2):
            first(torch.ones(1, 2))
        for _ in range(3):
            second(torch.ones(1, 2))
    assert (a.token_count, b.token_count) == (2, 3)
    assert sorted(p.name for p in a.dump_dir.iterdir()) == ["0", "model_tree.json"]
    assert sorted(p.name for p in b.dump_dir.iterdir()) == ["1", "model_tree.json"]
    assert _load(b.dump_dir / "1/root.0/output.pth").shape == (1, 3)
    assert _hooks_left(first) == [] and _hooks_left(second) == []


def test_a_forward_that_raises_does_not_derail_the_token_count(tmp_path):
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.fail = True

        def forward(self, x):
            y = self.lin(x)
            if self.fail:
                raise RuntimeError("boom")
            return y

    model = Flaky()
    with register_hook(model, DumpConfig(dump_path=tmp_path, token_range=(0, 1))) as handle:
        with pytest.raises(RuntimeError):
            model(torch.ones(1, 2))
        model.fail = False
        out = model(torch.ones(1, 2))
    assert handle.token_count == 2
    assert torch.equal(_load(handle.dump_dir / "1/root/output.pth"), out)
    assert (handle.dump_dir / "model_tree.json").is_file()


def test_registering_twice_on_the_same_dump_dir_warns(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    with register_hook(model, DumpConfig(dump_path=tmp_path)):
        model(torch.ones(1, 2))
    with pytest.warns(UserWarning, match="already holds a dump"):
        register_hook(model, DumpConfig(dump_path=tmp_path)).remove()


# -- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module_list, expected", [
    (("LlamaRMSNorm",), {"root.model.layers.0.input_layernorm", "root.model.layers.0.post_attention_layernorm",
                         "root.model.norm"}),
    (("root.model.layers.0.mlp.*",), {"root.model.layers.0.mlp.gate_proj", "root.model.layers.0.mlp.up_proj",
                                      "root.model.layers.0.mlp.down_proj", "root.model.layers.0.mlp.act_fn"}),
    (("*.q_proj", nn.Embedding), {"root.model.layers.0.self_attn.q_proj", "root.model.embed_tokens"}),
])
def test_module_list_selects_by_type_name_class_or_glob(tmp_path, module_list, expected):
    model = tiny_llama(num_layers=1)
    with register_hook(model, DumpConfig(dump_path=tmp_path, module_list=module_list)) as handle:
        model.generate(input_ids(), max_new_tokens=1)
    assert {p.name for p in (handle.dump_dir / "0").iterdir()} == expected
    tree = (handle.dump_dir / "model_tree.json").read_text()
    assert "root.lm_head" in tree  # the tree always holds the whole model


@pytest.mark.parametrize("part, prefixes", [(0, {"input"}), (1, {"output"}), (2, {"input", "output"})])
def test_tensor_part_chooses_inputs_outputs_or_both(tmp_path, part, prefixes):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with register_hook(model, DumpConfig(dump_path=tmp_path, tensor_part=part)) as handle:
        model(torch.ones(1, 2))
    names = {p.name.split("_")[0].split(".")[0] for p in (handle.dump_dir / "0").rglob("*.pth")}
    assert names == prefixes


def test_dump_last_logits_saves_root_logits_when_root_is_not_selected(tmp_path):
    model = tiny_llama(num_layers=1)
    config = DumpConfig(dump_path=tmp_path, token_range=(0, 1), module_list=("lm_head",), dump_last_logits=True)
    with register_hook(model, config) as handle:
        model.generate(input_ids(), max_new_tokens=2)
    for token in ("0", "1"):
        assert sorted(p.name for p in (handle.dump_dir / token).iterdir()) == ["root", "root.lm_head"]
        assert sorted(p.name for p in (handle.dump_dir / token / "root").iterdir()) == ["output_logits.pth"]
        assert torch.equal(_load(handle.dump_dir / token / "root/output_logits.pth"),
                           _load(handle.dump_dir / token / "root.lm_head/output.pth"))


def test_dump_last_logits_of_a_plain_tensor_model(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3))
    config = DumpConfig(dump_path=tmp_path, module_list=("nothing",), dump_last_logits=True)
    with register_hook(model, config) as handle:
        out = model(torch.ones(1, 2))
    assert torch.equal(_load(handle.dump_dir / "0/root/output_logits.pth"), out)


def test_device_folder_names():
    assert device_label(torch.device("cpu")) == "cpu"
    assert device_label(torch.device("cuda", 1)) == "cuda1"
    # torch cannot even name "npu" without torch_npu installed; the label only reads .type and .index
    assert device_label(SimpleNamespace(type="npu", index=3)) == "npu3"


@pytest.mark.parametrize("device_id, writes", [(None, True), (1, True), (0, False)])
def test_device_id_skips_a_model_on_another_card(tmp_path, monkeypatch, device_id, writes):
    monkeypatch.setattr(torch_hooks, "_model_device", lambda model: SimpleNamespace(type="npu", index=1))
    model = nn.Sequential(nn.Linear(2, 2))
    with register_hook(model, DumpConfig(dump_path=tmp_path, device_id=device_id)) as handle:
        model(torch.ones(1, 2))
    assert handle.dump_dir.name == f"{os.getpid()}_npu1"
    assert handle.enabled is writes
    assert (tmp_path.exists() and any(tmp_path.iterdir())) is writes  # nothing at all, not even model_tree.json


@pytest.mark.parametrize("kwargs", [dict(tensor_part=3), dict(token_range=(-1,)), dict(token_range=("0",)),
                                    dict(module_list=(3,)), dict(device_id="0")])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        DumpConfig(**kwargs)


def test_config_accepts_single_values_and_ranges():
    config = DumpConfig(token_range=3, module_list="Linear")
    assert config.token_range == (3,) and config.module_list == ("Linear",)
    assert DumpConfig(token_range=range(2, 4)).token_range == (2, 3)


# -- structured values -------------------------------------------------------------------------------------------

class _Structured(nn.Module):
    def forward(self, x, scale, *, mask=None, flag=True, extra=None):
        return x * scale, (x + 1, {"a": x + 2, "b": None}), None, "text"


def test_nested_outputs_and_keyword_inputs_get_stable_names(tmp_path):
    model = _Structured()
    with register_hook(model, DumpConfig(dump_path=tmp_path)) as handle:
        model(torch.ones(2), torch.tensor(3.0), mask=torch.zeros(2), extra=[torch.ones(1), None])
    folder = handle.dump_dir / "0/root"
    assert sorted(p.name for p in folder.glob("*.pth")) == [
        "input_0.pth", "input_1.pth", "input_extra_0.pth", "input_mask.pth",
        "output_0.pth", "output_1_0.pth", "output_1_1_a.pth"]
    assert torch.equal(_load(folder / "output_1_1_a.pth"), torch.full((2,), 3.0))
    skipped = json.loads((folder / "skipped.json").read_text())
    assert skipped["skipped"] == {"input_extra_1": "None", "output_1_1_b": "None", "output_2": "None",
                                  "output_3": "str"}


def test_hf_cache_objects_are_listed_as_skipped(llama_run):
    skipped = json.loads((llama_run.dump_dir / "0/root.model.layers.0/skipped.json").read_text())
    assert skipped["module"] == "root.model.layers.0" and skipped["token"] == 0
    assert any("Cache" in reason for reason in skipped["skipped"].values())


def test_a_module_called_twice_in_a_token_keeps_the_first_call_and_says_so(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.act(x) + 1)

    model = Twice()
    with register_hook(model, DumpConfig(dump_path=tmp_path)) as handle:
        model(torch.zeros(2))
    folder = handle.dump_dir / "0/root.act"
    assert torch.equal(_load(folder / "output.pth"), torch.zeros(2))
    assert json.loads((folder / "skipped.json").read_text())["calls"] == 2


# -- Bloom -------------------------------------------------------------------------------------------------------

def test_bloom_generate_dump(tmp_path):
    model = tiny_bloom()
    recorder = _Recorder(model)
    with register_hook(model, DumpConfig(dump_path=tmp_path, token_range=(0, 1))) as handle:
        model.generate(input_ids(), max_new_tokens=2)
    recorder.remove()
    assert sorted(p.name for p in handle.dump_dir.iterdir()) == ["0", "1", "model_tree.json"]
    tree = json.loads((handle.dump_dir / "model_tree.json").read_text())
    assert tree["type"] == "BloomForCausalLM"
    for name in ("root.transformer.h.0.self_attention.query_key_value", "root.transformer.h.1.mlp",
                 "root.transformer.ln_f"):
        assert torch.equal(_load(handle.dump_dir / "1" / name / "output.pth"), recorder.outputs[(1, name)])
