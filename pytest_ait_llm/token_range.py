"""The one syntax for choosing tokens, shared by ``ait-llm compare --tokens``, ``ait-llm dump -er`` and the plugin's
``--ait-token-range``.

A token (an execution round: prefill is 0, each decode step the next) is chosen by a comma-separated list of ids and
inclusive ranges: ``0``, ``0,3`` (tokens 0 and 3), ``0-3`` (0, 1, 2 and 3), ``0-1,5``; ``all`` is every token.
A dash always means a range and a comma always a list, so no text means two things. ATB itself reads inclusive
start,end *pairs* (``ATB_SAVE_TENSOR_RANGE=0,3`` is 0..3): :func:`atb_range` converts to that form, so a user never
writes it.

Only the standard library: the plugin parses its options with this at start-up.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import AitLlmError

#: The ATB form of "every token": ATB dumps each round whose id lies in an inclusive pair (its id is an int32).
ATB_ALL_TOKENS = "0,2147483647"
SYNTAX = "token ids and inclusive ranges such as '0', '0,3', '0-3', '0-1,5' or 'all'"

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_tokens(text: str, where: str = "tokens") -> tuple[int, ...] | None:
    """``"0-1,5"`` -> ``(0, 1, 5)``; ``"all"`` -> None (every token). A bad text raises AitLlmError naming ``where``."""
    compact = "".join(str(text).split())
    if compact.lower() == "all":
        return None
    ids: set[int] = set()
    for item in compact.split(","):
        match = _ITEM.match(item)
        if not match:
            raise AitLlmError(f"{where}={text!r}: expected {SYNTAX}")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if first > last:
            raise AitLlmError(f"{where}={text!r}: range {first}-{last} runs backwards")
        if last > 2147483647:
            raise AitLlmError(f"{where}={text!r}: token {last} is larger than ATB's token counter")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_tokens(ids: Iterable[int] | None) -> str:
    """The canonical text of a token choice: ``(0, 1, 2, 5)`` -> ``"0-2,5"``; None -> ``"all"``."""
    if ids is None:
        return "all"
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in _runs(ids))


def atb_range(ids: Iterable[int] | None) -> str:
    """The ``ATB_SAVE_TENSOR_RANGE`` value (inclusive start,end pairs) for a token choice: ``(0, 1, 5)`` -> ``"0,1,5,5"``."""
    if ids is None:
        return ATB_ALL_TOKENS
    runs = _runs(ids)
    if not runs:
        raise AitLlmError("no token chosen: ATB would dump nothing")
    return ",".join(f"{a},{b}" for a, b in runs)


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for tid in sorted(set(ids)):
        if runs and tid == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], tid)
        else:
            runs.append((tid, tid))
    return runs
