"""The original tool's compare approach (ait ``llm compare``), re-implemented for the benchmark from its documented
behaviour (/work/shared/spec/ait-llm-compare-facts.md sections 1 and 5), written from scratch.

What makes it the original approach, and what we measure against:
- an ATB ``.bin`` is read whole into memory, its header scanned byte by byte up to ``$End=1``, and the payload
  sliced out (a second copy) and wrapped with ``torch.frombuffer``;
- a golden ``.pth`` is loaded whole with ``torch.load`` (no memory map);
- both tensors are flattened and converted to float32 (``.reshape(-1).float()``), then each metric is its own
  pass over them, with torch's full-size temporaries: the finiteness check of each side, the stats columns
  (max/min/mean of each side), cosine (in float64, as the original), max/mean relative error, max/mean absolute
  error, KL divergence over the whole flattened tensor, relative euclidean distance.
torch uses all cores for these ops, as the original does.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

FLOAT_EPSILON = torch.finfo(torch.float32).eps
_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.int8, 3: torch.int32, 9: torch.int64, 12: torch.bool,
           27: torch.bfloat16}


def read_atb_bin(path: Path) -> torch.Tensor:
    with open(path, "rb") as fh:
        data = fh.read()
    dtype, dims, payload = 0, [], b""
    start = 0
    for i, byte in enumerate(data):  # byte by byte, as the original reader
        if byte != ord("\n"):
            continue
        line = data[start:i].decode("utf-8")
        start = i + 1
        key, value = line.split("=")[:2]
        if key == "$End":
            payload = data[i + 1:]
            break
        if key == "dtype":
            dtype = int(value)
        elif key == "dims":
            dims = [int(d) for d in value.split(",")]
    with warnings.catch_warnings():  # the original wraps the immutable bytes as they are; torch warns about that
        warnings.simplefilter("ignore")
        return torch.frombuffer(payload, dtype=_DTYPES[dtype]).view(dims)


def read_data(path: Path) -> torch.Tensor:
    if path.suffix == ".bin":
        return read_atb_bin(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def cosine_similarity(g, m):
    if torch.all(g == 0) and torch.all(m == 0):
        return 1.0
    return round(torch.cosine_similarity(g.double(), m.double(), dim=0).item(), 10)


def _masked(g, values, dtype):
    return torch.where(torch.abs(g) > FLOAT_EPSILON, values, torch.tensor(0, dtype=dtype))


def max_relative_error(g, m):
    return _masked(g, torch.abs(m / g - 1), g.dtype).max().item()


def mean_relative_error(g, m):
    return _masked(g, torch.abs(m / g - 1), m.dtype).mean().item()


def max_absolute_error(g, m):
    return _masked(g, torch.abs(m - g), m.dtype).max().item()


def mean_absolute_error(g, m):
    return _masked(g, torch.abs(m - g), m.dtype).mean().item()


def kl_divergence(g, m):
    return max(F.kl_div(F.log_softmax(m, dim=-1), F.softmax(g, dim=-1), reduction="sum").item(), 0)


def relative_euclidean_distance(g, m):
    square = (g ** 2).sum()
    if square ** 0.5 <= FLOAT_EPSILON:
        return 0.0
    return ((m - g) ** 2).sum().div(square).item()  # ait: no square root


METRICS = {f.__name__: f for f in (cosine_similarity, max_relative_error, mean_relative_error, max_absolute_error,
                                   mean_absolute_error, kl_divergence, relative_euclidean_distance)}


def compare_pair(golden_path: Path, my_path: Path) -> dict:
    golden, my = read_data(golden_path), read_data(my_path)
    g, m = golden.reshape(-1).float(), my.reshape(-1).float()
    row: dict = {}
    reasons = []
    if len(g) != len(m):
        reasons.append("data shape doesn't match.")
    if not torch.all(torch.isfinite(g)):
        reasons.append("golden_data includes NAN or inf.")
    if not torch.all(torch.isfinite(m)):
        reasons.append("my_data includes NAN or inf.")
    if not reasons:
        for name, func in METRICS.items():
            row[name] = func(g, m)
    row["cmp_fail_reason"] = " ".join(reasons)
    for side, t in (("golden", golden), ("my", my)):
        row[f"{side}_dtype"], row[f"{side}_shape"] = str(t.dtype), str(list(t.shape))
        if 0 not in t.shape:
            f = t.float()
            row[f"{side}_max_value"], row[f"{side}_min_value"] = f.max().item(), f.min().item()
            row[f"{side}_mean_value"] = f.mean().item()
    return row


def compare_pairs(pairs: list[tuple[Path, Path]]) -> list[dict]:
    """One row per pair, one pair at a time (the original loops over pairs in one process)."""
    return [compare_pair(g, m) for g, m in pairs]
