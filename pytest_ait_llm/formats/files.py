"""The files that hold one op's (or module's) tensors in a dump."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OpFiles:
    """Tensor files of one ATB op or torch module for one token: inputs and outputs, each in numeric order."""

    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


_NUM = re.compile(r"(\d+)")


def numeric_key(path: Path) -> tuple:
    """Sort key that orders ``outtensor2`` before ``outtensor10`` (the original sorted as strings)."""
    parts = _NUM.split(Path(path).name)
    return tuple(int(p) if p.isdigit() else p for p in parts)
