"""How the default regression margins were found (docs/baselines.md): measure them on this example.

Dumps the golden and the port (healthy, and each of port.DRIFTS) into a temporary directory, compares each port
with the golden, and prints, per drift, how far each op's added relative euclidean distance moved from the healthy
port's, against the margin the defaults allow there. A margin is right when the sub-rounding drift stays below it
everywhere (largest ratio < 1) and the 0.5 % scale drift exceeds it at the op it changed (ratio > 1).

    python examples/llama_port/calibrate_baseline.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    from pytest_ait_llm.api import run_compare
    from pytest_ait_llm.compare.regression import added_metrics, baseline_from_result, default_margins
    from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook

    import port  # this script's folder is sys.path[0]

    golden_module = port.load_golden_module()
    red = "relative_euclidean_distance"
    with tempfile.TemporaryDirectory() as tmp:
        model, input_ids = golden_module.build_golden()
        with register_hook(model, DumpConfig(dump_path=Path(tmp, "golden"), token_range=[0, 1])) as handle, \
                torch.no_grad():
            model.generate(input_ids, **golden_module.GENERATE_KWARGS)
        results = {}
        for variant in (None, *port.DRIFTS):
            writer = AtbDumpWriter(Path(tmp, variant or "healthy"), model_name=port.MODEL_NAME, token_range=[(0, 1)])
            p, ids, max_new = port.build_port(bug=variant, recorder=writer)
            writer.write_topology(p.topology)
            p.generate(ids, max_new)
            results[variant] = run_compare(handle.dump_dir, writer.root, mapping_dir=HERE, write_csv=False)
        accepted = {op.key: op for op in baseline_from_result(results[None]).ops}
        for variant, drift in port.DRIFTS.items():
            result = results[variant]
            ratios = []
            for row in result.compared:
                was = accepted.get((row.token_id, row.rank.split("_", 1)[0], row.atb_op, row.torch_module))
                if was is None or red not in was.added:
                    continue
                margin = default_margins("bfloat16")[red]
                moved = added_metrics(row)[red] - was.added[red]
                ratios.append((moved / margin.allowed(was.added[red]), moved, was.added[red], row))
            ratios.sort(key=lambda t: -t[0])
            at_op = [t for t in ratios if t[3].atb_op == drift.rel_dir]
            print(f"{variant}: {drift.description}")
            print(f"  tolerance breaches: {len(result.breaches)}")
            for ratio, moved, was, row in ratios[:3]:
                print(f"  largest moves: {ratio:5.2f} x allowed  (added RED {was:.3g} {moved:+.3g})  {row.where}")
            for ratio, moved, was, row in at_op:
                print(f"  at the op:     {ratio:5.2f} x allowed  (added RED {was:.3g} {moved:+.3g})  {row.where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
