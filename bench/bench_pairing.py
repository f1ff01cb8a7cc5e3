"""How long pairing takes on the inputs that used to take minutes (issue 18, item 3). A script a person reruns:

    .venv/bin/python bench/bench_pairing.py            # both cases, best of 3
    .venv/bin/python bench/bench_pairing.py --repeat 1

1. *Unequal Linear counts*: one layer with N extra Linear ops against N + 1 extra Linear modules (an MoE router
   has no ATB counterpart, so the counts differ and the alignment must run), N = 100, 200, 400; the 400 case's
   topology is ~60 KB of JSON. Every candidate pair is asked of a shape callback, as the engine asks.
2. *A huge mapping file*: 200k rules (~9 MB of JSON) merged over the built-ins, loaded and used to pair the
   400-extra-Linear layer: the time of rule matching must not grow with rules x ops.

Prints one line per case: its size and the seconds of the timed call (the best of ``--repeat`` runs). The inputs
are built by :func:`linear_layer` and :func:`huge_mapping_file`, which tests/test_mapping.py also uses to check
that the pairing of these inputs is right.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_ait_llm.formats.atb_topology import parse_topology  # noqa: E402
from pytest_ait_llm.formats.torch_layout import parse_model_tree  # noqa: E402
from pytest_ait_llm.mapping.pairing import pair_ops  # noqa: E402
from pytest_ait_llm.mapping.rules import mapping_table  # noqa: E402

HIDDEN, EXPERTS = 64, 8


def linear_layer(n_extra: int):
    """(topology JSON text, model tree, compatible): one layer of ``n_extra`` expert Linears on the ATB side, and
    of a router plus ``n_extra`` expert Linears on the torch side.

    The router's output is [seq, EXPERTS], every expert's [seq, HIDDEN]: only the shapes tell the router apart, so
    expert k pairs with ATB Linear k and the router stays unpaired.
    """
    ops = [{"opName": f"LinearOperation_1_{i}", "opType": "LinearOperation", "param": {"hasBias": True},
            "inTensors": [f"M_internal_{i}", f"M_weight_{i}"], "outTensors": [f"M_internal_{i + 1}"]}
           for i in range(n_extra)]
    layer = {"opName": "MoeLayer_1", "opType": "MoeLayer", "param": "", "inTensors": ["M_internal_0"],
             "outTensors": [f"M_internal_{n_extra}"], "nodes": ops}
    topology_json = json.dumps({"modelName": "M", "nodes": [layer]})
    modules = [{"name": "root.layers.0.router", "type": "Linear", "exec_order": 2}]
    # named expert{k}_proj, not experts.{k}: a numbered list of 400 would be taken for the decoder layers
    modules += [{"name": f"root.layers.0.expert{i}_proj", "type": "Linear", "exec_order": 3 + i}
                for i in range(n_extra)]
    tree = parse_model_tree({"name": "root", "type": "MoeModel", "exec_order": 0, "children": [
        {"name": "root.layers", "type": "ModuleList", "exec_order": -1, "children": [
            {"name": "root.layers.0", "type": "MoeDecoderLayer", "exec_order": 1, "children": modules}]}]})

    def compatible(pair):
        if pair.rule == "layer":
            return True
        return not pair.module.name.endswith(".router")  # [seq, EXPERTS] fits no ATB Linear's [seq, HIDDEN]

    return topology_json, tree, compatible


def huge_mapping_file(folder: Path, n_rules: int = 200_000) -> Path:
    """An ``op_mapping_file.json`` of ``n_rules`` rules for op types no model has, plus one that the
    400-Linear layer uses (its layer graph to its decoder layer)."""
    rules = {f"CustomFusedOp{i}Operation": f"CustomFusedModule{i}" for i in range(n_rules - 1)}
    rules["MoeLayer_outtensor0"] = "MoeDecoderLayer_output"
    path = folder / "op_mapping_file.json"
    path.write_text(json.dumps(rules))
    return path


def _yardstick() -> None:
    """A fixed amount of plain Python work, to tell a slow machine from a slow pairing."""
    seen: dict[str, list[int]] = {}
    for i in range(200_000):
        seen.setdefault(str(i), []).append(i)


def _best(repeat: int, call) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    yardstick = _best(args.repeat, _yardstick)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; yardstick (a plain Python loop of 200k "
          f"dict inserts) {yardstick:.3f} s: each time below is also given in yardsticks")
    table = mapping_table()
    for n in (100, 200, 400):
        text, tree, compatible = linear_layer(n)
        topology = parse_topology(json.loads(text))
        seconds = _best(args.repeat, lambda: pair_ops(topology, tree, table, compatible))
        print(f"unequal Linear counts: {n} ATB vs {n + 1} torch extra Linears ({len(text) / 1000:.0f} KB JSON): "
              f"pairing {seconds:.3f} s ({seconds / yardstick:.1f} yardsticks)")
    with tempfile.TemporaryDirectory() as tmp:
        path = huge_mapping_file(Path(tmp))
        size = path.stat().st_size
        text, tree, compatible = linear_layer(400)
        topology = parse_topology(json.loads(text))
        load = _best(args.repeat, lambda: mapping_table(tmp))
        big = mapping_table(tmp)
        pairing = _best(args.repeat, lambda: pair_ops(topology, tree, big, compatible))
        print(f"mapping file of {len(big.rules) - len(table.rules)} rules ({size / 1e6:.1f} MB): load {load:.3f} s, "
              f"pairing the 400-extra-Linear layer {pairing:.3f} s, total {load + pairing:.3f} s "
              f"({(load + pairing) / yardstick:.1f} yardsticks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
