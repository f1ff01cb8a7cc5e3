"""The directory layout of an ATB dump (ait ``ait_dump/`` or msit ``msit_dump_{ts}/``).

::

    {root}/tensors/{device}_{pid}/{token}/{id}_{opType}/{k}_{opType}/.../before|after/intensorN.bin|outtensorN.bin
    {root}/model/{pid}/{ModelName}.json        one or more topologies (e.g. *_Prefill.json and *_Decoder.json)
    {root}/layer/{pid}/{opName}.json           one file per layer op

The original tool took "the first listdir entry" of ``model/{pid}`` as the topology, so which one it used
depended on the filesystem. Here the choice is scored against the op folders actually present, with sorted
names as the tie-break, so it is the same on every machine.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError, LayoutError
from .atb_topology import AtbOp, AtbTopology, combine_topologies, load_topology
from .files import OpFiles

_DIGITS = re.compile(r"[0-9]+")
_EXPECTED = ("a dump root (ait_dump/ or msit_dump_*/ holding tensors/), a directory holding exactly one such root, "
             "tensors/{device}_{pid}/, or tensors/{device}_{pid}/{token}/")


def _rank_name(name: str) -> tuple[int, str] | None:
    """(device_id, pid text) of a ``{device}_{pid}`` folder name; the pid is what follows the last '_'."""
    device, sep, pid = name.rpartition("_")
    if sep and _DIGITS.fullmatch(device) and _DIGITS.fullmatch(pid):
        return int(device), pid
    return None


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir())
    except OSError:
        return []


def _is_dir(path: Path) -> bool:
    """``path.is_dir()`` that says False instead of raising (a 300-character op type is ENAMETOOLONG)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _is_root_name(name: str) -> bool:
    return name == "ait_dump" or name.startswith("msit_dump_")


@dataclass
class AtbRank:
    """One process's dump (``tensors/{device}_{pid}``): its token folders and its topology files."""

    device_id: int
    pid: int
    path: Path
    token_dirs: dict[int, Path]
    topology_paths: list[Path]
    layer_paths: list[Path] = field(default_factory=list)
    #: Follow symlinks that leave the dump root (None: the AIT_LLM_ALLOW_SYMLINKS environment variable decides).
    allow_symlinks: bool | None = field(default=None, compare=False)
    #: Topology files that failed to parse while choosing (one line each); the chosen one parsed.
    skipped_topologies: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _topology: AtbTopology | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def tokens(self) -> list[int]:
        return sorted(self.token_dirs)

    def topology(self) -> AtbTopology:
        """The topology that describes this rank's op folders (chosen once, then cached)."""
        if self._topology is None:
            self._topology = self._choose_topology()
        return self._topology

    def _folder_names(self) -> set[str]:
        names: set[str] = set()
        for token_dir in self.token_dirs.values():
            names.update(d.name for d in _subdirs(token_dir))
        return names

    def _choose_topology(self) -> AtbTopology:
        if not self.topology_paths:
            if self.layer_paths:
                return self._layer_topology()
            root = self.path.parent.parent
            raise LayoutError(f"{self.path}: no topology found: expected {root}/model/{self.pid}/*.json "
                              f"(or layer files {root}/layer/{self.pid}/*.json); dump with --type model")
        loaded: list[AtbTopology] = []
        errors: list[str] = []
        for path in sorted(self.topology_paths, key=lambda p: p.name):
            try:
                loaded.append(load_topology(path, allow_symlinks=self.allow_symlinks))
            except FormatError as exc:
                errors.append(str(exc))
        if not loaded:
            raise FormatError(errors[0])
        self.skipped_topologies = errors
        if len(loaded) == 1:
            return loaded[0]
        folders = self._folder_names()
        numbered_types = {name.partition("_")[2] for name in folders if _DIGITS.match(name)}

        def score(topo: AtbTopology) -> tuple[int, int, int]:
            exact = sum(1 for op in topo.ops if op.rel_dir in folders)
            by_type = sum(1 for op in topo.ops if op.op_type in numbered_types)
            return exact, by_type, -(len(topo.ops) - exact)

        best = loaded[0]
        best_score = score(best)
        for topo in loaded[1:]:  # strict '>' keeps the first by sorted name on ties
            s = score(topo)
            if s > best_score:
                best, best_score = topo, s
        return best

    def _layer_topology(self) -> AtbTopology:
        """A layer-only dump: each ``layer/{pid}/{opName}.json`` is one top-level op, ordered by its id."""
        parts = [load_topology(p, allow_symlinks=self.allow_symlinks) for p in self.layer_paths]

        def key(topo: AtbTopology) -> tuple[int, str]:
            first = topo.ops[0].folder if topo.ops else ""
            head = first.partition("_")[0]
            return (int(head) if head.isdigit() else 1 << 62, topo.path.name if topo.path else "")

        parts.sort(key=key)
        layer_dir = self.layer_paths[0].parent
        return combine_topologies(f"layers_{self.pid}", parts, layer_dir)


@dataclass
class AtbDump:
    """An opened ATB dump: its root and its ranks (one per ``{device}_{pid}`` folder), sorted by device then pid."""

    root: Path
    ranks: list[AtbRank]
    #: As given to :func:`open_atb_dump`; readers of this dump's tensors should pass it on to ``read_bin``.
    allow_symlinks: bool | None = field(default=None, compare=False)

    @property
    def tokens(self) -> list[int]:
        """Token (execution round) ids present in any rank, sorted."""
        ids: set[int] = set()
        for rank in self.ranks:
            ids.update(rank.token_dirs)
        return sorted(ids)


def _locate(p: Path) -> tuple[Path, str | None, str | None]:
    """(root, rank folder name or None, token folder name or None) for a path the user gave."""
    if (p / "tensors").is_dir():
        return p, None, None
    if p.name == "tensors" and p.parent != p:
        return p.parent, None, None
    if _rank_name(p.name) and p.parent.name == "tensors":
        return p.parent.parent, p.name, None
    if _DIGITS.fullmatch(p.name) and _rank_name(p.parent.name) and p.parent.parent.name == "tensors":
        return p.parent.parent.parent, p.parent.name, p.name
    roots = [d for d in _subdirs(p) if _is_root_name(d.name) and (d / "tensors").is_dir()]
    if len(roots) == 1:
        return roots[0], None, None
    if len(roots) > 1:
        names = ", ".join(d.name for d in roots)
        raise LayoutError(f"{p}: holds {len(roots)} ATB dump roots ({names}); pass one of them")
    raise LayoutError(f"{p}: not an ATB dump; expected {_EXPECTED}")


def open_atb_dump(path: str | os.PathLike, *, allow_symlinks: bool | None = None) -> AtbDump:
    """Open an ATB dump from its root, a directory holding one root, a rank dir or a token dir.

    A token dir restricts the dump to that token (and its rank); a rank dir to that rank. The topology is not
    read here (see :meth:`AtbRank.topology`), so opening is cheap even for dumps with many topologies.
    ``allow_symlinks``: follow symlinks that lead out of the dump root when reading its topology (and, through
    ``AtbDump.allow_symlinks``, its tensors); None leaves it to the AIT_LLM_ALLOW_SYMLINKS environment variable.
    """
    p = Path(path)
    if not _is_dir(p):
        raise LayoutError(f"{p}: no such directory; expected {_EXPECTED}")
    root, rank_only, token_only = _locate(p)
    tensors = root / "tensors"
    ranks: list[AtbRank] = []
    for rank_dir in _subdirs(tensors):
        parsed = _rank_name(rank_dir.name)
        if parsed is None or (rank_only is not None and rank_dir.name != rank_only):
            continue
        device_id, pid_text = parsed
        token_dirs = {int(d.name): d for d in _subdirs(rank_dir) if _DIGITS.fullmatch(d.name)}
        if token_only is not None:
            token_dirs = {tid: d for tid, d in token_dirs.items() if d.name == token_only}
        model_dir = root / "model" / pid_text
        layer_dir = root / "layer" / pid_text
        ranks.append(AtbRank(
            device_id=device_id,
            pid=int(pid_text),
            path=rank_dir,
            token_dirs=token_dirs,
            topology_paths=sorted(q for q in model_dir.glob("*.json") if q.is_file()),
            layer_paths=sorted(q for q in layer_dir.glob("*.json") if q.is_file()),
            allow_symlinks=allow_symlinks,
        ))
    if not ranks:
        raise LayoutError(f"{tensors}: no {{device}}_{{pid}} folders (e.g. 0_12345); expected {_EXPECTED}")
    ranks.sort(key=lambda r: (r.device_id, r.pid))
    return AtbDump(root=root, ranks=ranks, allow_symlinks=allow_symlinks)


def find_atb_dumps(path: str | os.PathLike, *, max_depth: int = 3) -> list[Path]:
    """Dump roots (``ait_dump``/``msit_dump_*`` holding ``tensors/``) at or below ``path``, sorted.

    The walk is breadth-first, at most ``max_depth`` levels deep, visits each real directory once (so symlink
    loops end) and does not descend into the roots it finds.
    """
    start = Path(path)
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    level = [start]
    for depth in range(max_depth + 1):
        following: list[Path] = []
        for d in level:
            try:
                st = d.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if (d / "tensors").is_dir() and (_is_root_name(d.name) or d == start):
                found.append(d)
                continue
            if depth < max_depth:
                following.extend(_subdirs(d))
        level = following
    return sorted(found)


def _tensor_files(folder: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"([0-9]+)\.bin")
    try:
        names = os.listdir(folder)
    except (OSError, ValueError):
        return []
    hits = [(int(m.group(1)), folder / name) for name in names if (m := pattern.fullmatch(name))]
    return [p for _, p in sorted(hits)]


def op_dir(token_dir: str | os.PathLike, op: AtbOp) -> Path | None:
    """The folder holding ``op``'s tensors under ``token_dir``, or None when the dump has none for it.

    When the top-level folder ``{id}_{opType}`` is missing but the dump numbers its top level differently
    (msit offsets it by the first op's id), the op's same-type rank picks among the ``{n}_{opType}``
    folders, sorted by n; only when their count equals the topology's, otherwise the match would be a guess.
    """
    base = Path(token_dir)
    direct = base / op.rel_dir
    if _is_dir(direct):
        return direct
    top = op
    while top.parent is not None:
        top = top.parent
    head, _, rest = op.rel_dir.partition("/")
    if _is_dir(base / head):
        return None  # the layer is there, this op's folder is not: nothing to resolve
    pattern = re.compile(r"([0-9]+)_" + re.escape(top.op_type))
    numbered = sorted((int(m.group(1)), d) for d in _subdirs(base) if (m := pattern.fullmatch(d.name)))
    if len(numbered) != top.type_count:
        return None
    resolved = numbered[top.type_index][1]
    resolved = resolved / rest if rest else resolved
    return resolved if _is_dir(resolved) else None


def op_files(token_dir: str | os.PathLike, op: AtbOp) -> OpFiles:
    """``op``'s tensor files in one token dir, each list in numeric order (outtensor2 before outtensor10).

    Outputs come from ``after/`` (the ait default), else ``before/``; inputs from ``before/`` (msit's
    inputs-before/outputs-after mode, which avoids in-place ops overwriting inputs), else ``after/``.
    """
    folder = op_dir(token_dir, op)
    if folder is None:
        return OpFiles()
    after, before = folder / "after", folder / "before"
    outputs = _tensor_files(after, "outtensor") or _tensor_files(before, "outtensor")
    inputs = _tensor_files(before, "intensor") or _tensor_files(after, "intensor")
    return OpFiles(inputs=inputs, outputs=outputs)
