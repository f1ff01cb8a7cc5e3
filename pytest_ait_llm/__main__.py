"""`python -m pytest_ait_llm ...` is the `ait-llm` command."""
import sys

from .cli import main

sys.exit(main())
