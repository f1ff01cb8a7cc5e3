"""The ATB model topology JSON (``model/{pid}/{ModelName}.json``): the op tree and where each op's tensors live.

Each node has ``opName``, ``opType``, ``param`` (a dict on leaves, ``""`` on graph ops, sometimes absent),
``inTensors``/``outTensors`` and, on graph ops, ``internalTensors`` and ``nodes``. The dump writes one folder per
op: top-level ops as ``{id}_{opType}`` where id is the numeric suffix of ``opName`` (``Bloom7bCommonLayer_3`` ->
``3_BloomLayer``), nested ops as ``{k}_{opType}`` with k their index among siblings. Validation errors name the
file and the JSON path of the offending node, because a topology has hundreds of look-alike nodes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import FormatError
from .safe_io import DEFAULT_MAX_JSON_BYTES, max_json_bytes, read_bounded

#: Real models nest model -> layer -> sub-graph -> op (4 levels); anything past this is corrupt or hostile.
MAX_DEPTH = 64
#: Topologies of large models are tens of MB; a file far beyond that is not a topology
#: (override: ``max_bytes=`` or the AIT_LLM_MAX_JSON_BYTES environment variable).
DEFAULT_MAX_TOPOLOGY_BYTES = DEFAULT_MAX_JSON_BYTES


@dataclass(eq=False, repr=False)
class AtbOp:
    """One ATB operation (a leaf op or a graph op such as a layer).

    ``rel_dir`` is the posix path of its tensor folder under a token dir; ``order`` its pre-order index over
    the whole model, which is the execution order; ``depth`` is 0 for top-level ops. ``type_index`` /
    ``type_count`` place it among same-type siblings, which resolves folders when a dump numbers the top level
    differently from the opName suffix (msit offsets).
    """

    op_name: str
    op_type: str
    param: dict | str | None = None
    in_tensors: list[str] = field(default_factory=list)
    out_tensors: list[str] = field(default_factory=list)
    children: list["AtbOp"] = field(default_factory=list)
    parent: "AtbOp | None" = None
    rel_dir: str = ""
    order: int = 0
    depth: int = 0
    internal_tensors: list[str] = field(default_factory=list)
    type_index: int = 0
    type_count: int = 1

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def folder(self) -> str:
        """This op's own folder name (the last component of ``rel_dir``)."""
        return self.rel_dir.rsplit("/", 1)[-1]

    def walk(self) -> Iterator["AtbOp"]:
        """This op and all its descendants, pre-order (self first) = execution order."""
        stack: list[AtbOp] = [self]
        while stack:
            op = stack.pop()
            yield op
            stack.extend(reversed(op.children))

    def __repr__(self) -> str:
        return f"AtbOp({self.op_name!r}, {self.op_type!r}, rel_dir={self.rel_dir!r}, order={self.order})"


@dataclass
class AtbTopology:
    """A parsed topology: the top-level ops (usually the embedding, the layers, the final norm and lm_head)."""

    model_name: str
    ops: list[AtbOp]
    path: Path | None = None
    in_tensors: list[str] = field(default_factory=list)
    out_tensors: list[str] = field(default_factory=list)
    _by_name: dict[str, AtbOp] | None = field(default=None, init=False, repr=False, compare=False)

    def walk(self) -> Iterator[AtbOp]:
        """Every op, pre-order over the top-level ops = execution order."""
        for op in self.ops:
            yield from op.walk()

    def find(self, op_name: str) -> AtbOp | None:
        """The op named ``op_name`` (the first in execution order if names repeat), or None."""
        if self._by_name is None:
            index: dict[str, AtbOp] = {}
            for op in self.walk():
                index.setdefault(op.op_name, op)
            self._by_name = index
        return self._by_name.get(op_name)

    def __len__(self) -> int:
        return sum(1 for _ in self.walk())


def _where(path: Path | str | None) -> str:
    return str(path) if path is not None else "<topology>"


_SUFFIX_ID = re.compile(r"[0-9]{1,18}")


def _suffix_id(op_name: str) -> int | None:
    # ASCII digits only and a sane length: str.isdigit() also accepts "²" (which int() refuses).
    tail = op_name.rsplit("_", 1)[-1] if "_" in op_name else ""
    return int(tail) if _SUFFIX_ID.fullmatch(tail) else None


class _Parser:
    """Validates the JSON while building the tree, so every error carries its JSON path."""

    def __init__(self, path: Path | None):
        self.where = _where(path)

    def fail(self, jpath: str, problem: str) -> FormatError:
        return FormatError(f"{self.where}: {jpath}: {problem}" if jpath else f"{self.where}: {problem}")

    def str_list(self, node: dict, key: str, jpath: str) -> list[str]:
        value = node.get(key, [])
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(jpath, f"{key} must be a list of strings, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{jpath}.{key}[{i}]", f"expected a string, got {type(item).__name__}")
        return list(value)

    def node_list(self, container: dict, jpath: str) -> list[Any]:
        nodes = container.get("nodes", [])
        if nodes is None:
            return []
        if not isinstance(nodes, list):
            raise self.fail(jpath, f"nodes must be a list, got {type(nodes).__name__}")
        return nodes

    def op(self, node: Any, jpath: str, depth: int) -> AtbOp:
        if depth >= MAX_DEPTH:
            raise self.fail(jpath, f"nesting deeper than {MAX_DEPTH} levels")
        if not isinstance(node, dict):
            raise self.fail(jpath, f"expected an object, got {type(node).__name__}")
        names = {}
        for key in ("opName", "opType"):
            if key not in node:
                raise self.fail(jpath, f"{key} missing")
            value = node[key]
            if not isinstance(value, str) or not value:
                raise self.fail(jpath, f"{key} must be a non-empty string, got {value!r}")
            names[key] = value
        if any(c in names["opType"] for c in "/\\\0") or names["opType"] in (".", ".."):
            raise self.fail(jpath, f"opType {names['opType']!r} cannot be a folder name")
        param = node.get("param")
        if param is not None and not isinstance(param, (dict, str)):
            raise self.fail(jpath, f"param must be an object or a string, got {type(param).__name__}")
        return AtbOp(
            op_name=names["opName"],
            op_type=names["opType"],
            param=param,
            in_tensors=self.str_list(node, "inTensors", jpath),
            out_tensors=self.str_list(node, "outTensors", jpath),
            internal_tensors=self.str_list(node, "internalTensors", jpath),
            depth=depth,
        )

    def build(self, roots: list[tuple[Any, str]]) -> list[AtbOp]:
        """Build the tree from ``(raw node, JSON path)`` roots iteratively (no Python recursion, so hostile
        depth cannot crash us)."""
        tops: list[AtbOp] = []
        # (raw node, its JSON path, depth, parent or None)
        pending: list[tuple[Any, str, int, AtbOp | None]] = [(n, jp, 0, None) for n, jp in reversed(roots)]
        while pending:
            raw, jpath, depth, parent = pending.pop()
            op = self.op(raw, jpath, depth)
            op.parent = parent
            (parent.children if parent is not None else tops).append(op)
            children = self.node_list(raw, jpath)
            pending.extend((c, f"{jpath}.nodes[{i}]", depth + 1, op) for i, c in reversed(list(enumerate(children))))
        return tops


def _assign_folders(tops: list[AtbOp]) -> None:
    def place(siblings: list[AtbOp]) -> None:
        counts: dict[str, int] = {}
        for op in siblings:
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        seen: dict[str, int] = {}
        for op in siblings:
            op.type_index = seen.get(op.op_type, 0)
            op.type_count = counts[op.op_type]
            seen[op.op_type] = op.type_index + 1

    place(tops)
    for k, op in enumerate(tops):
        ident = _suffix_id(op.op_name)
        op.rel_dir = f"{ident if ident is not None else k}_{op.op_type}"
    order = 0
    for top in tops:
        for op in top.walk():
            op.order = order
            order += 1
            place(op.children)
            for k, child in enumerate(op.children):
                child.rel_dir = f"{op.rel_dir}/{k}_{child.op_type}"


def parse_topology(obj: Any, path: str | os.PathLike | None = None) -> AtbTopology:
    """An :class:`AtbTopology` from decoded JSON.

    Accepts a model object (``{"modelName", "nodes": [...]}``) or a single node object (``{"opName", "opType",
    ...}``, as in a layer file ``layer/{pid}/{opName}.json``), which becomes a one-op topology.
    """
    p = Path(path) if path is not None else None
    parser = _Parser(p)
    if not isinstance(obj, dict):
        raise parser.fail("", f"top level must be a JSON object, got {type(obj).__name__}")
    if "modelName" not in obj and "opName" in obj:
        tops = parser.build([(obj, "$")])
        model_name = tops[0].op_name
    else:
        if "nodes" not in obj:
            raise parser.fail("", "nodes missing (expected {\"modelName\": ..., \"nodes\": [...]})")
        model_name = obj.get("modelName", p.stem if p is not None else "")
        if not isinstance(model_name, str):
            raise parser.fail("modelName", f"expected a string, got {type(model_name).__name__}")
        tops = parser.build([(n, f"nodes[{i}]") for i, n in enumerate(parser.node_list(obj, ""))])
    _assign_folders(tops)
    return AtbTopology(
        model_name=model_name,
        ops=tops,
        path=p,
        in_tensors=parser.str_list(obj, "inTensors", "") if "modelName" in obj else [],
        out_tensors=parser.str_list(obj, "outTensors", "") if "modelName" in obj else [],
    )


def combine_topologies(model_name: str, parts: list[AtbTopology], path: str | os.PathLike | None = None) -> AtbTopology:
    """One topology whose top-level ops are those of ``parts``, in order (e.g. the per-layer files of a
    layer-only dump). Folders and execution order are recomputed over the whole; ``parts`` are not modified."""
    tops: list[AtbOp] = []
    for part in parts:
        again = parse_topology(topology_to_json(part), part.path)
        tops.extend(again.ops)
    _assign_folders(tops)
    return AtbTopology(model_name=model_name, ops=tops, path=Path(path) if path is not None else None)


def topology_to_json(topology: AtbTopology) -> dict:
    """The JSON object (model schema) of ``topology``; ``parse_topology`` of it gives the same tree."""
    def node(op: AtbOp) -> dict:
        out: dict[str, Any] = {"opName": op.op_name, "opType": op.op_type}
        if op.param is not None:
            out["param"] = op.param
        out["inTensors"] = list(op.in_tensors)
        out["outTensors"] = list(op.out_tensors)
        if op.children or op.internal_tensors:
            out["internalTensors"] = list(op.internal_tensors)
            out["nodes"] = [node(c) for c in op.children]
        return out

    return {"modelName": topology.model_name, "nodes": [node(op) for op in topology.ops]}


def load_json_file(path: str | os.PathLike, *, max_bytes: int | None = None,
                   allow_symlinks: bool | None = None) -> Any:
    """Decoded JSON of ``path``; any problem (missing, a FIFO, too large, a symlink out of the dump, not UTF-8,
    bad JSON, absurd nesting) is a one-line FormatError.

    ``max_bytes`` defaults to AIT_LLM_MAX_JSON_BYTES if set, else :data:`DEFAULT_MAX_TOPOLOGY_BYTES`.
    """
    p = Path(path)
    raw = read_bounded(p, max_json_bytes(max_bytes), what="JSON file", allow_symlinks=allow_symlinks)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise FormatError(f"{p}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise FormatError(f"{p}: invalid JSON ({exc})") from None


def load_topology(path: str | os.PathLike, *, max_bytes: int | None = None,
                  allow_symlinks: bool | None = None) -> AtbTopology:
    """Read and validate a topology JSON file (a model file, or a single-node layer file)."""
    return parse_topology(load_json_file(path, max_bytes=max_bytes, allow_symlinks=allow_symlinks), path)
