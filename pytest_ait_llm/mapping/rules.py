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
Rules are indexed by type, so matching costs a few dictionary look-ups per op, whatever the number of rules; a
file's rules are kept as its validated JSON object (:class:`RuleFile`) and only those of the types that occur are
expanded into :class:`MappingRule` (a 200k-rule file is one parse and one validation pass, not 600k objects).

The built-in table is immutable; a user's file is merged over it into a new :class:`MappingTable` (the original
wrote user entries into a module-level dict that leaked across calls).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from ..errors import MappingError
from ..formats.safe_io import max_json_bytes, read_bounded

MAPPING_FILE_NAME = "op_mapping_file.json"

_ATB_STEM = re.compile(r"^(?P<type>.+?)_(?P<stem>(?:out|in)tensor\d+)$")
_TORCH_STEM = re.compile(r"^(?P<type>.+?)_(?P<stem>(?:output|input)(?:_\d+)*)$")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_NAME_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"


class Side(NamedTuple):
    """One side of a rule: a type name (matched as the module docstring says) and optionally the file stem."""

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

Rank = tuple[int, int, int]  # (file, key, value) positions: a rule's precedence, lowest first
_SCANS = 32  # keys of one file located by a scan before all are indexed (see RuleFile.position)


@dataclass(frozen=True, eq=False)
class RuleFile:
    """The validated rules of one mapping file (or of the built-ins): its JSON object, indexed by ATB type.

    ``entries`` maps each key to its value(s) as written (a string or a tuple of strings), in file order. A key
    without a stem is its own ATB type, so the object itself is the index; only the keys with a stem
    (``Type_outtensorN``, few) get an index by type. A :class:`MappingRule` is built only for the keys an op asks for.
    """

    source: str
    entries: dict[str, str | tuple[str, ...]]
    count: int  # number of rules (values)
    stemmed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # ATB type -> its keys with a stem

    @classmethod
    def of(cls, entries: dict[str, str | tuple[str, ...]], source: str, count: int) -> RuleFile:
        stemmed: dict[str, list[str]] = {}
        for key in [k for k in entries if "tensor" in k]:
            side = parse_atb_side(key)
            if side.stem is not None:
                stemmed.setdefault(side.type, []).append(key)
        return cls(source, entries, count, {t: tuple(keys) for t, keys in stemmed.items()})

    def __eq__(self, other) -> bool:
        return isinstance(other, RuleFile) and (self.source, self.entries) == (other.source, other.entries)

    __hash__ = None  # its dicts are not hashable

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[MappingRule]:
        for key in self.entries:
            yield from self.rules_of(key)

    @cached_property
    def _keys(self) -> list[str]:
        return list(self.entries)

    @cached_property
    def _positions(self) -> dict[str, int]:  # filled as keys are asked (few of a big file's keys ever are)
        return {}

    def position(self, key: str) -> int:
        """The key's position in the file: its precedence among this file's keys. Found by a scan (in C) for the
        first keys asked; past :data:`_SCANS`, all positions at once (a dict of every key is a large part of a big
        file's load, and a model's op types ask for few keys)."""
        known = self._positions
        if key not in known:
            if len(known) < _SCANS:
                known[key] = self._keys.index(key)
            else:
                known.update(zip(self._keys, range(len(self._keys))))
        return known[key]

    def rules_of(self, key: str) -> list[MappingRule]:
        values = self.entries[key]
        atb = parse_atb_side(key)
        values = (values,) if isinstance(values, str) else values
        return [MappingRule(atb, parse_torch_side(v), self.source) for v in values]

    def keys_for_atb(self, names: Iterable[str]) -> list[str]:
        """The keys whose ATB type ends one of ``names``, in file order: a look-up per suffix, not a scan."""
        found: set[str] = set()
        for name in names:
            for start in range(len(name)):
                suffix = name[start:]
                if suffix in self.entries and ("tensor" not in suffix or parse_atb_side(suffix).stem is None):
                    found.add(suffix)  # a key without a stem is its type
                found.update(self.stemmed.get(suffix, ()))
        return sorted(found, key=self.position)


@dataclass(frozen=True)
class MappingTable:
    """The rule files in precedence order: the user's first (its rules win), then the built-ins. Immutable."""

    files: tuple[RuleFile, ...]

    @classmethod
    def builtin(cls) -> MappingTable:
        return cls((RuleFile.of(dict(_BUILTIN), "builtin", sum(len(values) for _, values in _BUILTIN)),))

    def merged(self, user_rules: RuleFile) -> MappingTable:
        return MappingTable((user_rules,) + self.files)

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    @cached_property
    def rules(self) -> tuple[MappingRule, ...]:
        """Every rule in precedence order. Builds them all: for diagnostics and tests, pairing never asks."""
        return tuple(rule for f in self.files for rule in f)

    def ranked_rules_for_atb(self, op_type: str, op_name: str = "") -> list[tuple[Rank, MappingRule]]:
        """The rules whose ATB side matches the op, each with its rank (lower wins), in precedence order: look-ups
        of every suffix of the op's type and base name in each file's index."""
        names = {op_type, op_base_name(op_name)} - {""}
        out = []
        for i, rule_file in enumerate(self.files):
            for key in rule_file.keys_for_atb(names):
                k = rule_file.position(key)
                out.extend(((i, k, v), rule) for v, rule in enumerate(rule_file.rules_of(key)))
        return out

    def rules_for_atb(self, op_type: str, op_name: str = "") -> list[MappingRule]:
        return [rule for _, rule in self.ranked_rules_for_atb(op_type, op_name)]

    def rules_for_torch(self, module_type: str, families: Iterable[str] = ()) -> list[MappingRule]:
        """The rules whose torch side matches ``module_type`` (a scan of every rule: for diagnostics and tests)."""
        return [rule for rule in self.rules if rule.matches_torch(module_type, families)]


def _validated_entries(obj, path: Path) -> tuple[dict[str, str | tuple[str, ...]], int]:
    """(key -> value(s), number of rules) of a parsed mapping file.

    A file whose every value is one name (the usual, and the 200k-rule case) is checked in one pass in C and kept
    as parsed; otherwise each key is checked and its list kept as a tuple. An error names the key or value."""
    if not isinstance(obj, dict):
        raise MappingError(f"{path}: top level must be a JSON object of ATB op type -> torch module type(s)")
    if obj and _all_names([*obj, *obj.values()]):
        return obj, len(obj)
    entries: dict[str, str | tuple[str, ...]] = {}
    count = 0
    for key, value in obj.items():
        if not _NAME.fullmatch(key):
            raise MappingError(f"{path}: key {key!r} must be letters, digits and '_' only")
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise MappingError(f"{path}: value of {key!r} must be a string or a non-empty list of strings")
        for v in values:
            if not isinstance(v, str) or not _NAME.fullmatch(v):
                raise MappingError(f"{path}: value {v!r} of key {key!r} must be letters, digits and '_' only")
        entries[key] = value if isinstance(value, str) else tuple(values)
        count += len(values)
    return entries, count


def _all_names(names: list) -> bool:
    """Whether every item is a non-empty string of letters, digits and '_': one pass in C over them joined by
    newlines, which must leave exactly the newlines once the allowed bytes are deleted."""
    try:
        joined = "\n".join(names)
    except TypeError:  # a value that is not a string (a list: checked key by key)
        return False
    empty = "\n\n" in joined or joined.startswith("\n") or joined.endswith("\n") or not joined
    return (not empty and joined.isascii()
            and joined.encode().translate(None, _NAME_BYTES) == b"\n" * (len(names) - 1))


def load_mapping_file(path_or_dir: str | Path) -> RuleFile:
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
    entries, count = _validated_entries(obj, path)
    return RuleFile.of(entries, str(path), count)


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
