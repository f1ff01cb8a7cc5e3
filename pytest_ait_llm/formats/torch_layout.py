"""Read a torch dump: the ``{PID}_{device}/{TID}/{module}/output*.pth`` layout and its ``model_tree.json``.

torch is imported only inside :func:`load_torch_tensor`: the tree and layout parts are used by mapping and
reporting code that must not pay for importing torch (the pytest plugin is loaded by every pytest run).
"""
from __future__ import annotations

import json
import os
import re
import stat as stat_mod
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import FormatError, LayoutError
from .safe_io import as_path, max_json_bytes, outside_dump_root, read_bounded
from .files import OpFiles
from .atb_bin import DEFAULT_MAX_BIN_BYTES
from .pth_zip import read_plain_tensor
from .tensor import RawTensor

__all__ = ["TorchModule", "TorchDump", "open_torch_dump", "load_model_tree", "load_torch_tensor",
           "MAX_TREE_DEPTH", "TENSOR_SUFFIXES"]

_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts "²", which int() refuses

#: Deeper trees are refused: real models nest a dozen levels, a deeper file is corrupt or hostile.
MAX_TREE_DEPTH = 256
TENSOR_SUFFIXES = (".pth", ".pt", ".npy")
MODEL_TREE = "model_tree.json"

# {PID}_{device} as we and the ait docs write it, {device}_{PID} as ait/msit code writes it.
_RANK_DIR = re.compile(r"^(?:\d+_[a-z]+\d*|[a-z]+\d*_\d+)$")
_TENSOR_FILE = re.compile(r"^(input|output)(?:_(.+))?\.(pth|pt|npy)$")


@dataclass(eq=False)
class TorchModule:
    """One module of ``model_tree.json``.

    ``order`` is the execution order of the module's first call (0 = first); modules that never ran are
    numbered after all that ran. ``children`` are sorted by when their subtree first ran.
    """

    name: str
    type: str
    children: list[TorchModule] = field(default_factory=list)
    parent: TorchModule | None = field(default=None, repr=False)
    order: int = -1
    depth: int = 0

    def walk(self) -> Iterator[TorchModule]:
        """Pre-order: self first, then each child's subtree."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def find(self, name: str) -> TorchModule | None:
        """The module called ``name`` in this subtree, or None."""
        return next((m for m in self.walk() if m.name == name), None)

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass
class TorchDump:
    """One torch dump: the ``{PID}_{device}`` folder, its module tree and its token folders."""

    root: Path
    tree: TorchModule
    token_dirs: dict[int, Path]
    #: As given to :func:`open_torch_dump`; readers of this dump's tensors should pass it to ``load_torch_tensor``.
    allow_symlinks: bool | None = field(default=None, compare=False)

    @property
    def tokens(self) -> list[int]:
        return sorted(self.token_dirs)

    def module_dir(self, token_id: int, module_name: str) -> Path:
        if token_id not in self.token_dirs:
            raise LayoutError(f"{self.root}: no token {token_id} in this torch dump (tokens: {_ids(self.tokens)})")
        return self.token_dirs[token_id] / module_name

    def module_files(self, token_id: int, module_name: str) -> OpFiles:
        """The module's input and output files for one token; both empty when the module was not dumped.

        Order: ``output`` first, then numbered elements numerically (``output_2`` < ``output_10``,
        ``output_0_1`` < ``output_1``), then named ones (dict / ModelOutput keys, keyword inputs) by name.
        """
        folder = self.module_dir(token_id, module_name)
        files = OpFiles()
        try:  # scandir: one call lists the folder and tells files apart without a stat() per entry
            with os.scandir(folder) as it:
                entries = [(entry.name, entry.is_file()) for entry in it]
        except (OSError, ValueError):  # missing or unreadable folder: the report says no tensor was dumped
            entries = []
        for name, is_file in entries:
            match = _TENSOR_FILE.match(name)
            if match and is_file:
                (files.inputs if match.group(1) == "input" else files.outputs).append(folder / name)
        files.inputs.sort(key=_tensor_file_key)
        files.outputs.sort(key=_tensor_file_key)
        return files


def _tensor_file_key(path: Path) -> tuple:
    match = _TENSOR_FILE.match(path.name)
    assert match is not None
    part = match.group(2)
    suffix_rank = TENSOR_SUFFIXES.index("." + match.group(3))
    if part is None:
        return (0, (), "", suffix_rank)
    if re.fullmatch(r"\d+(?:_\d+)*", part):
        return (1, tuple(int(i) for i in part.split("_")), "", suffix_rank)
    return (2, (), part, suffix_rank)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


# -- locating a dump -------------------------------------------------------------------------------------------------

def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise LayoutError(f"{folder}: cannot list ({exc.strerror or exc})") from None


def _token_dirs(rank_dir: Path) -> dict[int, Path]:
    return {int(p.name): p for p in _listdir(rank_dir) if _DIGITS.fullmatch(p.name) and p.is_dir()}


def _is_rank_dir(path: Path) -> bool:
    return path.is_dir() and ((path / MODEL_TREE).is_file() or bool(_token_dirs(path)))


def _rank_candidates(path: Path) -> list[Path]:
    """Rank folders reachable from ``path``: itself, its children, or the ``torch_tensors/`` children of an
    ``ait_dump``/``msit_dump_*`` root (the original tools' layout) that is ``path`` or one of its children."""
    if _RANK_DIR.match(path.name) and _is_rank_dir(path):
        return [path]

    def ranks_in(folder: Path) -> list[Path]:
        return [p for p in _listdir(folder) if _RANK_DIR.match(p.name) and _is_rank_dir(p)]

    found = ranks_in(path)
    if found:
        return found
    if (path / "torch_tensors").is_dir():
        return ranks_in(path / "torch_tensors")
    for child in _listdir(path):
        if (child.name == "ait_dump" or child.name.startswith("msit_dump")) and (child / "torch_tensors").is_dir():
            found += ranks_in(child / "torch_tensors")
    return found


def open_torch_dump(path: str | Path, *, allow_symlinks: bool | None = None) -> TorchDump:
    """Open a torch dump from any of its levels.

    ``path`` may be: a dump dir holding exactly one ``{PID}_{device}`` dir; that dir itself; a token dir in it
    (then only that token is visible); or the original tools' ``ait_dump/`` / ``msit_dump_*/`` roots with
    ``torch_tensors/{device}_{PID}/`` inside (or a folder holding exactly one such root).
    ``allow_symlinks``: follow symlinks out of the dump (see :func:`load_torch_tensor`); None leaves it to the
    AIT_LLM_ALLOW_SYMLINKS environment variable.
    """
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):
        is_dir = False
    if not is_dir:
        raise LayoutError(f"{path}: not a directory (expected a torch dump dir, its {{PID}}_{{device}} dir or a token dir)")
    only_token: int | None = None
    if _DIGITS.fullmatch(path.name) and _is_rank_dir(path.parent) and _RANK_DIR.match(path.parent.name):
        only_token, rank = int(path.name), path.parent
    else:
        ranks = _rank_candidates(path)
        if not ranks:
            raise LayoutError(f"{path}: no torch dump found (no {{PID}}_{{device}} dir with {MODEL_TREE} or token dirs)")
        if len(ranks) > 1:
            names = ", ".join(str(r.relative_to(path)) for r in ranks)
            raise LayoutError(f"{path}: holds {len(ranks)} torch dumps ({names}); pass one of them")
        rank = ranks[0]
    tree_path = rank / MODEL_TREE
    if not tree_path.is_file():
        raise LayoutError(f"{rank}: no {MODEL_TREE} beside the token dirs (the dump was cut short or filtered out)")
    tree = load_model_tree(tree_path, allow_symlinks=allow_symlinks)
    tokens = _token_dirs(rank)
    if only_token is not None:
        tokens = {only_token: tokens[only_token]}
    return TorchDump(root=rank, tree=tree, token_dirs=tokens, allow_symlinks=allow_symlinks)


# -- model_tree.json -------------------------------------------------------------------------------------------------

def load_model_tree(path: str | Path, *, max_bytes: int | None = None,
                    allow_symlinks: bool | None = None) -> TorchModule:
    """Parse ``model_tree.json`` into :class:`TorchModule` nodes with ``order`` and ``depth`` filled in.

    Our files carry ``exec_order`` per node. The original tool's files do not; their order is then the file
    order (which the original sorted by when a module's forward *finished*, never-run modules first).
    A file with trailing garbage (the original rewrote it without truncating) is read up to the end of its
    JSON value, with a warning. Size: ``max_bytes``, else AIT_LLM_MAX_JSON_BYTES, else 512 MiB.
    """
    path = Path(path)
    raw = read_bounded(path, max_json_bytes(max_bytes), what="model tree", allow_symlinks=allow_symlinks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: cannot read model tree (not UTF-8 text at byte {exc.start})") from None
    try:
        obj, end = json.JSONDecoder().raw_decode(text, _skip_ws(text, 0))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if _skip_ws(text, end) < len(text):
        warnings.warn(f"{path}: ignored {len(text) - end} bytes of trailing data after the model tree", stacklevel=2)
    return parse_model_tree(obj, path)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def parse_model_tree(obj: Any, path: str | Path | None = None) -> TorchModule:
    """Build the tree from an already-parsed JSON object (see :func:`load_model_tree`)."""
    where = str(path) if path is not None else "model tree"
    root = _node(obj, where, "$", None, 0)
    stack = [(root, obj)]
    exec_orders: dict[int, int] = {}  # id(TorchModule) -> exec_order, for nodes that have one and ran
    has_exec_order = "exec_order" in obj
    while stack:
        module, raw = stack.pop()
        if has_exec_order:
            exec_orders[id(module)] = _exec_order(raw, where, module.name)
        children = raw.get("children", [])
        if not isinstance(children, list):
            raise FormatError(f"{where}: 'children' of {module.name!r} is {type(children).__name__}, not a list")
        if children and module.depth + 1 > MAX_TREE_DEPTH:
            raise FormatError(f"{where}: tree deeper than {MAX_TREE_DEPTH} levels at {module.name!r}")
        for index, raw_child in enumerate(children):
            child = _node(raw_child, where, f"{module.name}.children[{index}]", module, module.depth + 1)
            module.children.append(child)
            stack.append((child, raw_child))
    if has_exec_order:
        _sort_by_first_run(root, exec_orders)
    _number(root, exec_orders if has_exec_order else None)
    return root


def _node(raw: Any, where: str, at: str, parent: TorchModule | None, depth: int) -> TorchModule:
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: node {at} is {type(raw).__name__}, not an object")
    name, type_ = raw.get("name"), raw.get("type")
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: node {at} has no 'name' string")
    if any(c in name for c in "/\\\0") or name in (".", ".."):
        # The name is a folder under each token dir: "../../x" would read outside the dump.
        raise FormatError(f"{where}: node {at} name {name[:80]!r} cannot be a module folder name")
    if not isinstance(type_, str):
        raise FormatError(f"{where}: node {name!r} has no 'type' string")
    return TorchModule(name=name, type=type_, parent=parent, depth=depth)


def _exec_order(raw: dict, where: str, name: str) -> int:
    value = raw.get("exec_order", -1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where}: 'exec_order' of {name!r} is {value!r}, not an int")
    return value


_NEVER_RAN = float("inf")


def _sort_by_first_run(root: TorchModule, exec_orders: dict[int, int]) -> None:
    """Sort each node's children by the first run in their subtree; never-run subtrees last, in file order."""
    first: dict[int, float] = {}
    for module in reversed(list(root.walk())):  # children before parents
        own = exec_orders[id(module)]
        # ints and inf compare exactly; float(own) would overflow on a 400-digit exec_order
        first[id(module)] = min([own if own >= 0 else _NEVER_RAN] + [first[id(c)] for c in module.children])
        module.children = [c for _, c in sorted(enumerate(module.children), key=lambda ic: (first[id(ic[1])], ic[0]))]


def _number(root: TorchModule, exec_orders: dict[int, int] | None) -> None:
    """Fill ``order``: by exec_order for modules that ran, then the rest in pre-order (file order without it)."""
    modules = list(root.walk())
    ran = [] if exec_orders is None else sorted(
        (m for m in modules if exec_orders[id(m)] >= 0), key=lambda m: exec_orders[id(m)])
    ran_ids = {id(m) for m in ran}
    for order, module in enumerate(ran + [m for m in modules if id(m) not in ran_ids]):
        module.order = order


# -- tensors ---------------------------------------------------------------------------------------------------------

def load_torch_tensor(path: str | Path, *, allow_symlinks: bool | None = None,
                      max_bytes: int = DEFAULT_MAX_BIN_BYTES) -> RawTensor:
    """Read one dumped tensor without copying it: .pth/.pt and .npy memory-mapped.

    A zip-format .pth holding one plain tensor is mapped without importing torch (:mod:`.pth_zip`); anything
    else goes through ``torch.load`` with ``weights_only=True``: a pickle that would call arbitrary code (a dump
    is a file somebody gave you) is refused with :class:`FormatError`, as is any content that is not a single
    tensor.
    bf16 comes back as uint16 bit patterns with ``dtype="bfloat16"``. A symlink out of the dump root is refused
    unless ``allow_symlinks`` (default: the AIT_LLM_ALLOW_SYMLINKS environment variable). ``max_bytes`` bounds
    what is inflated or materialised in memory (a compressed member, a strided view): beyond it the file is refused.
    """
    path = as_path(path)
    why = outside_dump_root(path, allow_symlinks=allow_symlinks)
    if why:
        raise FormatError(f"{path}: {why}")
    if path.suffix != ".npy":
        raw = read_plain_tensor(path, max_bytes=max_bytes)  # checks the file it opened is a regular one (FIFOs are opened non-blocking)
        if raw is not None:
            return raw
    _check_regular(path)
    if path.suffix == ".npy":
        return _load_npy(path)
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of plain pickles just before refusing them; the refusal says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = _torch_load(torch, path)
    except pickle.UnpicklingError as exc:
        raise FormatError(f"{path}: refused by a weights-only torch.load ({_unpickler_reason(exc)}): not a plain "
                          f"tensor file, and pickles that would run code are never loaded") from None
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise FormatError(f"{path}: not a torch tensor file ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(obj, torch.Tensor):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    return _raw_from_torch(obj, path, max_bytes)


def _check_regular(path: Path) -> None:
    """Refuse a FIFO or device before torch/numpy open it: reading one would block or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat_mod.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file")


def _torch_load(torch: Any, path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    # Legacy (pre-zip) torch.save files cannot be memory-mapped; read them whole, still weights-only.
    return torch.load(path, weights_only=True, mmap=False, map_location="cpu")


def _unpickler_reason(exc: BaseException) -> str:
    """The one informative line of torch's multi-paragraph weights-only refusal."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if marker else []
    reason = lines[0].split(" Please use", 1)[0] if lines else _first_line(exc)
    return reason[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:200]


def _raw_from_torch(tensor: Any, path: Path, max_bytes: int) -> RawTensor:
    import torch

    tensor = tensor.detach()
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise FormatError(f"{path}: {tensor.layout} / quantized tensors are not supported")
    if not tensor.is_contiguous():  # every pass reads it flat: materialised, within the limit
        need = tensor.numel() * tensor.element_size()
        if need > max_bytes:
            raise FormatError(f"{path}: a strided view of {tensor.numel()} elements (e.g. an expand()ed tensor); "
                              f"comparing it needs {need} bytes, over the limit of {max_bytes}; refused")
        tensor = tensor.contiguous()
    shape = tuple(tensor.shape)
    try:
        if tensor.dtype == torch.bfloat16:
            return RawTensor(data=tensor.view(torch.int16).numpy().view(np.uint16), dtype="bfloat16",
                             shape=shape, path=path)
        data = tensor.numpy()
    except (TypeError, RuntimeError) as exc:
        raise FormatError(f"{path}: dtype {str(tensor.dtype).replace('torch.', '')} cannot be read "
                          f"({_first_line(exc)})") from None
    return RawTensor(data=data, dtype=_numpy_dtype_name(data.dtype, path), shape=shape, path=path)


_NUMPY_NAMES = {"float32": "float32", "float16": "float16", "float64": "float64", "int8": "int8", "uint8": "uint8",
                "int16": "int16", "uint16": "uint16", "int32": "int32", "uint32": "uint32", "int64": "int64",
                "uint64": "uint64", "bool": "bool"}


def _numpy_dtype_name(dtype: np.dtype, path: Path) -> str:
    name = _NUMPY_NAMES.get(np.dtype(dtype).name)
    if name is None:
        raise FormatError(f"{path}: dtype {np.dtype(dtype).name} is not supported")
    return name


def _load_npy(path: Path) -> RawTensor:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{path}: not a readable .npy tensor ({_first_line(exc)})") from None
    if not isinstance(data, np.ndarray):
        raise FormatError(f"{path}: holds a {type(data).__name__}, not an array")
    return RawTensor(data=data, dtype=_numpy_dtype_name(data.dtype, path), shape=tuple(data.shape), path=path)
