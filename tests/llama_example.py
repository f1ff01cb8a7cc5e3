"""The embedded example's modules (examples/llama_port), imported once under names of their own.

A bare ``import model`` could pick up another ``model`` module; the example's files are loaded by path instead.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "llama_port"


def load(name: str, path: Path, env: dict[str, str] | None = None):
    """The module at ``path`` as ``sys.modules[name]``, executed once, with ``env`` set while it is (port.py reads
    PORT_DTYPE at import)."""
    if name in sys.modules:
        return sys.modules[name]
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return module


golden = load("llama_port_model", EXAMPLE / "model.py")
port = load("llama_port_port", EXAMPLE / "port.py")
