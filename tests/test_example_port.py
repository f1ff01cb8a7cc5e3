"""The embedded example's CPU "ATB port" (examples/llama_port): what `make demo` relies on.

The port must write a dump the ATB readers open like a real one, honour the ATB_* dump variables, agree with the
float32 golden to bf16 precision when healthy, and, for each injected bug, change exactly the op the bug is in
first. Its topology must be a real dataflow graph, since the compare engine reads tensor names to pair ops.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llama_example import EXAMPLE, golden, port
from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
from pytest_ait_llm.formats.atb_bin import read_bin
from pytest_ait_llm.formats.atb_layout import op_files, open_atb_dump
from pytest_ait_llm.formats.atb_topology import parse_topology



NUM_LAYERS = golden.CONFIG["num_hidden_layers"]
HIDDEN = golden.CONFIG["hidden_size"]


class MemoryRecorder:
    """Stands in for AtbDumpWriter: keeps every saved op's tensors in memory, in save order."""

    def __init__(self):
        self.saved: dict[tuple[int, str], tuple[list, list]] = {}

    def wants_token(self, token_id: int) -> bool:
        return True

    def save_tensors(self, token_id, rel_dir, inputs, outputs):
        self.saved[(token_id, rel_dir)] = ([t.clone() for t in inputs], [t.clone() for t in outputs])


@pytest.fixture(scope="module")
def golden_model():
    return golden.build_golden()


def _run_port(golden_model, bug=None, recorder=None):
    model, input_ids = golden_model
    p = port.LlamaPort(model.state_dict(), dict(golden.CONFIG), bug=bug, recorder=recorder)
    return p, p.generate(input_ids, golden.GENERATE_KWARGS["max_new_tokens"])


def _run_port_on(golden_model, next_token: int, bug=None, recorder=None):
    """Prefill, then decode ``next_token`` whatever the port predicted (both runs then see the same inputs)."""
    model, input_ids = golden_model
    p = port.LlamaPort(model.state_dict(), dict(golden.CONFIG), bug=bug, recorder=recorder)
    p.forward(input_ids)
    p.forward(torch.tensor([[next_token]]))


@pytest.fixture(scope="module")
def healthy_record(golden_model):
    recorder = MemoryRecorder()
    _, tokens = _run_port(golden_model, recorder=recorder)
    return recorder, tokens


@pytest.fixture(scope="module")
def port_dump(tmp_path_factory):
    """run.sh under the ATB dump variables, as --ait-exec runs it: (dump root, stdout)."""
    out = tmp_path_factory.mktemp("port_dump")
    env = {**os.environ, "PYTHON": sys.executable, "ATB_SAVE_TENSOR": "1", "ATB_OUTPUT_DIR": f"{out}/",
           "ATB_SAVE_TENSOR_RANGE": "0,1", "ATB_SAVE_TENSOR_TIME": "1", "ATB_SAVE_TENSOR_PART": "2"}
    env.pop("PORT_BUG", None)
    done = subprocess.run(["bash", str(EXAMPLE / "run.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


# ---------------------------------------------------------------------------------------------- the dump itself

def test_run_sh_writes_an_atb_dump_the_readers_open(port_dump, golden_model):
    out, stdout = port_dump
    dump = open_atb_dump(out)
    assert dump.tokens == [0, 1]
    assert len(dump.ranks) == 1
    rank = dump.ranks[0]
    topo = rank.topology()
    assert topo.model_name == port.MODEL_NAME
    rel_dirs = [op.rel_dir for op in topo.walk()]
    assert rel_dirs == [rel for rel, _ in port.op_folders(port.build_topology(golden.CONFIG))]
    assert [op.rel_dir for op in topo.ops] == (["0_GatherOperation"]
                                               + [f"{i}_LlamaLayer" for i in range(1, NUM_LAYERS + 1)]
                                               + [f"{NUM_LAYERS + 1}_RmsNormOperation",
                                                  f"{NUM_LAYERS + 2}_SliceOperation",
                                                  f"{NUM_LAYERS + 3}_LinearOperation"])
    for token, token_dir in rank.token_dirs.items():
        for op in topo.walk():
            files = op_files(token_dir, op)
            assert len(files.inputs) == len(op.in_tensors), (token, op.rel_dir)
            assert len(files.outputs) == len(op.out_tensors), (token, op.rel_dir)
    # The prompt is prefilled at token 0, one position is decoded at token 1.
    layer0 = topo.find("LlamaLayer_1")
    for token, positions in ((0, golden.PROMPT_LENGTH), (1, 1)):
        out_tensor = read_bin(op_files(rank.token_dirs[token], layer0).outputs[0])
        assert out_tensor.dtype == "bfloat16" and out_tensor.shape == (1, positions, HIDDEN)
    # Weights are dumped as the op's inputs, in inTensors order: q_proj's second input is the golden's q weight.
    q_proj = topo.find("LinearOperation_1_1")
    weight = read_bin(op_files(rank.token_dirs[0], q_proj).inputs[1]).to_float64()
    expected = golden_model[0].model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16).double()
    assert torch.equal(torch.from_numpy(weight), expected)
    # The layer graph files exist too (ATB writes them beside the model topology).
    assert (dump.root / "layer" / str(rank.pid) / "LlamaLayer_1.json").is_file()
    assert f"generated token ids: {golden.golden_generate(*golden_model)}" in stdout


def test_token_range_and_part_are_honoured(tmp_path, golden_model):
    env = {"ATB_SAVE_TENSOR": "1", "ATB_OUTPUT_DIR": str(tmp_path), "ATB_SAVE_TENSOR_RANGE": "1,1",
           "ATB_SAVE_TENSOR_PART": "1"}
    writer = AtbDumpWriter.from_env(port.MODEL_NAME, env=env)
    p, _ = _run_port(golden_model, recorder=writer)
    writer.write_topology(p.topology)
    rank_dir = writer.rank_dir
    assert sorted(d.name for d in rank_dir.iterdir()) == ["1"]  # token 0 (prefill) not requested
    names = {f.name for f in (rank_dir / "1").rglob("*.bin")}
    assert names and all(n.startswith("outtensor") for n in names)  # part 1: outputs only


def test_no_dump_without_atb_save_tensor(tmp_path, monkeypatch, capsys):
    for var in [v for v in os.environ if v.startswith("ATB_")] + ["PORT_BUG"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert port.main([]) == 0
    assert "generated token ids:" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ healthy port

def test_healthy_port_matches_the_golden(golden_model):
    model, input_ids = golden_model
    with torch.no_grad():
        out = model.generate(input_ids, **golden.GENERATE_KWARGS, output_logits=True, return_dict_in_generate=True)
    golden_tokens = out.sequences[0, input_ids.shape[1]:].tolist()
    p = port.LlamaPort(model.state_dict(), dict(golden.CONFIG))
    step_ids, port_tokens = input_ids, []
    for step, golden_logits in enumerate(out.logits):
        logits = p.forward(step_ids)[0, -1].float()
        want = golden_logits[0].float()
        assert torch.cosine_similarity(logits, want, dim=0) > 0.9999, step
        assert (logits - want).abs().max() < 0.15, step  # bf16 rounding, accumulated over 12 layers
        port_tokens.append(int(logits.argmax()))
        step_ids = torch.tensor([[golden_tokens[step]]])
    assert port_tokens == golden_tokens == golden.golden_generate(model, input_ids)


def test_mapping_file_names_the_files_the_golden_dump_writes(golden_model, tmp_path):
    """op_mapping_file.json's torch stems must exist: LlamaDecoderLayer, LlamaMLP and SiLU return one tensor."""
    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook
    from pytest_ait_llm.mapping.rules import load_mapping_file

    rules = load_mapping_file(EXAMPLE)
    model, input_ids = golden_model
    with register_hook(model, DumpConfig(dump_path=tmp_path, token_range=(0,))) as handle, torch.no_grad():
        model(input_ids)
    token_dir = handle.dump_dir / "0"
    modules = {"LlamaDecoderLayer": "root.model.layers.0", "LlamaMLP": "root.model.layers.0.mlp",
               "SiLUActivation": "root.model.layers.0.mlp.act_fn"}
    assert {r.torch.type for r in rules} == set(modules)
    for rule in rules:
        assert (token_dir / modules[rule.torch.type] / f"{rule.torch.stem}.pth").is_file(), str(rule.torch)
        assert rule.atb.stem == "outtensor0"


# ----------------------------------------------------------------------------------------------------- the bugs

def _outputs_before(rel_dir: str, ops: list[str]) -> list[str]:
    """Ops that finish before ``rel_dir`` starts: earlier in pre-order, and not one of its enclosing graph ops."""
    earlier = ops[:ops.index(rel_dir)]
    return [r for r in earlier if not rel_dir.startswith(r + "/")]


@pytest.mark.parametrize("bug", sorted(port.BUGS))
def test_bug_changes_its_op_and_nothing_before_it(bug, golden_model, healthy_record):
    healthy, tokens = healthy_record
    buggy = MemoryRecorder()
    _run_port_on(golden_model, tokens[0], bug=bug, recorder=buggy)
    target = port.BUGS[bug].rel_dir
    ops = [rel for rel, _ in port.op_folders(port.build_topology(golden.CONFIG))]
    assert target in ops
    for token in (0, 1):
        for rel in _outputs_before(target, ops):
            for want, got in zip(healthy.saved[(token, rel)][1], buggy.saved[(token, rel)][1]):
                assert torch.equal(want, got), f"{bug}: {rel} changed at token {token}, before {target}"
    want, got = healthy.saved[(0, target)][1][0].float(), buggy.saved[(0, target)][1][0].float()
    relative_change = float((got - want).norm() / want.norm())
    assert relative_change > 0.04, f"{bug}: {target} changed by only {relative_change:.4f}"
    if bug == "scale":
        assert torch.allclose(got, want * port.SCALE_ERROR, rtol=0.01, atol=1e-6)


def test_bug_in_an_op_parameter_shows_in_the_topology():
    healthy = {n["opName"]: n for _, n in port.op_folders(port.build_topology(golden.CONFIG))}
    eps_bug = {n["opName"]: n for _, n in port.op_folders(port.build_topology(golden.CONFIG, "rmsnorm_eps"))}
    name = port.BUGS["rmsnorm_eps"].op_name
    assert healthy[name]["param"]["normParam"]["epsilon"] == golden.CONFIG["rms_norm_eps"]
    assert eps_bug[name]["param"]["normParam"]["epsilon"] == port.WRONG_EPSILON
    transposed = {n["opName"]: n for _, n in port.op_folders(port.build_topology(golden.CONFIG, "transposed_weight"))}
    assert transposed[port.BUGS["transposed_weight"].op_name]["param"]["transposeB"] is False


def test_malformed_dump_variable_is_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("ATB_SAVE_TENSOR", "1")
    monkeypatch.setenv("ATB_SAVE_TENSOR_RANGE", "1,0")
    assert port.main([]) == 2
    err = capsys.readouterr().err
    assert "ATB_SAVE_TENSOR_RANGE" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_bug_is_refused(capsys):
    with pytest.raises(SystemExit):
        port.main(["--bug", "nonsense"])
    assert "nonsense" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the topology

def test_topology_tensor_names_form_a_consistent_dataflow():
    topo_dict = port.build_topology(golden.CONFIG)
    model = port.MODEL_NAME
    is_source = lambda name: name.startswith((f"{model}_weight_", f"{model}_input_"))  # noqa: E731
    produced: set[str] = set()
    weights_used: list[str] = []

    def visit(node: dict, ancestors: tuple[str, ...]) -> None:
        for name in node["inTensors"]:
            assert is_source(name) or name in produced, f"{node['opName']} reads {name} before anything writes it"
            if name.startswith(f"{model}_weight_") and "nodes" not in node:
                weights_used.append(name)
        if "nodes" in node:
            assert node["param"] == ""
            for child in node["nodes"]:
                visit(child, ancestors + (node["opName"],))
            for name in node["internalTensors"]:
                assert name.startswith(node["opName"] + "_internal_"), name
        else:
            assert isinstance(node["param"], dict) and node["param"], node["opName"]
        for name in node["outTensors"]:
            assert not is_source(name), f"{node['opName']} writes a weight or input {name}"
            if "nodes" in node:
                assert name in produced, f"graph {node['opName']} outputs {name} that no child wrote"
            else:
                assert name not in produced, f"{name} written twice"
                produced.add(name)
            owners = (model,) + ancestors  # a model-level tensor, or an internal of an enclosing graph op
            assert any(name.startswith(f"{owner}_internal_") for owner in owners) \
                or name.startswith(f"{model}_output_"), name

    for node in topo_dict["nodes"]:
        visit(node, ())
    assert f"{model}_output_0" in produced
    # Every weight feeds exactly one leaf op; the residual adds take no weight (they are not bias adds).
    assert sorted(weights_used) == sorted({f"{model}_weight_{i}" for i in range(1 + 9 * NUM_LAYERS + 2)})
    topo = parse_topology(topo_dict)
    adds = [op for op in topo.walk() if op.op_type == "ElewiseOperation" and op.param["elewiseType"] == 8]
    assert len(adds) == 2 * NUM_LAYERS
    assert all(not any("_weight_" in t for t in op.in_tensors) for op in adds)
    o_proj = topo.find("LinearOperation_3_6")
    residual = topo.find("ElewiseOperation_3_7")
    assert o_proj.out_tensors[0] in residual.in_tensors and f"{model}_internal_2" in residual.in_tensors
    assert [op.op_type for op in topo.find("LlamaLayer_3").children] == [
        "RmsNormOperation", "LinearOperation", "LinearOperation", "LinearOperation", "RopeOperation",
        "SelfAttentionOperation", "LinearOperation", "ElewiseOperation", "RmsNormOperation", "MlpGateLayerV2",
        "ElewiseOperation"]
