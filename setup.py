"""Build the optional compiled comparison pass (pytest_ait_llm/compare/_kernel.c); metadata is in pyproject.toml.

The extension is optional: where no C compiler is found the package installs without it and compares with the
numpy pass (the same metrics, several times slower).
"""
import sys

from setuptools import Extension, setup

# -ffp-contract=fast fuses a*b+c into FMA where the target has it (AVX2, AArch64); never -ffast-math, which would
# drop the NaN/inf checks. -Wno-psabi: GCC's note that vector arguments change ABI between targets (all static).
args = ["-O3", "-std=c11", "-ffp-contract=fast", "-Wno-psabi"] if sys.platform != "win32" else ["/O2"]

setup(ext_modules=[Extension("pytest_ait_llm.compare._kernel", ["pytest_ait_llm/compare/_kernel.c"],
                             depends=["pytest_ait_llm/compare/_kernel_loops.h"],
                             extra_compile_args=args, optional=True)])
