"""pytest-ait-llm: gate an Ascend ATB port of an LLM against its PyTorch model, operator by operator.

Importing this package is cheap on purpose (no torch, numpy or pandas): the pytest plugin is loaded by every
pytest run in an environment where it is installed. The engines import their heavy dependencies lazily.
"""

__version__ = "0.1.0"
