#!/usr/bin/env bash
# The example's "ATB inference command": runs the CPU port (port.py) with this shell's environment, so the
# ATB_* dump variables set by pytest-ait-llm (or by hand) reach it. Arguments go to port.py (e.g. --bug scale).
#
# The interpreter is $PYTHON if set, else the first `python` on PATH: demo.py sets both to the venv's python;
# by hand, activate the venv first (or: PYTHON=.venv/bin/python bash examples/llama_port/run.sh).
exec "${PYTHON:-python}" "$(dirname "$0")/port.py" "$@"
