"""The files that hold one op's (or module's) tensors in a dump."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OpFiles:
    """Tensor files of one ATB op or torch module for one token: inputs and outputs, each in numeric order."""

    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

