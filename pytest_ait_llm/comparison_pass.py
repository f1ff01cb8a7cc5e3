"""Which comparison pass runs, and why, in one line for the CLI output and the pytest report header.

Without a C compiler at install time the package works, only slower (numpy instead of the compiled fused pass);
a user should learn that from the output, not from a profile.
"""
from __future__ import annotations

import os


def describe() -> str:
    """``"compiled (avx2)"`` or ``"numpy (<why the compiled pass is not in use>)"``. Imports numpy."""
    from .compare import fastpass

    isa = fastpass.isa()
    if fastpass.available():
        return f"compiled ({isa})"
    forced = os.environ.get(fastpass.KERNEL_ENV, "").strip().lower()
    if isa is None:
        why = "the compiled pass is not built: no C compiler when the package was installed"
    elif forced == "numpy":
        why = f"{fastpass.KERNEL_ENV}=numpy"
    else:
        why = (f"this CPU has no AVX2/AVX-512 and the plain-C loops are slower than numpy here; "
               f"{fastpass.KERNEL_ENV}=compiled forces them")
    return f"numpy ({why})"
