"""Dump a PyTorch model's module inputs and outputs per token, in the ait torch-dump layout.

This is the golden side of a comparison: run the original PyTorch model under :func:`register_hook`, and every
selected module's tensors land in ``{dump_path}/{PID}_{device}/{TID}/{module_name}/``, with ``model_tree.json``
beside the token folders.

Unlike the original ``ait_llm`` hooks, nothing here is global: the configuration, the token counter and every
hook live on the :class:`DumpHandle`, so two models can be dumped at once, and ``handle.remove()`` really
removes every hook it added (the original could not be unregistered and ignored a second registration).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.safe_io import atomic_write

__all__ = ["DumpConfig", "DumpHandle", "register_hook"]

#: Containers nested deeper than this are not walked (their leaves are listed in skipped.json instead).
MAX_NESTING = 8

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass
class DumpConfig:
    """What to dump.

    - ``dump_path``: the folder under which ``{PID}_{device}/`` is created.
    - ``token_range``: token ids to dump (an int, any iterable of ints such as ``range(0, 4)``, or None for every
      token). Token *k* is
      the *k*-th call of the root model's ``forward`` since registration; under HF ``generate`` the prefill is
      token 0 and each decode step the next one.
    - ``module_list``: which modules to dump; empty means all. Each entry is a class name (``"Linear"``, matched
      against the module's class and its bases, like ``isinstance``), a class, or an ``fnmatch`` glob on the
      module name, with or without the ``root.`` prefix (``"root.model.layers.0.*"``, ``"lm_head"``,
      ``"*.q_proj"``). ``model_tree.json`` always holds the whole model.
    - ``tensor_part``: 0 inputs, 1 outputs, 2 both.
    - ``device_id``: dump only when the model sits on this accelerator index (one process per card, as with
      ``torchrun``); the check is skipped for a CPU model, which has no index.
    - ``dump_last_logits``: additionally write the root output's logits as ``{TID}/root/output_logits.pth`` for
      every dumped token, even when ``module_list`` leaves the root out. It is the cheapest golden for an
      end-to-end check: combine it with a ``module_list`` that selects nothing else (e.g. ``("lm_head",)``) to
      dump little more than the logits.
    """

    dump_path: str | os.PathLike = "./"
    token_range: Iterable[int] | int | None = (0,)
    module_list: Iterable[str | type] | str = ()
    tensor_part: int = 2
    device_id: int | None = None
    dump_last_logits: bool = False

    def __post_init__(self) -> None:
        if self.token_range is not None:
            tokens = (self.token_range,) if isinstance(self.token_range, int) else tuple(self.token_range)
            for tid in tokens:
                if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                    raise ValueError(f"DumpConfig.token_range: token ids must be non-negative ints, got {tid!r}")
            self.token_range = tokens
        modules = (self.module_list,) if isinstance(self.module_list, (str, type)) else tuple(self.module_list)
        for entry in modules:
            if not isinstance(entry, (str, type)) or entry == "":
                raise ValueError(f"DumpConfig.module_list: entries must be class names, globs or classes, got {entry!r}")
        self.module_list = modules
        if self.tensor_part not in (0, 1, 2):
            raise ValueError(f"DumpConfig.tensor_part must be 0 (inputs), 1 (outputs) or 2 (both), got {self.tensor_part!r}")
        if self.device_id is not None and (isinstance(self.device_id, bool) or not isinstance(self.device_id, int)):
            raise ValueError(f"DumpConfig.device_id must be an int or None, got {self.device_id!r}")

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (named ``name``, e.g. ``root.model.norm``) is to be dumped."""
        if not self.module_list:
            return True
        class_names = {cls.__name__ for cls in type(module).__mro__}
        for entry in self.module_list:
            if isinstance(entry, type):
                if isinstance(module, entry):
                    return True
            elif entry in class_names or fnmatch.fnmatchcase(name, entry) or \
                    fnmatch.fnmatchcase(name.removeprefix("root."), entry):
                return True
        return False


def device_label(device: torch.device) -> str:
    """The device part of the dump folder name: ``npu0``, ``cuda1``, ``cpu`` (the original's ``npu:0`` -> ``npu0``)."""
    if device.type == "cpu":
        return "cpu"
    return f"{device.type}{device.index if device.index is not None else 0}"


def _model_device(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter's device (then buffers), CPU for a model holding no tensor."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@dataclass
class _TokenNotes:
    """What one dumped token left out, per module: written as ``{module}/skipped.json`` so nothing is silent."""

    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {file stem: reason}
    calls: dict[str, int] = field(default_factory=dict)  # module -> forward calls during this token

    def skip(self, module: str, stem: str, reason: str) -> None:
        self.skipped.setdefault(module, {})[stem] = reason


class _DumpState:
    """Everything the hooks of one registration share (the original kept this in module-level globals)."""

    def __init__(self, model: nn.Module, config: DumpConfig, dump_dir: Path, enabled: bool,
                 selected_names: frozenset[str]):
        self.model = model
        self.config = config
        self.selected_names = selected_names
        self.dump_dir = dump_dir
        self.enabled = enabled
        self.tokens = None if config.token_range is None else frozenset(config.token_range)  # None: every token
        self.root_calls = 0
        self.token: int | None = None  # the token being dumped right now, None when not dumping
        self.in_root = False
        self.notes = _TokenNotes()
        self.pending: dict[str, list[bool]] = {}  # module -> stack of "this call is dumped" flags
        self.exec_order: dict[str, int] | None = None  # recorded during the first dumped token
        self.tree_written = False

    # -- root --------------------------------------------------------------------------------------------------
    def begin_token(self) -> None:
        if self.in_root:
            # The previous forward raised before its end hook: drop its bookkeeping, keep what it wrote.
            self.end_token(output=None, completed=False)
        tid = self.root_calls
        self.root_calls += 1
        self.in_root = True
        self.token = tid if (self.enabled and (self.tokens is None or tid in self.tokens)) else None
        self.notes = _TokenNotes()
        self.pending = {}
        if self.token is not None and not self.tree_written:
            self.exec_order = {}

    def end_token(self, output: Any, completed: bool = True) -> None:
        tid = self.token
        if tid is not None and completed:
            if self.config.dump_last_logits:
                self._save_last_logits(tid, output)
            if not self.tree_written and self.exec_order is not None:
                _write_json(self.dump_dir / "model_tree.json", _model_tree(self.model, self.exec_order))
                self.tree_written = True
            self._write_notes(tid)
        self.exec_order = None if self.tree_written else self.exec_order
        self.token = None
        self.in_root = False

    def _save_last_logits(self, tid: int, output: Any) -> None:
        if "root" in self.selected_names and self.config.tensor_part != 0 and isinstance(output, Mapping) \
                and isinstance(output.get("logits"), torch.Tensor):
            return  # already written as root/output_logits.pth by the root's own output dump
        logits = _find_logits(output)
        if logits is None:
            self.notes.skip("root", "output_logits", f"no logits tensor in the root output ({type(output).__name__})")
            return
        _save_tensor(logits, self.token_dir(tid) / "root" / "output_logits.pth")

    def _write_notes(self, tid: int) -> None:
        modules = set(self.notes.skipped) | {m for m, n in self.notes.calls.items() if n > 1}
        for module in sorted(modules):
            record: dict[str, Any] = {"module": module, "token": tid, "skipped": self.notes.skipped.get(module, {})}
            calls = self.notes.calls.get(module, 1)
            if calls > 1:
                record["calls"] = calls
                record["note"] = f"called {calls} times in this token; only the first call is dumped"
            _write_json(self.token_dir(tid) / _folder(module) / "skipped.json", record)

    # -- every module ------------------------------------------------------------------------------------------
    def token_dir(self, tid: int) -> Path:
        return self.dump_dir / str(tid)

    def before(self, name: str, args: tuple, kwargs: dict) -> None:
        if self.token is None:
            return
        if self.exec_order is not None and name not in self.exec_order:
            self.exec_order[name] = len(self.exec_order)
        if name not in self.selected_names:
            return
        calls = self.notes.calls[name] = self.notes.calls.get(name, 0) + 1
        first = calls == 1
        self.pending.setdefault(name, []).append(first)
        if first and self.config.tensor_part in (0, 2):
            self._save_tree_of_tensors(name, "input", args)
            self._save_tree_of_tensors(name, "input", kwargs)

    def after(self, name: str, output: Any) -> None:
        if self.token is None or name not in self.selected_names:
            return
        stack = self.pending.get(name)
        first = stack.pop() if stack else False
        if first and self.config.tensor_part in (1, 2):
            self._save_tree_of_tensors(name, "output", output)

    def _save_tree_of_tensors(self, module: str, prefix: str, value: Any) -> None:
        assert self.token is not None
        folder = self.token_dir(self.token) / _folder(module)
        tensors: dict[str, torch.Tensor] = {}
        skipped: dict[str, str] = {}
        _flatten(value, prefix, tensors, skipped, 0)
        for stem, tensor in tensors.items():
            _save_tensor(tensor, folder / f"{stem}.pth")
        for stem, reason in skipped.items():
            self.notes.skip(module, stem, reason)


class DumpHandle:
    """One registration: its hooks, its token counter, and where it writes.

    Use it as a context manager, or call :meth:`remove`; either removes every hook this registration added.
    """

    def __init__(self, state: _DumpState, hooks: list):
        self._state = state
        self._hooks = hooks

    @property
    def dump_dir(self) -> Path:
        """``{dump_path}/{PID}_{device}``: holds the token folders and ``model_tree.json``."""
        return self._state.dump_dir

    @property
    def config(self) -> DumpConfig:
        return self._state.config

    @property
    def enabled(self) -> bool:
        """False when ``device_id`` excludes this model's device: the hooks then count tokens but write nothing."""
        return self._state.enabled

    @property
    def token_count(self) -> int:
        """How many times the root model's forward ran since registration (the next token id)."""
        return self._state.root_calls

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook this handle added. Safe to call twice."""
        while self._hooks:
            self._hooks.pop().remove()

    def __enter__(self) -> DumpHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"DumpHandle(dump_dir={str(self.dump_dir)!r}, tokens_seen={self.token_count}, active={self.active})"


def register_hook(model: nn.Module, config: DumpConfig | None = None) -> DumpHandle:
    """Hook ``model`` so that its forward calls write a torch dump; returns the :class:`DumpHandle`.

    Register after moving the model to its device: the device folder name (``npu0``, ``cuda0``, ``cpu``) and the
    ``device_id`` filter are decided here, from the model's first parameter.

    >>> with register_hook(model, DumpConfig(dump_path=tmp, token_range=(0, 1))) as handle:
    ...     model.generate(input_ids, max_new_tokens=2)
    >>> sorted(p.name for p in handle.dump_dir.iterdir())
    ['0', '1', 'model_tree.json']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"register_hook needs a torch.nn.Module, got {type(model).__name__}")
    config = config if config is not None else DumpConfig()
    device = _model_device(model)
    enabled = config.device_id is None or device.index is None or device.index == config.device_id
    dump_dir = Path(config.dump_path) / f"{os.getpid()}_{device_label(device)}"
    if enabled and dump_dir.is_dir() and any(dump_dir.iterdir()):
        warnings.warn(f"{dump_dir} already holds a dump: tokens dumped again are overwritten, the others stay; "
                      f"give each registration its own dump_path", stacklevel=2)
    named = [(_module_name(n), m) for n, m in model.named_modules()]
    selected = frozenset(name for name, module in named if config.selects(name, module))
    state = _DumpState(model, config, dump_dir, enabled, selected)
    hooks: list = []
    try:
        hooks.append(model.register_forward_pre_hook(_root_pre_hook(state), prepend=True))
        for name, module in named:
            hooks.append(module.register_forward_pre_hook(_pre_hook(state, name), with_kwargs=True))
            if name in state.selected_names:
                hooks.append(module.register_forward_hook(_post_hook(state, name)))
        # Registered last so it runs after the root's own output dump, whatever order PyTorch keeps.
        hooks.append(model.register_forward_hook(_root_post_hook(state)))
    except BaseException:
        for hook in hooks:
            hook.remove()
        raise
    return DumpHandle(state, hooks)


# -- hook factories: closures over one state, nothing global ---------------------------------------------------------

def _root_pre_hook(state: _DumpState):
    def hook(module: nn.Module, args: tuple) -> None:
        state.begin_token()
    return hook


def _root_post_hook(state: _DumpState):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        state.end_token(output)
    return hook


def _pre_hook(state: _DumpState, name: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.before(name, args, kwargs)
    return hook


def _post_hook(state: _DumpState, name: str):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        state.after(name, output)
    return hook


# -- naming ----------------------------------------------------------------------------------------------------------

def _module_name(dotted: str) -> str:
    return f"root.{dotted}" if dotted else "root"


def _folder(module_name: str) -> str:
    """A module name as one path component (PyTorch forbids '.' in child names but not '/')."""
    return module_name.replace("/", "_").replace("\\", "_")


def _key_part(key: Any) -> str:
    return _UNSAFE_NAME_CHARS.sub("_", str(key))


def _flatten(value: Any, stem: str, tensors: dict[str, torch.Tensor], skipped: dict[str, str], depth: int) -> None:
    """Collect the tensors in ``value`` under file stems: ``output``, ``output_0``, ``output_0_1``, ``output_logits``.

    Tuples/lists are numbered, mappings (dicts, HF ModelOutput) keyed; anything else is recorded in ``skipped``.
    """
    if isinstance(value, torch.Tensor):
        if stem in tensors:
            skipped[stem] = "name collision with another element"
        elif value.is_meta:
            skipped[stem] = "meta tensor (no data)"
        else:
            tensors[stem] = value
        return
    if isinstance(value, Mapping):
        children = [(_key_part(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        children = [(str(i), v) for i, v in enumerate(value)]
    else:
        skipped[stem] = "None" if value is None else type(value).__name__
        return
    if depth >= MAX_NESTING:
        skipped[stem] = f"{type(value).__name__} nested deeper than {MAX_NESTING} levels"
        return
    for part, child in children:
        _flatten(child, f"{stem}_{part}", tensors, skipped, depth + 1)


def _find_logits(output: Any) -> torch.Tensor | None:
    """The logits in a root output: ``output.logits`` / ``output["logits"]``, the tensor itself, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        return logits if isinstance(logits, torch.Tensor) else None
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, torch.Tensor)), None)
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


# -- model tree ------------------------------------------------------------------------------------------------------

def _model_tree(model: nn.Module, exec_order: Mapping[str, int]) -> dict:
    """``{"name", "type", "exec_order", "children"}``, children in the order of their first call.

    ``exec_order`` is the pre-order position of a module's first call in the first dumped token (parents before
    their children, like the ATB topology), -1 for modules that never ran. Siblings are sorted by when their
    subtree first ran, so a ``ModuleList`` (never called itself) sits where its layers ran; subtrees that never
    ran come last.
    """
    seen: set[int] = set()

    def node(name: str, module: nn.Module) -> tuple[dict, float]:
        """The node, and when its subtree first ran (a never-called ModuleList runs when its first layer does)."""
        seen.add(id(module))
        order = exec_order.get(name, -1)
        children = []
        for index, (child_name, child) in enumerate(module.named_children()):
            if id(child) in seen:
                continue  # the same module object reachable twice: named once, like named_modules()
            child_node, child_first = node(f"{name}.{child_name}", child)
            children.append((child_first, index, child_node))
        children.sort(key=lambda c: c[:2])
        first = min([float(order) if order >= 0 else _NEVER] + [c[0] for c in children])
        return {"name": name, "type": type(module).__name__, "exec_order": order,
                "children": [c[2] for c in children]}, first

    return node("root", model)[0]


_NEVER = float("inf")


# -- atomic writes ---------------------------------------------------------------------------------------------------

def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy that owns exactly its own bytes.

    ``torch.save`` of a view saves the whole underlying storage (a slice of a KV cache would save the cache).
    """
    return tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)


def _save_tensor(tensor: torch.Tensor, path: Path) -> None:
    copy = _cpu_copy(tensor)
    atomic_write(path, lambda tmp: torch.save(copy, tmp))


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def run_golden(golden: Any, dump_dir: Path, *, tokens: Iterable[int] | None, tensor_part: int) -> Path:
    """Run what the plugin's ``ait_golden_model`` fixture returned under the dump hooks; returns the dump dir.

    ``golden`` is ``(model, input_ids)`` (one forward), ``(model, input_ids, generate_kwargs)``
    (``model.generate``) or a ``callable(dump_config)`` that runs the model itself under ``register_hook``.
    ``tokens``: the token ids to dump (None: every token the run produces). A wrong shape of ``golden`` raises
    AitLlmError; an exception from the user's model propagates untouched (its traceback is the user's help).
    """
    config = DumpConfig(dump_path=dump_dir, token_range=tokens, tensor_part=tensor_part)
    if callable(golden) and not isinstance(golden, (nn.Module, tuple, list)):
        returned = golden(config)
        if isinstance(returned, DumpHandle):
            return returned.dump_dir
        if isinstance(returned, (str, os.PathLike)):
            return Path(returned)
        return Path(dump_dir)
    if not isinstance(golden, (tuple, list)) or len(golden) not in (2, 3) or not isinstance(golden[0], nn.Module):
        from ..errors import AitLlmError

        raise AitLlmError(f"returned {type(golden).__name__}; expected (model, input_ids), "
                          f"(model, input_ids, generate_kwargs) or a callable(dump_config)")
    model, inputs = golden[0], golden[1]
    kwargs = golden[2] if len(golden) == 3 else None
    args, named = ((), dict(inputs)) if isinstance(inputs, dict) else \
        ((tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {})
    with register_hook(model, config), torch.no_grad():
        if kwargs is not None and callable(getattr(model, "generate", None)):
            model.generate(*args, **named, **kwargs)
        else:
            model(*args, **named, **(kwargs or {}))
    return Path(dump_dir)
