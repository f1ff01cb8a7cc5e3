"""Op mapping rules: which ATB op types correspond to which torch module types, and which tensor file on each side.

A rule is written ``Type[_stem]`` on each side, as in the original ``op_mapping_file.json``:
``"CommonLayer_outtensor0": ["GLMBlock_output_0", "BloomBlock_output_0"]`` pairs the ``outtensor0.bin`` of an ATB op
whose type contains ``CommonLayer`` with the ``output_0.pth`` of a torch module whose type contains ``GLMBlock``.
Unlike the original, the stem is recognised by its shape (``outtensorN``/``intensorN`` on the ATB side,
``output``/``output_N``/``input_N`` on the torch side), so type names that contain ``_`` work, and a rule without a
stem compares *all* output tensors index by index instead of silently finding nothing.

The built-in table is immutable; a user's file is merged over it into a new :class:`MappingTable` (the original
wrote user entries into a module-level dict that leaked across calls).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MappingError
from ..formats.safe_io import max_json_bytes, read_bounded

MAPPING_FILE_NAME = "op_mapping_file.json"

_ATB_STEM = re.compile(r"^(?P<type>.+?)_(?P<stem>(?:out|in)tensor\d+)$")
_TORCH_STEM = re.compile(r"^(?P<type>.+?)_(?P<stem>(?:output|input)(?:_\d+)*)$")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Side:
    """One side of a rule: a type name matched by substring, and optionally the file stem to compare."""

    type: str
    stem: str | None = None

    def __str__(self) -> str:
        return f"{self.type}_{self.stem}" if self.stem else self.type


@dataclass(frozen=True)
class MappingRule:
    atb: Side
    torch: Side
    source: str  # "builtin" or the mapping file's path

    def matches_atb(self, op_type: str, op_name: str = "") -> bool:
        base = re.sub(r"(_\d+)+$", "", op_name)
        return self.atb.type in op_type or (bool(base) and self.atb.type in base)

    def matches_torch(self, module_type: str) -> bool:
        return self.torch.type in module_type


def parse_atb_side(text: str) -> Side:
    m = _ATB_STEM.match(text)
    return Side(m["type"], m["stem"]) if m else Side(text)


def parse_torch_side(text: str) -> Side:
    m = _TORCH_STEM.match(text)
    return Side(m["type"], m["stem"]) if m else Side(text)


# (ATB key, torch values). The first two are the original built-in type table, the next four its built-in custom
# table; the embedding rules are ours (ops outside the layers are paired too).
_BUILTIN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LayerNormOperation", ("LayerNorm",)),
    ("LinearOperation", ("Linear",)),
    ("LinearParallelOperation", ("Linear",)),  # a row-parallel Linear of a tensor-parallel port
    ("CommonLayer_outtensor0", ("GLMBlock_output_0", "BloomBlock_output_0")),
    ("MlpGateLayerV2", ("BloomMLP", "MLP")),
    ("RmsNormOperation", ("RMSNorm",)),
    ("SelfAttentionOperation", ("CoreAttention",)),
    ("GatherOperation", ("Embedding",)),
    ("WordEmbedding", ("Embedding",)),
)


def _rules(entries, source: str) -> tuple[MappingRule, ...]:
    return tuple(
        MappingRule(parse_atb_side(key), parse_torch_side(value), source)
        for key, values in entries
        for value in values
    )


@dataclass(frozen=True)
class MappingTable:
    """An ordered, immutable list of rules: user rules first (they win), then the built-ins."""

    rules: tuple[MappingRule, ...]

    @classmethod
    def builtin(cls) -> MappingTable:
        return cls(_rules(_BUILTIN, "builtin"))

    def merged(self, user_rules: tuple[MappingRule, ...]) -> MappingTable:
        return MappingTable(tuple(user_rules) + self.rules)

    def rules_for_atb(self, op_type: str, op_name: str = "") -> list[MappingRule]:
        return [r for r in self.rules if r.matches_atb(op_type, op_name)]


def _validated_entries(obj, path: Path):
    if not isinstance(obj, dict):
        raise MappingError(f"{path}: top level must be a JSON object of ATB op type -> torch module type(s)")
    entries = []
    for key, value in obj.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            raise MappingError(f"{path}: key {key!r} must be letters, digits and '_' only")
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise MappingError(f"{path}: value of {key!r} must be a string or a non-empty list of strings")
        for v in values:
            if not isinstance(v, str) or not _NAME.fullmatch(v):
                raise MappingError(f"{path}: value {v!r} of key {key!r} must be letters, digits and '_' only")
        entries.append((key, tuple(values)))
    return entries


def load_mapping_file(path_or_dir: str | Path) -> tuple[MappingRule, ...]:
    """The rules of a user's ``op_mapping_file.json`` (a directory holding it, or the file itself).

    Values may be a string or a list of strings (the original iterated a string character by character).
    Any invalid key or value is an error naming it, never a silent fallback to the built-ins; so is a key given
    twice (JSON parsers keep the last one silently). The file is read with the JSON size limit
    (AIT_LLM_MAX_JSON_BYTES, default 512 MiB).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MAPPING_FILE_NAME
    if not path.is_file():
        raise MappingError(f"{path}: mapping file not found (expected {MAPPING_FILE_NAME} in the given directory)")
    raw = read_bounded(path, max_json_bytes(), what="mapping file", error=MappingError)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise MappingError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MappingError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise MappingError(f"{path}: key {exc.args[0]!r} is given twice") from None
    except RecursionError:
        raise MappingError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise MappingError(f"{path}: invalid JSON ({exc})") from None
    return _rules(_validated_entries(obj, path), str(path))


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def mapping_table(mapping_dir: str | Path | None = None) -> MappingTable:
    """The built-in table, with the user's rules from ``mapping_dir`` (if given) taking precedence."""
    table = MappingTable.builtin()
    return table.merged(load_mapping_file(mapping_dir)) if mapping_dir else table
