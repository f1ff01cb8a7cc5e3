#!/bin/sh
# Check the compiled pass's AArch64 (NEON) copy on an x86-64 machine: tests/test_kernel.py cross-compiles
# bench/kernel_harness.c (the loops without Python), runs every test of the compiled pass on it under
# qemu-aarch64, and holds its numbers to the numpy pass's. Correctness only: emulated timings mean nothing.
#   scripts/check_aarch64.sh [PYTHON]      (default .venv/bin/python)
set -eu
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
    if ! command -v "$tool" >/dev/null 2>&1 && ! command -v "$tool-static" >/dev/null 2>&1; then
        echo "check_aarch64: $tool not found; install it with: apt-get install gcc-aarch64-linux-gnu qemu-user" >&2
        exit 2
    fi
done
"$PY" setup.py -q build_ext --inplace  # the native pass the emulated one is compared with, through the same code
PYTHONPATH=$PWD "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel.py -k "qemu"
