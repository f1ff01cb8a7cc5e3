"""RawTensor: a tensor as it lies on disk, its payload usually memory-mapped, never converted until asked."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from .dtypes import widen

DEFAULT_CHUNK = 1 << 18  # elements per chunk in fused passes: 2 MiB of float64


@dataclass
class RawTensor:
    """A tensor read from a dump.

    ``data`` is a flat numpy array of the storage dtype (a read-only view of the file's memory map for
    .bin/.pth, a ``np.memmap`` for .npy; bf16 as uint16 patterns);
    ``dtype`` is the logical dtype name ("bfloat16", "float16", "float32", "int8", ...); ``shape`` the logical shape.
    """

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    path: Path | None = None

    @property
    def numel(self) -> int:
        return int(prod(self.shape)) if self.shape else int(self.data.size)

    def to_float64(self) -> np.ndarray:
        """The whole tensor widened to float64, in its logical shape (for tests and small tensors)."""
        return widen(self.data.reshape(-1), self.dtype).reshape(self.shape)
