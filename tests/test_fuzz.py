"""Fuzzing the readers of files somebody else wrote: ``.bin`` tensors, topology JSON, ``model_tree.json`` and the
op mapping file.

Every input, random or a mutation of a valid file, must end in a result or in one of our own errors with a
one-line message: no other exception, no hang (an alarm around each reader call), and no allocation the file does not justify
(``tracemalloc`` peaks are bounded by the file's size, whatever sizes the file *claims*).

Deterministic for CI: ``derandomize=True`` and no example database, so every run tries the same inputs.
The number of inputs tried is printed at the end of the module: ``pytest -s tests/test_fuzz.py``.
"""
from __future__ import annotations

import mmap
import json
import os
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hang_guard import guarded
from pytest_ait_llm.errors import AitLlmError, FormatError, MappingError
from pytest_ait_llm.formats.atb_bin import read_bin, read_bin_header, write_bin
from pytest_ait_llm.formats.atb_layout import op_files
from pytest_ait_llm.formats.atb_topology import load_topology
from pytest_ait_llm.formats.dtypes import ACL_DTYPES, BY_NAME
from pytest_ait_llm.formats.torch_layout import TorchDump, load_model_tree
from pytest_ait_llm.mapping.rules import MappingTable, load_mapping_file

SAMPLE = Path(__file__).parent / "data" / "ait-sample"
BLOOM = json.loads((SAMPLE / "Bloom7BFlashAttentionModel.json").read_text())
TREE = json.loads((SAMPLE / "model_tree.json").read_text())

FUZZ = settings(
    max_examples=150,
    deadline=None,  # a wall-clock deadline fails on a busy machine; attempt() guards each reader call instead
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
MORE = settings(FUZZ, max_examples=300)

#: Inputs tried per reader, reported at the end of the module (test state, not package state).
TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_count():
    yield
    total = sum(TRIED.values())
    detail = ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items()))
    print(f"\nfuzz: {total} inputs tried ({detail})", flush=True)


def attempt(target: str | None, expected_error: type[AitLlmError], fn, *args, **kwargs):
    """(result, error, peak) of one input; any exception outside our family fails the test (hypothesis shrinks it).

    ``peak`` is the most memory traced during the call, in bytes: numpy registers its buffers with tracemalloc, so a
    header that makes us allocate what it claims shows up (memory maps do not, which is the point of mapping).
    Tracing covers only the reader call: traced, hypothesis's own input generation ran several times slower.
    ``target`` names the input's kind in the count (None: a second reader of an input already counted).
    """
    if target is not None:
        TRIED[target] += 1
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        result, error = guarded(fn, *args, **kwargs), None
    except AitLlmError as exc:
        result, error = None, exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not tracing:
            tracemalloc.stop()
    if error is not None:
        message = str(error)
        assert isinstance(error, expected_error), f"{type(error).__name__}: {message}"
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    return result, error, max(0, peak - before)


# ====================================================================================================== .bin files

ACL_CODES = sorted(ACL_DTYPES)
ODD_CODES = [5, 13, 16, 17, 29, 30, 33, -1, 99, 2**31, -(2**40)]
ODD_INTS = ["", " ", "1_0", "\u0663", "\u00b2", "0x10", "1e3", "+3", "-0", "1.5", "9" * 5000, "nan", "\x00"]
KEYS = ["$Version", "$Object.Count", "$Object.Length", "format", "dtype", "dims", "$Object.data",
        "max", "min", "mean", "l2norm", "type", "$End", "other"]


def int_text():
    return st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(ODD_INTS))


def dims_text():
    return st.one_of(
        st.lists(st.integers(0, 6), max_size=5).map(lambda ds: ",".join(map(str, ds))),
        st.lists(st.one_of(st.integers(-3, 10), st.integers(2**20, 2**70)), max_size=6).map(
            lambda ds: ",".join(map(str, ds))),
        st.integers(30, 100).map(lambda n: ",".join(["1"] * n)),  # more dims than numpy allows (64)
        st.sampled_from(["1000000,1000000", "0,100000000000000000000", "0," + "9" * 30, "2, 3", "\u0663", "1_0"]),
        st.text(max_size=12),
    )


def _claimed_bytes(fields: dict[str, str]) -> int | None:
    """What the (possibly mutated) header claims, computed the lenient way int() would; None when it cannot."""
    try:
        code = int(fields["dtype"])
        dims = [int(d) for d in fields["dims"].split(",")] if fields["dims"] else []
    except (KeyError, ValueError):
        return None
    itemsize = ACL_DTYPES[code].itemsize if code in ACL_DTYPES else 2
    total = int(np.prod([max(d, 0) for d in dims], dtype=object)) * itemsize if dims else itemsize
    return total if total < 1 << 16 else None


@st.composite
def plausible_bin(draw) -> bytes:
    """A header that is right, or wrong in one or two of many ways, and a payload of about the claimed size."""
    code = draw(st.one_of(st.sampled_from(ACL_CODES), st.sampled_from(ODD_CODES)))
    itemsize = ACL_DTYPES[code].itemsize if code in ACL_DTYPES else 2
    dims = draw(st.one_of(st.lists(st.integers(0, 5), max_size=4).map(lambda ds: ",".join(map(str, ds))),
                          dims_text()))
    fields = {"$Version": "1.0", "$Object.Count": "1", "format": "2", "dtype": str(code), "dims": dims}
    claimed = _claimed_bytes(fields)
    nbytes = claimed if claimed is not None else 0
    fields["$Object.Length"] = str(nbytes)
    fields["$Object.data"] = f"0,{nbytes}"
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
        if draw(st.booleans()):
            fields.pop(key, None)
        else:
            fields[key] = draw(dims_text() if key in ("dims", "$Object.data") else int_text())
    if draw(st.integers(0, 9)) == 0:
        for key in ("max", "min", "mean", "l2norm"):
            fields[key] = draw(st.one_of(st.floats(allow_nan=True).map(repr), st.text(max_size=5)))
    lines = [f"{k}={v}" for k, v in fields.items()]
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(lines + ["junk", "=1", "a=b=c"])))
    end = draw(st.sampled_from(["$End=1\n", "$End=1\n", "$End=1\r\n", "", "$End\n"]))
    header = ("\n".join(lines) + "\n" + end).encode("utf-8", "surrogatepass")
    # Mostly the size the header now claims, so that odd-but-consistent headers reach the tensor building.
    now = _claimed_bytes(fields)
    size = now if now is not None else nbytes
    delta = draw(st.sampled_from([0, 0, 0, 0, -1, 1, -itemsize, itemsize, 4096]))
    payload = b"\x3c" * max(0, size + delta)
    return header + payload


def mutate(blob: bytes, ops) -> bytes:
    """Apply byte-level and header-line mutations to a valid .bin."""
    head, sep, payload = blob.partition(b"$End=1\n")
    lines = head.split(b"\n")[:-1] if sep else head.split(b"\n")
    for op in ops:
        kind = op[0]
        if kind == "set" and lines:
            i = op[1] % len(lines)
            key = lines[i].split(b"=", 1)[0]
            lines[i] = key + b"=" + op[2].encode("utf-8", "surrogatepass")
        elif kind == "drop" and lines:
            del lines[op[1] % len(lines)]
        elif kind == "dup" and lines:
            lines.insert(op[1] % (len(lines) + 1), lines[op[1] % len(lines)])
        elif kind == "insert":
            lines.insert(op[1] % (len(lines) + 1), op[2].encode("utf-8", "surrogatepass"))
        elif kind == "payload":
            payload = payload[: op[1] % (len(payload) + 1)] + op[2]
    out = b"\n".join(lines) + b"\n" + sep + payload
    for op in ops:
        if op[0] == "truncate":
            out = out[: op[1] % (len(out) + 1)]
        elif op[0] == "flip" and out:
            i = op[1] % len(out)
            out = out[:i] + bytes([op[2]]) + out[i + 1:]
    return out


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 20), st.one_of(int_text(), dims_text())),
    st.tuples(st.just("drop"), st.integers(0, 20)),
    st.tuples(st.just("dup"), st.integers(0, 20)),
    st.tuples(st.just("insert"), st.integers(0, 20),
              st.one_of(st.sampled_from([f"{k}={v}" for k in KEYS for v in ("1", "", "-1")]), st.text(max_size=20))),
    st.tuples(st.just("payload"), st.integers(0, 10**6), st.binary(max_size=64)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
)


def check_bin(path: Path, target: str):
    """Read ``path`` both ways; a success must describe exactly the bytes in the file."""
    size = path.stat().st_size
    header, _, _ = attempt(None, FormatError, read_bin_header, path)
    tensor, error, peak = attempt(target, FormatError, read_bin, path)
    # Parsing touches at most the 64 KiB header; whatever dims claim, memory tracks the file, not the claim.
    assert peak <= 100 * min(size, 64 * 1024) + (1 << 20), f"{peak} bytes traced for a {size}-byte file"
    if tensor is None:
        return error
    assert header is not None and not header.is_stats_only
    assert tensor.shape == header.dims and tensor.data.shape == header.dims
    assert tensor.data.nbytes == header.numel * header.acl_dtype.itemsize <= size - header.payload_offset
    assert tensor.data.nbytes == 0 or _mapped(tensor.data)  # a view of the file, never a copy
    with np.errstate(all="ignore"):  # random bytes in a bool payload are not 0/1; only exceptions matter here
        assert tensor.to_float64().size == header.numel
    return None


@FUZZ
@given(blob=st.one_of(st.binary(max_size=2048),
                      st.tuples(st.binary(max_size=300), st.binary(max_size=300)).map(lambda ab: ab[0] + b"$End=1\n" + ab[1])))
def test_random_bytes(tmp_path, blob):
    path = tmp_path / "outtensor0.bin"
    path.write_bytes(blob)
    check_bin(path, "bin.random")


@MORE
@given(blob=plausible_bin())
def test_generated_headers(tmp_path, blob):
    path = tmp_path / "outtensor0.bin"
    path.write_bytes(blob)
    check_bin(path, "bin.generated")


@MORE
@given(name=st.sampled_from(sorted(BY_NAME)), shape=st.lists(st.integers(0, 4), max_size=4),
       seed=st.integers(0, 2**32 - 1), ops=st.lists(mutation, max_size=4))
def test_mutated_valid_files(tmp_path, name, shape, seed, ops):
    dtype = BY_NAME[name]
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    data = raw.view(dtype.storage).reshape(shape)
    valid = write_bin(tmp_path / "valid.bin", data, dtype=name)
    path = tmp_path / "outtensor0.bin"
    path.write_bytes(mutate(valid.read_bytes(), ops))
    error = check_bin(path, "bin.mutated")
    if not ops:  # an untouched file always reads back, bit for bit
        assert error is None
        assert np.asarray(read_bin(path).data).tobytes() == data.tobytes()


def test_a_sparse_file_claiming_terabytes_is_refused_without_allocating(tmp_path):
    """The size limit is checked on the file, then the header on arithmetic: neither reads the payload."""
    huge = tmp_path / "outtensor0.bin"
    header = b"$Version=1.0\n$Object.Count=1\nformat=2\ndtype=1\ndims=1000000,1000000\n$End=1\n"
    with open(huge, "wb") as fh:
        fh.write(header)
        fh.truncate(3 * 1024**3)  # sparse: 3 GiB claimed by the file system, nothing on disk
    _, error, peak = attempt("bin.sparse", FormatError, read_bin, huge)
    assert "exceeds the limit of 2147483648 bytes" in str(error)
    _, error, peak2 = attempt("bin.sparse", FormatError, read_bin, huge, max_bytes=4 * 1024**3)
    assert "truncated payload" in str(error) and "2000000000000 bytes" in str(error)
    assert max(peak, peak2) < (1 << 20)


# ============================================================================================ topology JSON files

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(allow_nan=True),
                      st.text(max_size=6))
TOPO_KEYS = ["opName", "opType", "param", "inTensors", "outTensors", "internalTensors", "nodes", "modelName"]


def _json_containers(inner):
    keys = st.one_of(st.sampled_from(TOPO_KEYS), st.text(max_size=6))
    return st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=6)


json_tree = st.recursive(json_leaf, _json_containers, max_leaves=10)
EDGE_NAMES = ["..", ".", "a/b", "a\\b", "a\x00b", "x" * 300, "Op_\u00b2", "Op_\u0663", "Op_" + "9" * 40, "Op_-1",
              "Linear_3_4_0", "", " ", "CON", "a\nb"]
odd_names = st.one_of(st.text(max_size=10), st.sampled_from(EDGE_NAMES))


@st.composite
def node_like(draw, depth=0):
    """Nodes that get past the first checks (so the deeper ones are exercised), with odd values here and there."""
    names = st.sampled_from(["LinearOperation_1", "Layer_3", "X"] + EDGE_NAMES)
    node = {"opName": draw(st.one_of(names, names, odd_names)),
            "opType": draw(st.one_of(names, names, odd_names))}
    if draw(st.booleans()):
        node["param"] = draw(st.one_of(st.just(""), st.none(), st.dictionaries(st.text(max_size=4), json_leaf,
                                                                              max_size=2), json_leaf))
    for key in ("inTensors", "outTensors", "internalTensors"):
        if draw(st.booleans()):
            node[key] = draw(st.one_of(st.lists(st.text(max_size=4), max_size=2),
                                       st.lists(st.text(max_size=4), max_size=2), json_leaf))
    if depth < 2 and draw(st.booleans()):
        node["nodes"] = draw(st.lists(node_like(depth + 1), max_size=2))
    if draw(st.integers(0, 7)) == 0:
        node[draw(st.sampled_from(TOPO_KEYS))] = draw(json_tree)
    return node


def check_topology(path: Path, tmp_path: Path, target: str):
    size = path.stat().st_size
    topo, error, peak = attempt(target, FormatError, load_topology, path)
    assert peak <= 100 * size + (1 << 20), f"{peak} bytes traced for a {size}-byte topology"
    if topo is None:
        return error
    ops = list(topo.walk())
    assert [op.order for op in ops] == list(range(len(ops)))
    token_dir = tmp_path / "token"
    token_dir.mkdir(exist_ok=True)
    for op in ops:
        parts = op.rel_dir.split("/")
        assert len(parts) == op.depth + 1 and all(p not in ("", ".", "..") and "\x00" not in p for p in parts)
        files = op_files(token_dir, op)  # folder lookup must survive any name the topology allows
        assert files.inputs == [] and files.outputs == []
    return None


@FUZZ
@given(obj=st.one_of(json_tree, st.builds(lambda nodes, name: {"modelName": name, "nodes": nodes},
                                          st.lists(node_like(), max_size=4), st.text(max_size=8)),
                     st.builds(lambda nodes, name: {"modelName": name, "nodes": nodes},
                                          st.lists(node_like(), max_size=4), st.text(max_size=8)),
                     node_like()))
def test_random_topologies(tmp_path, obj):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(obj), encoding="utf-8", errors="surrogatepass")
    check_topology(path, tmp_path, "topology.random")


def _node_paths(obj, prefix=()):
    """Every node of a topology object with its path of indices into ``nodes`` lists."""
    for i, node in enumerate(obj.get("nodes", []) if isinstance(obj, dict) else []):
        yield prefix + (i,), node
        yield from _node_paths(node, prefix + (i,))


BLOOM_NODES = list(_node_paths(BLOOM))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(BLOOM_NODES) - 1), st.sampled_from(TOPO_KEYS + ["extra"]),
                                st.one_of(st.just("<delete>"), json_tree, odd_names)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.integers(0, 30000)), flip=st.one_of(st.none(), st.tuples(st.integers(0, 30000),
                                                                                          st.integers(0, 255))))
def test_mutated_bloom_topology(tmp_path, edits, cut, flip):
    obj = json.loads(json.dumps(BLOOM))  # a fresh copy
    nodes = list(_node_paths(obj))
    for index, key, value in edits:
        node = nodes[index][1]
        if value == "<delete>":
            node.pop(key, None)
        else:
            node[key] = value
    text = json.dumps(obj, indent=4).encode("utf-8", "surrogatepass")
    if cut is not None:
        text = text[:cut]
    if flip is not None and text:
        i = flip[0] % len(text)
        text = text[:i] + bytes([flip[1]]) + text[i + 1:]
    path = tmp_path / "Bloom7BFlashAttentionModel.json"
    path.write_bytes(text)
    check_topology(path, tmp_path, "topology.bloom")


def test_unmutated_bloom_sample_loads(tmp_path):
    path = tmp_path / "bloom.json"
    path.write_text(json.dumps(BLOOM))
    assert check_topology(path, tmp_path, "topology.bloom") is None


# ============================================================================================== model_tree.json

@st.composite
def tree_like(draw, depth=0):
    names = st.sampled_from(["root", "root.model.layers.0", "root.lm_head"] + EDGE_NAMES)
    node = {"name": draw(st.one_of(names, names, odd_names)),
            "type": draw(st.one_of(st.sampled_from(["LlamaMLP", "Linear", ""]), odd_names, json_leaf))}
    if draw(st.booleans()):
        node["exec_order"] = draw(st.one_of(st.integers(-5, 50), st.integers(10**400, 10**401), json_leaf))
    if depth < 3 and draw(st.booleans()):
        node["children"] = draw(st.one_of(st.lists(tree_like(depth + 1), max_size=2), json_leaf))
    return node


def check_tree(path: Path, tmp_path: Path, target: str):
    size = path.stat().st_size
    with warnings.catch_warnings():  # trailing garbage is accepted with a warning, by design
        warnings.simplefilter("ignore")
        tree, error, peak = attempt(target, FormatError, load_model_tree, path)
    assert peak <= 100 * size + (1 << 20)
    if tree is None:
        return error
    modules = list(tree.walk())
    assert sorted(m.order for m in modules) == list(range(len(modules)))
    token = tmp_path / "0"
    token.mkdir(exist_ok=True)
    dump = TorchDump(root=tmp_path, tree=tree, token_dirs={0: token})
    for module in modules:
        assert "/" not in module.name and "\x00" not in module.name and module.name not in (".", "..")
        files = dump.module_files(0, module.name)
        assert files.inputs == [] and files.outputs == []
    return None


@FUZZ
@given(obj=st.one_of(json_tree, tree_like()), trailing=st.sampled_from(["", "", "\n", "}", " garbage"]))
def test_random_model_trees(tmp_path, obj, trailing):
    path = tmp_path / "model_tree.json"
    path.write_text(json.dumps(obj) + trailing, encoding="utf-8", errors="surrogatepass")
    check_tree(path, tmp_path, "model_tree.random")


@FUZZ
@given(cut=st.integers(0, 2000), flip=st.tuples(st.integers(0, 2000), st.integers(0, 255)),
       edit=st.tuples(st.sampled_from(["name", "type", "children", "exec_order"]),
                      st.one_of(st.just("<delete>"), json_tree, odd_names)))
def test_mutated_sample_model_tree(tmp_path, cut, flip, edit):
    obj = json.loads(json.dumps(TREE))
    key, value = edit
    target = obj["children"][1]
    if value == "<delete>":
        target.pop(key, None)
    else:
        target[key] = value
    text = json.dumps(obj, indent=4).encode("utf-8", "surrogatepass")
    text = text[: max(cut, 1)] if cut < len(text) else text
    i = flip[0] % len(text)
    text = text[:i] + bytes([flip[1]]) + text[i + 1:]
    path = tmp_path / "model_tree.json"
    path.write_bytes(text)
    check_tree(path, tmp_path, "model_tree.mutated")


# ============================================================================================ op_mapping_file.json

name_text = st.text(alphabet=st.sampled_from("Aab_09\n $.-\u00e9\x00"), max_size=10)
mapping_like = st.dictionaries(
    st.one_of(name_text, st.sampled_from(["LinearOperation", "CommonLayer_outtensor0", "X_intensor12"])),
    st.one_of(name_text, st.lists(st.one_of(name_text, json_leaf), max_size=3), json_tree,
              st.sampled_from(["Linear", "GLMBlock_output_0", "Foo_input_1_2"])),
    max_size=5,
)


def check_mapping(path: Path, target: str):
    size = path.stat().st_size
    rules, error, peak = attempt(target, MappingError, load_mapping_file, path)
    assert peak <= 100 * size + (1 << 20)
    if rules is None:
        return error
    table = MappingTable.builtin().merged(rules)
    for rule in rules:
        for side in (rule.atb, rule.torch):
            assert side.type and all(c.isascii() and (c.isalnum() or c == "_") for c in side.type)
        assert table.rules_for_atb(rule.atb.type, rule.atb.type + "_3")[0].source == str(path)
    return None


@FUZZ
@given(obj=st.one_of(mapping_like, json_tree), raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_random_mapping_files(tmp_path, obj, raw):
    path = tmp_path / "op_mapping_file.json"
    if raw is None:
        path.write_text(json.dumps(obj), encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(raw)
    check_mapping(path, "mapping.random")


@pytest.mark.parametrize("text, fragment", [
    ('{"Linear\\n": "Linear"}', "'Linear\\n'"),  # "$" would have matched before the newline
    ('{"A": "B", "A": "C"}', "given twice"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"A": ' + "9" * 5000 + "}", "invalid JSON"),
])
def test_mapping_file_edge_cases_found_by_fuzzing(tmp_path, text, fragment):
    path = tmp_path / "op_mapping_file.json"
    path.write_text(text)
    TRIED["mapping.fixed"] += 1
    with pytest.raises(MappingError) as info:
        load_mapping_file(tmp_path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_fifo_in_place_of_a_json_file_does_not_block(tmp_path):
    fifo = tmp_path / "model.json"
    os.mkfifo(fifo)
    TRIED["topology.fixed"] += 1
    with pytest.raises(FormatError, match="not a regular file"):
        guarded(load_topology, fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        guarded(load_model_tree, fifo)


# =============================================================== inputs the fuzzing found (kept as plain regressions)

def _bin(tmp_path: Path, header: str, payload: bytes = b"") -> Path:
    path = tmp_path / "outtensor0.bin"
    path.write_bytes(header.encode("utf-8") + payload)
    return path


@pytest.mark.parametrize("header, payload, fragment", [
    # numpy refuses more than 64 dims: the reshape used to raise a raw ValueError
    ("dtype=1\ndims=" + ",".join(["1"] * 70) + "\n$End=1\n", b"\0\0", "more than 32 entries"),
    # an empty tensor with an absurd other dim: np.empty used to raise a raw ValueError
    ("dtype=1\ndims=0,100000000000000000000\n$End=1\n", b"", "has a dimension over"),
    # int() takes "1_0", "\u0663" (Arabic-Indic 3) and 4000-digit numbers; a header does not
    ("dtype=1_0\ndims=1\n$End=1\n", b"\0\0", "is not an integer"),
    ("dtype=1\ndims=\u0663\n$End=1\n", b"\0" * 6, "not a comma-separated list of integers"),
    ("dtype=" + "9" * 5000 + "\ndims=1\n$End=1\n", b"\0\0", "is not an integer"),
])
def test_bin_headers_found_by_fuzzing(tmp_path, header, payload, fragment):
    TRIED["bin.fixed"] += 1
    with pytest.raises(FormatError) as info:
        read_bin(_bin(tmp_path, header, payload))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _topology(tmp_path: Path, nodes) -> Path:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"modelName": "M", "nodes": nodes}))
    return path


def test_topology_names_found_by_fuzzing(tmp_path):
    TRIED["topology.fixed"] += 4
    # "²".isdigit() is True but int("²") raises; a 40-digit suffix is no folder id either: both use the index
    topo = load_topology(_topology(tmp_path, [{"opName": "A_\u00b2", "opType": "A"},
                                              {"opName": "B_" + "9" * 40, "opType": "B"}]))
    assert [op.rel_dir for op in topo.ops] == ["0_A", "1_B"]
    # a 300-character op type made Path.is_dir() raise ENAMETOOLONG in op_files
    topo = load_topology(_topology(tmp_path, [{"opName": "L_0", "opType": "L" * 300}]))
    assert op_files(tmp_path, topo.ops[0]).outputs == []
    with pytest.raises(FormatError, match="cannot be a folder name"):
        load_topology(_topology(tmp_path, [{"opName": "N_0", "opType": "a\x00b"}]))
    (tmp_path / "big.json").write_text('{"modelName": "M", "nodes": [], "x": ' + "9" * 5000 + "}")
    with pytest.raises(FormatError, match="invalid JSON"):
        load_topology(tmp_path / "big.json")


@pytest.mark.parametrize("tree, fragment", [
    ({"name": "root", "type": "M", "exec_order": 0,
      "children": [{"name": "root.a", "type": "L", "exec_order": 10**400}]}, None),  # float() overflowed
    ({"name": "root", "type": "M", "children": [{"name": "../../etc", "type": "L"}]}, "cannot be a module folder"),
    ({"name": "root/x", "type": "M"}, "cannot be a module folder"),
])
def test_model_trees_found_by_fuzzing(tmp_path, tree, fragment):
    TRIED["model_tree.fixed"] += 1
    path = tmp_path / "model_tree.json"
    path.write_text(json.dumps(tree))
    if fragment is None:
        assert [m.name for m in load_model_tree(path).walk()] == ["root", "root.a"]
    else:
        with pytest.raises(FormatError, match=fragment):
            load_model_tree(path)


def test_a_superscript_digit_folder_is_not_a_token(tmp_path):
    """``"²".isdigit()`` is True and ``int("²")`` raises: such a folder beside the token dirs is not a token."""
    from pytest_ait_llm.formats.torch_layout import open_torch_dump

    TRIED["model_tree.fixed"] += 1
    rank = tmp_path / "123_cpu"
    (rank / "0").mkdir(parents=True)
    (rank / "\u00b2").mkdir()
    (rank / "model_tree.json").write_text(json.dumps({"name": "root", "type": "M"}))
    assert open_torch_dump(tmp_path).tokens == [0]


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a file's memory map (mmap.mmap or np.memmap at the bottom of its bases)."""
    base = array
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    return isinstance(getattr(base, "obj", base), (mmap.mmap, np.memmap))  # frombuffer keeps a memoryview
