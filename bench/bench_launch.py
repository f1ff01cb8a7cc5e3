"""Start a command and write its exact resource usage: ``python bench_launch.py USAGE.json CMD ...``.

Why a launcher: ``ru_maxrss`` survives ``exec``, so a child started straight from the benchmark (which has torch
loaded, a few hundred MB) would report at least the benchmark's own size. Forked from this small process instead,
the command's high-water mark is its own. The usage covers the command and every child it waited for.
"""
from __future__ import annotations

import json
import os
import sys


def main() -> int:
    usage_path, cmd = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    with open(usage_path, "w") as fh:
        json.dump({"maxrss_kb": usage.ru_maxrss, "utime": usage.ru_utime, "stime": usage.ru_stime}, fh)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
