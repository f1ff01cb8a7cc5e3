"""Tell a torch dump from an ATB dump, at any level a user may point at, and open it.

Same-kind comparisons (ATB vs ATB, torch vs torch) take either kind on either side, so the side is no longer known
from the option it came in (``-gp`` was torch, ``-mp`` ATB). The two layouts do not overlap below a root: an ATB
rank dir is ``{device}_{pid}`` under ``tensors/`` and holds op folders ``{id}_{opType}``; a torch rank dir holds
``model_tree.json``. Only an msit root may hold both (``tensors/`` and ``torch_tensors/``): that is ambiguous, and
the error says which subfolder to pass.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LayoutError
from .atb_layout import AtbDump, open_atb_dump
from .torch_layout import TorchDump, open_torch_dump

TORCH, ATB = "torch", "atb"
#: What each opener says when a path is simply not its kind of dump (any other error is about the dump itself).
_NOT_THIS_KIND = (": not an ATB dump;", ": no {device}_{pid} folders", ": no torch dump found")


def dump_kind(dump: object) -> str:
    """``"torch"`` or ``"atb"`` for an opened dump; for a path, which one it opens as (LayoutError if neither)."""
    if isinstance(dump, TorchDump):
        return TORCH
    if isinstance(dump, AtbDump):
        return ATB
    return dump_kind(open_dump(dump))


def is_atb_dump(dump: object) -> bool:
    """Whether ``dump`` is (or a path to) an ATB dump; a path that is no dump at all is not one. Cheap: opening an
    ATB dump reads directory names only."""
    if isinstance(dump, (TorchDump, AtbDump)):
        return isinstance(dump, AtbDump)
    try:
        open_atb_dump(Path(os.fspath(dump)))
        return True
    except LayoutError:
        return False


def open_dump(dump: object, *, allow_symlinks: bool | None = None) -> TorchDump | AtbDump:
    """The dump at ``dump``, a handle (returned as is) or a path to a torch or ATB dump at any level: the root,
    a rank dir or a token dir, in the ait or the msit layout."""
    if isinstance(dump, (TorchDump, AtbDump)):
        return dump
    path = Path(os.fspath(dump))
    if (path / "tensors").is_dir() and (path / "torch_tensors").is_dir():
        raise LayoutError(f"{path}: holds both an ATB dump (tensors/) and a torch dump (torch_tensors/); "
                          f"pass {path / 'tensors'} or {path / 'torch_tensors'}")
    errors = []
    for opener in (open_atb_dump, open_torch_dump):
        try:
            return opener(path, allow_symlinks=allow_symlinks)
        except LayoutError as exc:
            errors.append(exc)
    if not path.is_dir():
        raise errors[1]  # both say "no such directory"; the torch one names what a dump dir is
    specific = [e for e in errors if not any(g in str(e) for g in _NOT_THIS_KIND)]
    if specific:  # it is that kind of dump, and something about it is wrong (e.g. it holds two): say that
        raise specific[0]
    raise LayoutError(f"{path}: neither an ATB dump (tensors/{{device}}_{{pid}}/{{token}}/ with model/{{pid}}/*.json) "
                      f"nor a torch dump ({{PID}}_{{device}}/{{token}}/ with model_tree.json)")
