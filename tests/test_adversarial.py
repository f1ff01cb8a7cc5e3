"""Dumps from crashed runs, full disks, other CANN versions and other people, through ``run_compare``.

A real torch dump of a tiny Llama is the golden side, its bf16 ATB-layout mirror the "my" side. One copy of the
pair gets a fault in each of many ops of token 1 (a broken file, a lying header, NaNs, a refused pickle, a link out
of the dump, ...). One comparison then has to give every faulty op a row that fails with a clear, one-line reason,
while every other op is still compared and passes. Faults that concern a whole dump (mixed layouts, a missing
token, an extra rank, ...) each get their own copy.
"""
from __future__ import annotations

import builtins
import csv
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from atb_mirror import golden_llama_dump, write_mirror
from pytest_ait_llm.api import run_compare
from pytest_ait_llm.errors import AitLlmError, FormatError, LayoutError
from pytest_ait_llm.formats.atb_bin import read_bin, write_bin
from pytest_ait_llm.formats.safe_io import ALLOW_SYMLINKS_ENV
from pytest_ait_llm.formats.torch_layout import open_torch_dump
from pytest_ait_llm.mapping.pairing import SAME_QUANTITY

LAYERS = 3
RANK = "0_4242"  # the mirror's {device}_{pid}


@pytest.fixture(autouse=True)
def no_symlink_opt_in(monkeypatch):
    """The refusal must not depend on the environment the suite happens to run in."""
    monkeypatch.delenv(ALLOW_SYMLINKS_ENV, raising=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(golden {PID}_{device} dir, ATB dump root) of a healthy pair; tests work on copies."""
    golden = golden_llama_dump(tmp_path_factory.mktemp("golden"), num_layers=LAYERS)
    root, _ = write_mirror(golden, tmp_path_factory.mktemp("my"), num_layers=LAYERS)
    return golden.root, root


def copy_pair(sources, dest: Path) -> tuple[Path, Path]:
    golden, my = sources
    golden_copy = dest / "golden" / golden.name
    my_copy = dest / "my" / my.name
    shutil.copytree(golden, golden_copy, symlinks=True)
    shutil.copytree(my, my_copy, symlinks=True)
    return golden_copy, my_copy


def atb_out(my_root: Path, rel: str, token: int = 1) -> Path:
    return my_root / "tensors" / RANK / str(token) / rel / "after" / "outtensor0.bin"


def torch_out(golden_root: Path, module: str, token: int = 1) -> Path:
    return golden_root / str(token) / module / "output.pth"


def set_header(path: Path, **values: str) -> None:
    """Rewrite header lines of a .bin in place, keeping the payload (``Object_Length`` for ``$Object.Length``)."""
    head, sep, payload = path.read_bytes().partition(b"$End=1\n")
    keys = {k.replace("Object_", "$Object."): v for k, v in values.items()}
    lines = []
    for line in head.decode().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={keys[key]}" if key in keys else line)
    path.write_bytes(("\n".join(lines) + "\n").encode() + sep + payload)


class RunsCode:
    """Unpickling this calls open(marker, "w"): proof that the loader executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------------ the fault table

def _zero_bytes(p: Path, _):
    p.write_bytes(b"")


def _cut_in_header(p: Path, _):
    p.write_bytes(p.read_bytes()[:20])


def _short_payload(p: Path, _):
    p.write_bytes(p.read_bytes()[:-3])


def _long_payload(p: Path, _):
    p.write_bytes(p.read_bytes() + b"extra")


def _terabyte_dims(p: Path, _):
    # 10^12 bf16 elements, with consistent length fields: only the file size gives the lie away
    set_header(p, dims="1000000,1000000", Object_Length="2000000000000", **{"Object_data": "0,2000000000000"})


def _unknown_dtype(p: Path, _):
    set_header(p, dtype="99")


def _complex_dtype(p: Path, _):
    set_header(p, dtype="16")


def _nan_inf(p: Path, _):
    values = read_bin(p).to_float64().astype(np.float32)
    values.flat[0], values.flat[1] = np.nan, np.inf
    write_bin(p, values, dtype="bfloat16")


def _all_zero(p: Path, _):
    write_bin(p, np.zeros(read_bin(p).shape, np.float32), dtype="bfloat16")


def _empty(p: Path, _):
    write_bin(p, np.zeros((0,), np.float32), dtype="bfloat16")


def _int8(p: Path, _):
    values = read_bin(p).to_float64()
    write_bin(p, np.clip(np.round(values * 16), -128, 127).astype(np.int8))


def _stats_only(p: Path, _):
    p.write_bytes(b"format=2\ndtype=27\ndims=1,1,64\nmax=1.0\nmin=-1.0\nmean=0.0\nl2norm=3.0\n$End=1\n")


def _fifo(p: Path, _):
    p.unlink()
    os.mkfifo(p)  # reading it would block forever


def _directory(p: Path, _):
    p.unlink()
    p.mkdir()


def _link_out_of_the_dump(p: Path, scratch: Path):
    outside = scratch / "elsewhere" / "secret.bin"
    outside.parent.mkdir(exist_ok=True)
    shutil.copyfile(p, outside)  # a perfectly valid tensor: only where it lives is wrong
    p.unlink()
    p.symlink_to(outside)


def _folder_missing(p: Path, _):
    shutil.rmtree(p.parent.parent)


def _golden_runs_code_zip(p: Path, scratch: Path):
    torch.save(RunsCode(scratch / "pwned_zip"), p)


def _golden_runs_code_pickle(p: Path, scratch: Path):
    with open(p, "wb") as fh:
        pickle.dump(RunsCode(scratch / "pwned_pickle"), fh)


def _golden_nan(p: Path, _):
    t = torch.load(p, weights_only=True)
    t.view(-1)[3] = float("nan")
    torch.save(t, p)


def _golden_zero_bytes(p: Path, _):
    p.write_bytes(b"")


def _golden_link_out_of_the_dump(p: Path, scratch: Path):
    outside = scratch / "elsewhere" / "golden_output.pth"
    outside.parent.mkdir(exist_ok=True)
    shutil.copyfile(p, outside)
    p.unlink()
    p.symlink_to(outside)


def _both_empty(pair: tuple[Path, Path], _):
    golden, my = pair
    torch.save(torch.zeros(0), golden)
    write_bin(my, np.zeros((0,), np.float32), dtype="bfloat16")


L1, L2, L3 = "1_LlamaLayer", "2_LlamaLayer", "3_LlamaLayer"
# (id, side, ATB op of token 1, how to break it, fragment of the row's reason)
FAULTS = [
    ("zero-byte .bin", "my", f"{L1}/0_RmsNormOperation", _zero_bytes, "empty file (0 bytes)"),
    ("cut inside the header", "my", f"{L1}/1_LinearOperation", _cut_in_header, "no '$End=1' header line"),
    ("payload shorter than the header says", "my", f"{L1}/2_LinearOperation", _short_payload, "truncated payload"),
    ("payload longer than the header says", "my", f"{L1}/3_LinearOperation", _long_payload, "5 extra bytes"),
    ("dims of 10^12 elements", "my", f"{L1}/5_LinearOperation", _terabyte_dims, "needs 2000000000000 bytes"),
    ("unknown dtype code", "my", f"{L1}/7_RmsNormOperation", _unknown_dtype, "unknown aclDataType code dtype=99"),
    ("complex dtype code", "my", f"{L1}/8_MlpGateLayerV2/0_LinearOperation", _complex_dtype,
     "dtype=16 (complex64) is not a supported"),
    ("NaN and inf", "my", f"{L1}/8_MlpGateLayerV2/1_LinearOperation", _nan_inf, "my_data includes NAN or inf."),
    ("empty tensor", "my", f"{L1}/8_MlpGateLayerV2/4_LinearOperation", _empty, "empty tensor (my)"),
    ("int8 against float", "my", f"{L2}/0_RmsNormOperation", _int8, "int8"),
    ("stats-only .bin", "my", f"{L2}/1_LinearOperation", _stats_only, "stats-only .bin"),
    ("FIFO named like a tensor", "my", f"{L2}/2_LinearOperation", _fifo, "not a regular file"),
    ("directory named like a tensor", "my", f"{L2}/3_LinearOperation", _directory, "not a regular file"),
    ("symlink out of the dump root", "my", f"{L2}/5_LinearOperation", _link_out_of_the_dump,
     f"outside the dump root"),
    ("op folder missing", "my", f"{L2}/7_RmsNormOperation", _folder_missing, "no output tensor dumped for this ATB op"),
    ("torch.save pickle that runs code", "golden", f"{L2}/8_MlpGateLayerV2/0_LinearOperation",
     _golden_runs_code_zip, "refused by a weights-only torch.load"),
    ("plain pickle that runs code", "golden", f"{L2}/8_MlpGateLayerV2/1_LinearOperation",
     _golden_runs_code_pickle, "refused by a weights-only torch.load"),
    ("NaN in golden", "golden", f"{L2}/8_MlpGateLayerV2/4_LinearOperation", _golden_nan,
     "golden_data includes NAN or inf."),
    ("zero-byte .pth", "golden", f"{L3}/0_RmsNormOperation", _golden_zero_bytes, "not a torch tensor file"),
    ("both sides empty", "both", f"{L3}/1_LinearOperation", _both_empty, "empty tensor (golden, my)"),
    ("golden symlink out of the dump root", "golden", f"{L3}/8_MlpGateLayerV2/1_LinearOperation",
     _golden_link_out_of_the_dump, "outside the dump root"),
]
# all-zero tensors are not an error: they are compared, and judged
ZERO_MY = f"{L3}/2_LinearOperation"  # golden non-zero, mine all zero: a breach of cosine
ZERO_BOTH = f"{L3}/3_LinearOperation"  # both all zero: identical, passes (cosine 1 as in the original)
HEALTHY_TOKEN1 = [f"{L3}/5_LinearOperation", f"{L3}/7_RmsNormOperation", f"{L3}/8_MlpGateLayerV2/0_LinearOperation",
                  "0_GatherOperation", "5_LinearOperation"]


@pytest.fixture(scope="module")
def faulty(sources, tmp_path_factory):
    """One comparison of a pair where token 1 holds every fault of FAULTS at once."""
    scratch = tmp_path_factory.mktemp("faulty")
    with pytest.MonkeyPatch.context() as env:  # module scope: the function-scoped guard has not run yet
        env.delenv(ALLOW_SYMLINKS_ENV, raising=False)
        return _break_and_compare(sources, scratch)


def _break_and_compare(sources, scratch: Path):
    golden_root, my_root = copy_pair(sources, scratch)
    golden = open_torch_dump(golden_root)
    modules = {r.atb_op: r.torch_module
               for r in run_compare(golden, my_root, write_csv=False).compared if r.token_id == 1}
    for _, side, rel, apply, _ in FAULTS:
        if side == "my":
            apply(atb_out(my_root, rel), scratch)
        elif side == "golden":
            apply(torch_out(golden_root, modules[rel]), scratch)
        else:
            apply((torch_out(golden_root, modules[rel]), atb_out(my_root, rel)), scratch)
    _all_zero(atb_out(my_root, ZERO_MY), scratch)
    _all_zero(atb_out(my_root, ZERO_BOTH), scratch)
    zero = torch_out(golden_root, modules[ZERO_BOTH])
    torch.save(torch.zeros_like(torch.load(zero, weights_only=True)), zero)
    # directory loops: a link to its own folder's parent, and a token-level link to the token itself
    (atb_out(my_root, "5_LinearOperation").parent / "loop").symlink_to("..")
    (my_root / "tensors" / RANK / "1" / "99_LoopOperation").symlink_to(".")
    result = run_compare(golden, my_root, output_dir=scratch / "report")
    return result, scratch


def row(result, rel: str, token: int = 1):
    # a container returning its last child's output (LlamaAttention: o_proj's) has a row of its own on that op
    found = [r for r in result.rows if r.token_id == token and r.atb_op == rel and not r.note.startswith(SAME_QUANTITY)]
    assert len(found) == 1, (rel, token, [(r.atb_op, r.status) for r in result.rows if r.atb_op == rel])
    return found[0]


@pytest.mark.parametrize("name, side, rel, apply, fragment", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_fails_its_own_row_with_a_clear_reason(faulty, name, side, rel, apply, fragment):
    result, _ = faulty
    r = row(result, rel)
    assert r.status == "compared" and r.passed is False, (r.status, r.passed, r.reason)
    assert fragment in r.reason, r.reason
    assert "\n" not in r.reason and "Traceback" not in r.reason
    assert r.breached  # counted as a failure of the comparison, never silently passed


def test_every_other_op_is_still_compared_and_passes(faulty, sources, tmp_path):
    result, _ = faulty
    faulted = {f[2] for f in FAULTS} | {ZERO_MY}
    token0 = [r for r in result.compared if r.token_id == 0]
    healthy = run_compare(*copy_pair(sources, tmp_path), write_csv=False)
    # 9 ops a layer, embedding/norm/lm_head, two graph ops a layer, LlamaAttention's row on o_proj's op
    assert len(token0) == len([r for r in healthy.compared if r.token_id == 0]) == 9 * LAYERS + 3 + 2 * LAYERS + LAYERS
    assert all(r.passed for r in token0)
    rest = [r for r in result.compared if r.token_id == 1 and r.atb_op not in faulted]
    assert {r.atb_op for r in rest} >= set(HEALTHY_TOKEN1) | {ZERO_BOTH}
    assert all(r.passed for r in rest), [(r.atb_op, r.reason, r.breaches) for r in rest if not r.passed]
    own = [r for r in result.breaches if not r.note.startswith(SAME_QUANTITY)]
    assert len(own) == len(faulted)
    # a container's row on a faulted op reads the same bad tensor: it breaches too, never passes it
    same = [r for r in result.rows if r.note.startswith(SAME_QUANTITY) and r.atb_op in faulted and r.token_id == 1]
    assert same and all(r.breached for r in same)


def test_all_zero_tensors_are_compared_and_judged(faulty):
    result, _ = faulty
    mine_zero, both_zero = row(result, ZERO_MY), row(result, ZERO_BOTH)
    assert mine_zero.reason == "" and mine_zero.metric("cosine_similarity") == 0.0
    assert any(b.metric == "cosine_similarity" for b in mine_zero.breaches)
    assert both_zero.passed and both_zero.metric("cosine_similarity") == 1.0


def test_no_code_from_a_pickle_ran(faulty):
    _, scratch = faulty
    assert not (scratch / "pwned_zip").exists() and not (scratch / "pwned_pickle").exists()


def test_the_first_divergence_is_the_earliest_fault_and_the_csv_has_every_row(faulty):
    result, _ = faulty
    first = result.first_divergence
    assert (first.token_id, first.atb_op) == (1, FAULTS[0][2])
    with open(result.csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_op = {r["atb_op"]: r for r in rows if r["token_id"] == "1"}
    for name, _, rel, _, fragment in FAULTS:
        assert by_op[rel]["passed"] == "False" and fragment in by_op[rel]["cmp_fail_reason"], name


# ------------------------------------------------------------------------------------------- faults of a whole dump

def test_symlinks_out_of_the_dump_are_followed_only_on_request(sources, tmp_path, monkeypatch):
    golden_root, my_root = copy_pair(sources, tmp_path)
    rel = f"{L1}/0_RmsNormOperation"
    _link_out_of_the_dump(atb_out(my_root, rel), tmp_path)
    refused = row(run_compare(golden_root, my_root, write_csv=False), rel)
    assert not refused.passed and ALLOW_SYMLINKS_ENV in refused.reason
    monkeypatch.setenv(ALLOW_SYMLINKS_ENV, "1")
    allowed = row(run_compare(golden_root, my_root, write_csv=False), rel)
    assert allowed.passed and allowed.reason == ""


def test_the_symlink_opt_in_is_also_a_reader_argument(sources, tmp_path):
    golden_root, my_root = copy_pair(sources, tmp_path)
    link = atb_out(my_root, f"{L1}/0_RmsNormOperation")
    _link_out_of_the_dump(link, tmp_path)
    with pytest.raises(FormatError, match="outside the dump root"):
        read_bin(link)
    assert read_bin(link, allow_symlinks=True).shape == (1, 1, 64)  # token 1: one decode position
    from pytest_ait_llm.formats.atb_layout import open_atb_dump

    assert open_atb_dump(my_root, allow_symlinks=True).allow_symlinks is True


def test_symlinks_inside_the_dump_are_fine(sources, tmp_path):
    """msit's ATB_SAVE_SYMLINK links a tensor to an equal one elsewhere in the same dump."""
    golden_root, my_root = copy_pair(sources, tmp_path)
    rel = f"{L1}/0_RmsNormOperation"
    target = atb_out(my_root, rel)
    keep = my_root / "tensors" / RANK / "shared.bin"
    target.rename(keep)
    target.symlink_to(os.path.relpath(keep, target.parent))
    linked = row(run_compare(golden_root, my_root, write_csv=False), rel)
    assert linked.passed and linked.reason == ""


@pytest.mark.parametrize("which", ["ATB topology", "model_tree.json"])
def test_a_dump_description_linked_from_outside_is_a_clear_error(sources, tmp_path, monkeypatch, which):
    golden_root, my_root = copy_pair(sources, tmp_path)
    target = (next((my_root / "model" / "4242").glob("*.json")) if which == "ATB topology"
              else golden_root / "model_tree.json")
    outside = tmp_path / "outside.json"
    shutil.copyfile(target, outside)
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(FormatError, match="outside the dump root") as info:
        run_compare(golden_root, my_root, write_csv=False)
    assert str(target) in str(info.value)
    monkeypatch.setenv(ALLOW_SYMLINKS_ENV, "1")
    assert run_compare(golden_root, my_root, write_csv=False).passed


def test_ait_and_msit_roots_side_by_side_are_ambiguous_not_guessed(sources, tmp_path):
    golden_root, my_root = copy_pair(sources, tmp_path)
    shutil.copytree(my_root, my_root.parent / "msit_dump_20240101_120000", symlinks=True)
    with pytest.raises(LayoutError, match="holds 2 ATB dump roots") as info:
        run_compare(golden_root, my_root.parent, write_csv=False)
    assert "ait_dump" in str(info.value) and "msit_dump_20240101_120000" in str(info.value)
    assert run_compare(golden_root, my_root.parent / "msit_dump_20240101_120000", write_csv=False).passed


def test_two_torch_dumps_in_one_folder_are_ambiguous(sources, tmp_path):
    golden_root, my_root = copy_pair(sources, tmp_path)
    shutil.copytree(golden_root, golden_root.parent / "99999_cpu")
    with pytest.raises(LayoutError, match="holds 2 torch dumps"):
        run_compare(golden_root.parent, my_root, write_csv=False)


def test_swapped_sides_compare_with_the_golden_columns_describing_the_first(sources, tmp_path):
    """Either kind on either side (docs/comparing_two_ports.md): the ATB dump first is side A."""
    golden_root, my_root = copy_pair(sources, tmp_path)
    result = run_compare(my_root, golden_root, write_csv=False)
    assert result.compared and all(r.golden_path.endswith(".bin") and r.my_path.endswith(".pth")
                                   for r in result.compared)


@pytest.mark.parametrize("side", ["ATB", "torch"])
def test_a_token_missing_on_one_side_is_reported_and_the_rest_compared(sources, tmp_path, side):
    golden_root, my_root = copy_pair(sources, tmp_path)
    shutil.rmtree(my_root / "tensors" / RANK / "1" if side == "ATB" else golden_root / "1")
    result = run_compare(golden_root, my_root, write_csv=False)
    other = "torch" if side == "ATB" else "ATB"
    missing = [r for r in result.rows if r.token_id == 1]
    assert [(r.status, r.reason) for r in missing] == [("unpaired", f"token 1 dumped only on the {other} side")]
    assert result.compared and all(r.token_id == 0 and r.passed for r in result.compared)


def test_an_extra_rank_is_compared_as_its_own_rank(sources, tmp_path):
    golden_root, my_root = copy_pair(sources, tmp_path)
    shutil.copytree(my_root / "tensors" / RANK, my_root / "tensors" / "1_5555")
    shutil.copytree(my_root / "model" / "4242", my_root / "model" / "5555")
    result = run_compare(golden_root, my_root, write_csv=False)
    per_rank = {rank: len([r for r in result.compared if r.rank == rank]) for rank in (RANK, "1_5555")}
    assert per_rank[RANK] == per_rank["1_5555"] > 0 and result.passed


def test_a_leftover_rank_without_topology_is_named(sources, tmp_path):
    """A process that died before writing its topology leaves ``tensors/{d}_{pid}/`` and nothing else.

    Acceptable outcomes: a clear error naming that rank, or the good rank compared plus a row naming the bad one.
    """
    golden_root, my_root = copy_pair(sources, tmp_path)
    (my_root / "tensors" / "1_5555" / "0").mkdir(parents=True)
    try:
        result = run_compare(golden_root, my_root, write_csv=False)
    except AitLlmError as exc:
        assert "1_5555" in str(exc) and "no topology found" in str(exc) and "\n" not in str(exc)
    else:
        assert [r for r in result.compared if r.rank == RANK]
        assert any(r.rank == "1_5555" and r.status != "compared" and "topology" in r.reason for r in result.rows)


def test_unreadable_files_fail_their_row(sources, tmp_path):
    golden_root, my_root = copy_pair(sources, tmp_path)
    rel = f"{L1}/0_RmsNormOperation"
    path = atb_out(my_root, rel)
    path.chmod(0)
    try:
        with open(path, "rb"):
            readable = True
    except PermissionError:
        readable = False
    if readable:
        path.chmod(0o644)
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): permission bits do not stop reads here")
    try:
        r = row(run_compare(golden_root, my_root, write_csv=False), rel)
        assert not r.passed and "Permission denied" in r.reason
    finally:
        path.chmod(0o644)


def test_a_sparse_file_whose_size_lies_is_refused_before_allocating(sources, tmp_path):
    """A 3 GiB sparse .bin (nothing on disk) whose header matches its size: refused by the 2 GiB limit."""
    golden_root, my_root = copy_pair(sources, tmp_path)
    rel = f"{L1}/0_RmsNormOperation"
    path = atb_out(my_root, rel)
    elements = 3 * 1024**3 // 2
    header = f"$Version=1.0\n$Object.Count=1\nformat=2\ndtype=27\ndims={elements}\n$End=1\n".encode()
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + elements * 2)
    before = _rss()
    r = row(run_compare(golden_root, my_root, write_csv=False), rel)
    assert not r.passed and "exceeds the limit of 2147483648 bytes" in r.reason and "--max-bin-bytes" in r.reason
    assert _rss() - before < 200 * 1024**2


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
