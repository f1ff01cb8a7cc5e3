"""The ranks of one tensor-parallel ATB run, as they lie on disk.

A TP port runs one process per NPU; each dumps into its own ``tensors/{device}_{pid}/`` with its own topology under
``model/{pid}/``. Given the dump root or any one rank's dir (as msit accepts), :func:`open_run` finds every rank of
the run and orders them. The order is taken from evidence: the ``rank``/``rankSize`` params that parallel ops
(``LinearParallelOperation`` and the like) carry in each rank's topology; without them, the device id order. What
cannot be read (a rank without topology, a rank whose params contradict the others) is kept as one line naming the
rank dir, and the other ranks are still used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AitLlmError, LayoutError
from .atb_bin import read_bin
from .dtypes import widen
from .atb_layout import AtbDump, AtbRank, open_atb_dump
from .atb_topology import AtbTopology


@dataclass
class RankedRun:
    """The ranks of one run in rank order, how that order was found, and the ranks that could not be used."""

    dump: AtbDump
    ranks: list[AtbRank]  # rank order: ranks[r] holds rank r's shards
    order_evidence: str  # "rank params" or "device ids"
    expected: int = 0  # the rankSize the topologies state (0: none stated)
    problems: list[str] = field(default_factory=list)  # one line per rank dir that is not used, naming it

    @property
    def size(self) -> int:
        return len(self.ranks)

    def name(self, index: int) -> str:
        return self.ranks[index].path.name


def rank_params(topology: AtbTopology) -> set[tuple[int, int]]:
    """The (rank, rankSize) pairs stated by the params of ``topology``'s ops (empty for a single-device port)."""
    found: set[tuple[int, int]] = set()
    for op in topology.walk():
        param = op.param if isinstance(op.param, dict) else {}
        rank, size = param.get("rank"), param.get("rankSize")
        if isinstance(rank, int) and isinstance(size, int) and not isinstance(rank, bool) and size > 1:
            found.add((rank, size))
    return found


def open_run(path: str | os.PathLike | AtbDump, *, allow_symlinks: bool | None = None) -> RankedRun:
    """Every rank of the run that ``path`` (a dump root, a rank dir or a token dir) belongs to, in rank order.

    A rank dir or token dir names one rank; the others are its siblings under the same ``tensors/``. Ranks whose
    topology cannot be read, or whose rank params clash with another's, are listed in ``problems`` and left out.
    """
    dump = path if isinstance(path, AtbDump) else open_atb_dump(path, allow_symlinks=allow_symlinks)
    full = open_atb_dump(dump.root, allow_symlinks=allow_symlinks) if not isinstance(path, AtbDump) else dump
    problems: list[str] = []
    usable: list[tuple[AtbRank, set[tuple[int, int]]]] = []
    for rank in full.ranks:
        try:
            usable.append((rank, rank_params(rank.topology())))
        except AitLlmError as exc:
            problems.append(f"rank dir {rank.path}: not compared: {exc}")
    if not usable:
        raise LayoutError(problems[0] if problems else f"{full.root}: no rank dirs")
    stated = {rank.path.name: params for rank, params in usable}
    consistent = all(len(p) == 1 for p in stated.values())
    if consistent and len({next(iter(p))[1] for p in stated.values()}) == 1:
        by_index: dict[int, AtbRank] = {}
        for rank, params in usable:
            index = next(iter(params))[0]
            if index in by_index:
                problems.append(f"rank dir {rank.path}: its topology says rank {index}, as {by_index[index].path.name}'s "
                                f"does; left out")
                continue
            by_index[index] = rank
        size = next(iter(next(iter(stated.values()))))[1]
        for index in range(size):
            if index not in by_index:
                problems.append(f"rank {index} of {size}: no readable rank dir under {full.root / 'tensors'} (a rank "
                                f"that died before dumping?); its shards are missing")
        ranks = [by_index[i] for i in sorted(by_index)]
        return RankedRun(full, ranks, "rank params", expected=size, problems=problems)
    for rank, params in usable:
        if len(params) > 1:
            problems.append(f"rank dir {rank.path}: its topology states several ranks {sorted(params)}; "
                            f"ranks ordered by device id")
    ranks = sorted((r for r, _ in usable), key=lambda r: (r.device_id, r.pid))
    return RankedRun(full, ranks, "device ids", problems=problems)


def token_problems(run: RankedRun, tokens: set[int]) -> list[tuple[int, str]]:
    """(token, line) for each wanted token that some rank lacks: that rank's shards of the token are missing."""
    out = []
    for token in sorted(tokens):
        missing = [r.path for r in run.ranks if token not in r.token_dirs]
        if missing and len(missing) < run.size:
            out.append((token, f"token {token}: missing on {', '.join(str(p) for p in missing)} (a rank cut short?)"))
    return out


#: Elements read from the start of each rank's file to tell replicated tensors from shards.
SAMPLE = 4096
#: Relative distance between two ranks' samples below which they hold the same tensor: a replicated tensor with an
#: all-reduce or broadcast bug still lies far below it (a 5 % error is 0.05); two shards of different heads or
#: columns lie near sqrt(2).
SAME_TENSOR = 0.5


def content_evidence(paths: list[Path], *, allow_symlinks: bool | None = None, load=None) -> str:
    """Whether the ranks' files of one op output hold the same tensor ("same"), different slices ("distinct") or
    cannot tell ("unknown": fewer than two readable files, all zero, or different shapes).

    Only the first SAMPLE elements are read: a replicated tensor agrees everywhere, shards differ from the start.
    ``load``: path -> RawTensor for files that are not ATB .bin (a TP golden's .pth files).
    """
    samples = []
    for path in paths:
        try:
            t = load(path) if load is not None else read_bin(path, allow_symlinks=allow_symlinks)
        except (AitLlmError, OSError):
            continue
        flat = t.data.reshape(-1)[: min(SAMPLE, t.numel)]
        samples.append((tuple(t.shape), widen(flat, t.dtype)))
    if len(samples) < 2 or len({s for s, _ in samples}) > 1:
        return "unknown"
    base = samples[0][1]
    norm = float(np.sqrt(np.dot(base, base)))
    if not np.isfinite(norm) or norm == 0:
        return "unknown"
    for _, other in samples[1:]:
        diff = other - base
        if not float(np.sqrt(np.dot(diff, diff))) / norm <= SAME_TENSOR:
            return "distinct"
    return "same"


def is_tensor_parallel(run: RankedRun) -> bool:
    """The topologies state a parallel group of two or more ranks (``rank``/``rankSize`` params)."""
    return run.order_evidence == "rank params" and run.expected > 1


def torch_rank_dirs(path: str | os.PathLike) -> list[Path]:
    """The ``{PID}_{device}`` dirs of a torch dump dir that holds several (a TP golden run), in device order; one
    or none: []. The device number (``npu3`` -> 3) orders them, then the name."""
    from .torch_layout import _rank_candidates

    p = Path(path)
    try:
        found = _rank_candidates(p) if p.is_dir() else []
    except OSError:
        return []
    if len(found) < 2:
        return []

    def device(d: Path) -> tuple[int, str]:
        parts = d.name.split("_")
        digits = [int("".join(c for c in part if c.isdigit())) for part in parts
                  if not part.isdigit() and any(c.isdigit() for c in part)]
        return (digits[0] if digits else 1 << 30, d.name)

    return sorted(found, key=device)
