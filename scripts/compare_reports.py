"""Do two versions of the engine write the same reports? Runs both on the same dumps and compares their CSVs.

    .venv/bin/python scripts/compare_reports.py [--base 96562f3] [--scratch DIR] [--base-env AIT_LLM_KERNEL=numpy]

The base commit is checked out in a temporary git worktree (its compiled pass built there) and imported through
PYTHONPATH in a child process; this checkout is the other side. Dumps: the example port (examples/llama_port,
healthy and every PORT_BUG), and the test suite's Llama and Bloom mirrors (healthy and faulty). Two reports agree
when they hold the same rows (by token, rank, ATB op, torch module, data id), the same verdict columns, and every
metric equal to 1e-12 relative. Exit 0 when every case agrees.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "llama_port"
KEY = ("token_id", "rank", "atb_op", "torch_module", "data_id", "status")
VERDICT = ("passed", "first_divergence", "propagated", "breached_limits", "cmp_fail_reason", "mapping_rule",
           "golden_dtype", "golden_shape", "my_dtype", "my_shape", "golden_data_path", "my_data_path", "note")
NUMBERS = ("golden_max_value", "golden_min_value", "golden_mean_value", "my_max_value", "my_min_value",
           "my_mean_value", "cosine_similarity", "max_relative_error", "mean_relative_error", "max_absolute_error",
           "mean_absolute_error", "kl_divergence", "relative_euclidean_distance", "input_cosine_similarity",
           "input_relative_euclidean_distance", "effective_cosine_similarity",
           "effective_relative_euclidean_distance")

RUN = """
import sys
from pytest_ait_llm.api import run_compare
golden, my, out, mapping = sys.argv[1:5]
result = run_compare(golden, my, output_dir=out, mapping_dir=mapping or None)
print(result.csv_path)
"""


def _dumps(scratch: Path) -> list[tuple[str, Path, Path, str]]:
    """(case name, golden dump, ATB dump, mapping dir) of every case, written under ``scratch``."""
    sys.path[:0] = [str(REPO / "tests"), str(EXAMPLE)]
    import torch

    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook

    cases = []
    import model as example_model  # examples/llama_port/model.py

    golden_model, ids = example_model.build_golden()
    with register_hook(golden_model, DumpConfig(dump_path=scratch / "example_golden", token_range=(0, 1))) as h, \
            torch.no_grad():
        golden_model.generate(ids, **example_model.GENERATE_KWARGS)
    for bug in ("", "rmsnorm_eps", "transposed_weight", "scale", "rope_scaling"):
        out = scratch / f"example_port_{bug or 'healthy'}"
        env = dict(os.environ, ATB_SAVE_TENSOR="1", ATB_OUTPUT_DIR=str(out) + "/", ATB_SAVE_TENSOR_RANGE="0,1",
                   PORT_BUG=bug, PYTHON=sys.executable, PYTHONPATH=str(REPO))
        subprocess.run(["bash", str(EXAMPLE / "run.sh")], env=env, check=True, capture_output=True)
        cases.append((f"example {bug or 'healthy'}", h.dump_dir, out, str(EXAMPLE)))

    import atb_mirror
    import bloom_mirror
    from hf_models import input_ids, tiny_bloom

    golden = atb_mirror.golden_llama_dump(scratch / "llama_golden", num_layers=12)
    for name, faults in (("healthy", None), ("scaled norm", {"root.model.layers.5.post_attention_layernorm": 1.05}),
                         ("scaled o_proj input", {"root.model.layers.2.self_attn.o_proj:input_0": 1.3})):
        root, _ = atb_mirror.write_mirror(golden, scratch / f"llama_{name.replace(' ', '_')}", num_layers=12,
                                          faults=faults)
        cases.append((f"llama mirror {name}", golden.root, root, ""))
    from pytest_ait_llm.formats.torch_layout import open_torch_dump

    bloom = tiny_bloom(num_layers=2, hidden=64)
    with register_hook(bloom, DumpConfig(dump_path=scratch / "bloom_golden", token_range=(0,))) as h, \
            torch.no_grad():
        bloom(input_ids(seq=8))
    bloom_golden = open_torch_dump(h.dump_dir)
    for name, faults in (("healthy", None), ("scaled dense_4h_to_h", {"root.transformer.h.1.mlp.dense_4h_to_h": 1.05})):
        root, _ = bloom_mirror.write_mirror(bloom_golden, bloom, scratch / f"bloom_{name.replace(' ', '_')}",
                                            faults=faults)
        cases.append((f"bloom mirror {name}", bloom_golden.root, root, ""))
    return cases


def _report(pythonpath: Path, golden: Path, my: Path, mapping: str, out: Path, env_extra: dict) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(pythonpath), **env_extra)
    proc = subprocess.run([sys.executable, "-c", RUN, str(golden), str(my), str(out), mapping], env=env,
                          capture_output=True, text=True, check=True)
    with open(proc.stdout.strip().splitlines()[-1], newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _close(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) and math.isnan(y):
        return True
    return abs(x - y) <= 1e-12 * max(abs(x), abs(y))


def differences(old: list[dict], new: list[dict]) -> list[str]:
    """What differs between two reports' rows, one line each (empty: the same report)."""
    by_key_old = {tuple(r[k] for k in KEY): r for r in old}
    by_key_new = {tuple(r[k] for k in KEY): r for r in new}
    out = [f"only in base: {k}" for k in by_key_old.keys() - by_key_new.keys()]
    out += [f"only in new: {k}" for k in by_key_new.keys() - by_key_old.keys()]
    for key in by_key_old.keys() & by_key_new.keys():
        a, b = by_key_old[key], by_key_new[key]
        out += [f"{key} {c}: {a[c]!r} != {b[c]!r}" for c in VERDICT if a.get(c) != b.get(c)]
        out += [f"{key} {c}: {a[c]} != {b[c]}" for c in NUMBERS if not _close(a.get(c, ""), b.get(c, ""))]
    return out


def _max_rel(old: list[dict], new: list[dict]) -> float:
    by_key = {tuple(r[k] for k in KEY): r for r in new}
    worst = 0.0
    for a in old:
        b = by_key.get(tuple(a[k] for k in KEY))
        for c in NUMBERS if b else ():
            try:
                x, y = float(a[c]), float(b[c])
            except ValueError:
                continue
            if x != y and not (math.isnan(x) and math.isnan(y)):
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="96562f3")
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--base-env", action="append", default=[], help="NAME=VALUE for the base side only")
    args = ap.parse_args(argv)
    base_env = dict(item.split("=", 1) for item in args.base_env)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
        try:
            subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=base, check=True,
                           capture_output=True)
            failed = 0
            for name, golden, my, mapping in _dumps(tmp / "dumps"):
                slug = name.replace(" ", "_")
                old = _report(base, golden, my, mapping, tmp / "out" / f"base_{slug}", base_env)
                new = _report(REPO, golden, my, mapping, tmp / "out" / f"new_{slug}", {})
                diff = differences(old, new)
                breaches = sum(r["passed"] == "False" for r in new)
                print(f"{name:32s} rows {len(old):4d}/{len(new):4d}  breaches {breaches:3d}  "
                      f"max metric rel diff {_max_rel(old, new):.1e}  {'SAME' if not diff else 'DIFFERENT'}")
                for line in diff[:10]:
                    print("    " + line)
                failed += bool(diff)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    print("all reports agree" if not failed else f"{failed} case(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
