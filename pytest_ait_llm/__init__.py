"""pytest-ait-llm: gate an Ascend ATB port of an LLM against its PyTorch model, operator by operator.

The public API is importable from here (``from pytest_ait_llm import run_compare, DumpConfig, register_hook``),
but each name is imported on first use (module ``__getattr__``): the pytest plugin is loaded by every pytest run
in an environment where it is installed, so importing this package must not import torch, numpy or pandas.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "run_compare": ".api",
    "CompareResult": ".compare.result",
    "Row": ".compare.result",
    "Tolerance": ".compare.tolerance",
    "DumpConfig": ".dump.torch_hooks",
    "DumpHandle": ".dump.torch_hooks",
    "register_hook": ".dump.torch_hooks",
    "AtbDumpWriter": ".dump.atb_writer",
    "atb_dump_env": ".dump.atb_exec",
    "run_atb_command": ".dump.atb_exec",
    "AtbDump": ".formats.atb_layout",
    "open_atb_dump": ".formats.atb_layout",
    "TorchDump": ".formats.torch_layout",
    "open_torch_dump": ".formats.torch_layout",
    "parse_tokens": ".token_range",
    "AitLlmError": ".errors",
    "FormatError": ".errors",
    "LayoutError": ".errors",
    "MappingError": ".errors",
    "ToleranceError": ".errors",
    "ExecError": ".errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import run_compare
    from .compare.result import CompareResult, Row
    from .compare.tolerance import Tolerance
    from .dump.atb_exec import atb_dump_env, run_atb_command
    from .dump.atb_writer import AtbDumpWriter
    from .dump.torch_hooks import DumpConfig, DumpHandle, register_hook
    from .errors import AitLlmError, ExecError, FormatError, LayoutError, MappingError, ToleranceError
    from .formats.atb_layout import AtbDump, open_atb_dump
    from .formats.torch_layout import TorchDump, open_torch_dump
    from .token_range import parse_tokens


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_ait_llm' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
