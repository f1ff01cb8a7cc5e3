"""The golden side of the example: pytest-ait-llm runs this model under its dump hooks (the torch_dump fixture)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load(name: str, filename: str):
    """Import a file of this folder under a unique name (a bare ``import model`` could pick up someone else's)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


port = _load("llama_port_port", "port.py")
golden = port.load_golden_module()


@pytest.fixture(scope="session")
def ait_golden_model():
    """(model, input_ids, generate_kwargs): the float32 golden Llama, its prompt, and how to generate."""
    model, input_ids = golden.build_golden()
    return model, input_ids, dict(golden.GENERATE_KWARGS)
