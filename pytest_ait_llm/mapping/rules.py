"""Op mapping rules: which ATB op types correspond to which torch module types, and which tensor file on each side.

A rule is written ``Type[_stem]`` on each side, as in the original ``op_mapping_file.json``:
``"CommonLayer_outtensor0": ["GLMBlock_output_0", "BloomBlock_output_0"]`` pairs the ``outtensor0.bin`` of an ATB op
of type ``CommonLayer`` with the ``output_0.pth`` of a torch module of type ``GLMBlock``.
Unlike the original, the stem is recognised by its shape (``outtensorN``/``intensorN`` on the ATB side,
``output``/``output_N``/``input_N`` on the torch side), so type names that contain ``_`` work, and a rule without a
stem compares *all* output tensors index by index instead of silently finding nothing.

Types are matched whole, with two documented patterns and no substrings (``Embedding`` must not match
``RotaryEmbedding``):
- ATB side: an op whose type, or whose name without its ``_N`` indices, *ends with* the key: ``CommonLayer`` matches
  the op ``Bloom7bCommonLayer_3`` (ATB graph names carry a model prefix);
- torch side: a module whose type is the value, or the value behind the model's family prefix: ``MLP`` matches
  ``LlamaMLP`` in a Llama (family ``Llama``, from ``LlamaForCausalLM``/``LlamaDecoderLayer``, see
  :func:`family_prefixes`); ``Embedding`` matches ``Embedding`` but never ``LlamaRotaryEmbedding``.
Rules are indexed by type, so matching costs a few dictionary look-ups per op, whatever the number of rules.

The built-in table is immutable; a user's file is merged over it into a new :class:`MappingTable` (the original
wrote user entries into a module-level dict that leaked across calls).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, NamedTuple
from pathlib import Path

from ..errors import MappingError
from ..formats.safe_io import max_json_bytes, read_bounded

MAPPING_FILE_NAME = "op_mapping_file.json"

_ATB_STEM = re.compile(r"^(?P<type>.+?)_(?P<stem>(?:out|in)tensor\d+)$")
_TORCH_STEM = re.compile(r"^(?P<type>.+?)_(?P<stem>(?:output|input)(?:_\d+)*)$")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class Side(NamedTuple):
    """One side of a rule: a type name (matched as the module docstring says) and optionally the file stem.

    A named tuple (as is :class:`MappingRule`): a mapping file of 200k rules builds 600k of them."""

    type: str
    stem: str | None = None

    def __str__(self) -> str:
        return f"{self.type}_{self.stem}" if self.stem else self.type


class MappingRule(NamedTuple):
    atb: Side
    torch: Side
    source: str  # "builtin" or the mapping file's path

    def matches_atb(self, op_type: str, op_name: str = "") -> bool:
        return any(name.endswith(self.atb.type) for name in (op_type, op_base_name(op_name)) if name)

    def matches_torch(self, module_type: str, families: Iterable[str] = ()) -> bool:
        return self.torch.type in torch_type_keys(module_type, families)


def op_base_name(op_name: str) -> str:
    """``Bloom7bCommonLayer_3_1`` -> ``Bloom7bCommonLayer``: an ATB op name without its position indices."""
    return re.sub(r"(_\d+)+$", "", op_name)


def torch_type_keys(module_type: str, families: Iterable[str] = ()) -> set[str]:
    """The rule types that match ``module_type``: itself, and what follows a family prefix (``LlamaMLP`` -> ``MLP``)."""
    keys = {module_type}
    keys.update(module_type[len(f):] for f in families if f and module_type.startswith(f) and len(module_type) > len(f))
    return keys


_FAMILY_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "PreTrainedModel", "DecoderLayer",
                    "Model", "Layer", "Block")


def family_prefixes(type_names: Iterable[str]) -> frozenset[str]:
    """Model family prefixes from the model's root and layer types: ``LlamaForCausalLM`` and ``LlamaDecoderLayer``
    give ``Llama``, ``BloomBlock`` gives ``Bloom``, ``GPTNeoXLayer`` gives ``GPTNeoX``.

    Only these types are asked (a ``RotaryLayer`` elsewhere in the tree must not make ``Rotary`` a family)."""
    out = set()
    for name in type_names:
        head = name.split("For", 1)[0] if "For" in name[1:] else name
        for suffix in _FAMILY_SUFFIXES:
            if head.endswith(suffix) and len(head) > len(suffix):
                head = head[:-len(suffix)]
                break
        if head != name:
            out.add(head)
    return frozenset(out)


def parse_atb_side(text: str) -> Side:
    m = _ATB_STEM.match(text) if "tensor" in text else None
    return Side(m["type"], m["stem"]) if m else Side(text)


def parse_torch_side(text: str) -> Side:
    m = _TORCH_STEM.match(text) if "put" in text else None
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
    torch_sides: dict[str, Side] = {}  # values repeat ("Linear" for many keys): parse each once
    out = []
    for key, values in entries:
        atb = parse_atb_side(key)
        for value in values:
            side = torch_sides.get(value)
            if side is None:
                side = torch_sides[value] = parse_torch_side(value)
            out.append(MappingRule(atb, side, source))
    return tuple(out)


@dataclass(frozen=True)
class MappingTable:
    """An ordered, immutable list of rules: user rules first (they win), then the built-ins."""

    rules: tuple[MappingRule, ...]

    @classmethod
    def builtin(cls) -> MappingTable:
        return cls(_rules(_BUILTIN, "builtin"))

    def merged(self, user_rules: tuple[MappingRule, ...]) -> MappingTable:
        return MappingTable(tuple(user_rules) + self.rules)

    @cached_property
    def _by_atb_type(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            index.setdefault(rule.atb.type, []).append(i)
        return index

    @cached_property
    def _by_torch_type(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            index.setdefault(rule.torch.type, []).append(i)
        return index

    def atb_rule_indices(self, op_type: str, op_name: str = "") -> list[int]:
        """Positions (in precedence order) of the rules whose ATB side matches: look-ups of every suffix of the
        op's type and base name, not a scan of the rules."""
        found: set[int] = set()
        for name in {op_type, op_base_name(op_name)}:
            for start in range(len(name)):
                found.update(self._by_atb_type.get(name[start:], ()))
        return sorted(found)

    def torch_rule_indices(self, module_type: str, families: Iterable[str] = ()) -> set[int]:
        """Positions of the rules whose torch side matches ``module_type``."""
        return {i for key in torch_type_keys(module_type, families) for i in self._by_torch_type.get(key, ())}

    def rules_for_atb(self, op_type: str, op_name: str = "") -> list[MappingRule]:
        return [self.rules[i] for i in self.atb_rule_indices(op_type, op_name)]


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
    out = dict(pairs)  # built in C: a 200k-key file spends its time here otherwise
    if len(out) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def mapping_table(mapping_dir: str | Path | None = None) -> MappingTable:
    """The built-in table, with the user's rules from ``mapping_dir`` (if given) taking precedence."""
    table = MappingTable.builtin()
    return table.merged(load_mapping_file(mapping_dir)) if mapping_dir else table
