"""aclDataType codes used in ATB .bin headers, and their numpy storage types.

numpy has no bfloat16: a bf16 tensor is stored as its raw 16-bit patterns (``uint16``) and widened on demand
(see :func:`widen`), which is exact because bf16 is the upper half of an fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AclDtype:
    code: int
    name: str  # logical name, torch-style: "float16", "bfloat16", "int8", ...
    storage: np.dtype  # numpy dtype of the raw payload

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_float(self) -> bool:
        return self.name in ("float32", "float16", "bfloat16", "float64")


def _d(code: int, name: str, storage: str) -> AclDtype:
    return AclDtype(code, name, np.dtype(storage))


ACL_DTYPES: dict[int, AclDtype] = {
    d.code: d
    for d in (
        _d(0, "float32", "<f4"),
        _d(1, "float16", "<f2"),
        _d(2, "int8", "i1"),
        _d(3, "int32", "<i4"),
        _d(4, "uint8", "u1"),
        _d(6, "int16", "<i2"),
        _d(7, "uint16", "<u2"),
        _d(8, "uint32", "<u4"),
        _d(9, "int64", "<i8"),
        _d(10, "uint64", "<u8"),
        _d(11, "float64", "<f8"),
        _d(12, "bool", "?"),
        _d(27, "bfloat16", "<u2"),
    )
}
BY_NAME: dict[str, AclDtype] = {d.name: d for d in ACL_DTYPES.values()}

#: Codes real dumps may contain that hold no comparable numbers (string, complex, int4, uint1, undefined).
KNOWN_UNSUPPORTED = {13: "string", 16: "complex64", 17: "complex128", 33: "complex32", 29: "int4", 30: "uint1", -1: "undefined"}


def by_name(name: str) -> AclDtype:
    """The AclDtype for a logical dtype name ("bfloat16", "torch.float16", "float16" ...)."""
    key = str(name).replace("torch.", "")
    key = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16",
           "fp16": "float16", "fp32": "float32"}.get(key, key)
    return BY_NAME[key]


def widen(chunk: np.ndarray, logical: str) -> np.ndarray:
    """A float64 copy of a raw storage chunk whose logical dtype is ``logical`` (bf16 patterns handled)."""
    if logical == "bfloat16":
        return (chunk.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return chunk.astype(np.float64)
