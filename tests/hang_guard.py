"""A hang guard for the one call in a test that could hang: generous, so a busy machine never trips it."""
from __future__ import annotations

import signal
import threading

#: A call that parses or lists a few KB takes milliseconds; a minute means it hangs, on any machine.
HANG_SECONDS = 60


class Hangs(BaseException):
    """Raised by the guard; a BaseException so that no ``except OSError/Exception`` in the code under test hides it."""


def guarded(fn, *args, seconds: int = HANG_SECONDS, **kwargs):
    """``fn(*args, **kwargs)``, interrupted by SIGALRM (even inside a blocking open() or read()) after ``seconds``."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)

    def hung(signum, frame):
        raise Hangs(f"{getattr(fn, '__name__', fn)} still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
