"""Run the user's ATB inference command with the ATB dump switched on, and hand back the dump it wrote.

ATB dumps are not produced by a Python API: the ATB runtime reads environment variables at start-up (the same ones
``ait llm dump`` / ``msit llm dump`` set) and writes ``{ATB_OUTPUT_DIR}/ait_dump/...`` (or ``msit_dump_*``) as
the model runs. :func:`atb_dump_env` builds that environment, :func:`run_atb_command` runs the command in it.

What this does differently from the original tool, on purpose:

- the command is split with :mod:`shlex` (quotes work) and never goes through a shell;
- a dump never mixes with another: by default every run gets a fresh output directory (an existing non-empty one
  is never reused, deleted or overwritten; a sibling ``<dir>-1``, ``<dir>-2``, ... is created instead); with
  ``fresh=False`` (``ait-llm dump -o DIR``) the directory itself is used and one that already holds a dump refused;
- the command runs in its own process group with a timeout; on timeout the whole group is killed, so a hung
  inference server or its workers do not outlive the test session;
- stdout and stderr go to ``ait_exec.log`` in the output directory, and the tail of that log is in the error
  when the command fails, so a person sees *why* without digging; while it runs, ``on_wait`` is told the
  elapsed time and the log's last line (the plugin shows them in pytest's terminal).

Only the standard library is imported at module level: the pytest plugin imports this module lazily, and the
dump reader (which needs numpy) only once the command has succeeded.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AitLlmError, ExecError
from ..token_range import atb_range

if TYPE_CHECKING:  # pragma: no cover
    from ..formats.atb_layout import AtbDump

__all__ = [
    "LOG_NAME",
    "ExecFailed",
    "ExecRuns",
    "atb_dump_env",
    "check_token_range",
    "find_dump_roots",
    "last_line",
    "probe_library",
    "run_atb_command",
]

#: Name of the file (inside the run's output directory) that receives the command's stdout and stderr.
LOG_NAME = "ait_exec.log"
#: How many trailing log lines an :class:`ExecFailed` message carries.
TAIL_LINES = 40
#: Seconds between SIGTERM and SIGKILL when a timed-out command's process group is stopped.
KILL_GRACE_SECONDS = 3.0

_TOKEN_RANGE = re.compile(r"^\d+,\d+(,\d+,\d+)*$")


class ExecFailed(ExecError):
    """The command failed; ``str(err)`` is a one-line summary followed by the last lines of the command's output.

    The summary alone is in :attr:`summary`, the tail in :attr:`output_tail`, the full log in :attr:`log_path`.
    The output is kept on separate lines on purpose: forty lines of a Python traceback folded into one line
    cannot be read.
    """

    def __init__(self, summary: str, *, output_tail: str = "", log_path: Path | None = None):
        super().__init__(summary)
        self.summary: str = self.args[0]
        self.output_tail = output_tail
        self.log_path = log_path

    def __str__(self) -> str:
        if not self.output_tail:
            return self.summary
        indented = "\n".join("    " + line for line in self.output_tail.splitlines())
        return f"{self.summary}\n  last lines of its output ({self.log_path}):\n{indented}"


def check_token_range(token_range: str) -> str:
    """Validate ``ATB_SAVE_TENSOR_RANGE`` syntax: inclusive ``start,end`` pairs, e.g. ``"0,0"`` or ``"3,5,7,7"``.

    Returns the value without blanks; raises :class:`ExecError` naming the problem. A malformed range is not
    rejected by ATB, it silently dumps nothing, which is why it is checked here.
    """
    text = "".join(str(token_range).split())
    if not _TOKEN_RANGE.match(text):
        raise ExecError(f"token range {token_range!r}: expected inclusive start,end pairs such as '0,0' or '0,3,7,7'")
    numbers = [int(n) for n in text.split(",")]
    for start, end in zip(numbers[::2], numbers[1::2]):
        if start > end:
            raise ExecError(f"token range {token_range!r}: pair {start},{end} has start > end")
    return text


def _libatb_uses_cxx11_abi(env: Mapping[str, str]) -> bool | None:
    """Whether ``$ATB_HOME_PATH/lib/libatb.so`` exports its probe symbols with the C++11 ABI; None if unknown."""
    atb_home = env.get("ATB_HOME_PATH")
    nm = shutil.which("nm", path=env.get("PATH"))
    if not atb_home or not nm:
        return None
    lib = Path(atb_home) / "lib" / "libatb.so"
    if not lib.is_file():
        return None
    try:
        out = subprocess.run([nm, "-D", str(lib)], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return any("Probe" in line and "cxx11" in line for line in out.splitlines())


def probe_library(env: Mapping[str, str]) -> Path | None:
    """The ATB probe library to preload, or None when this machine has none (no ATB: nothing to preload).

    ``$ASCEND_TOOLKIT_HOME/tools/ait_backend/dump/libatb_probe_abi{1|0}.so``: abi1 when libatb.so's probe
    symbols use the C++11 ABI (``nm -D``), abi0 when they do not; when that cannot be told (no ``nm``, no
    ATB_HOME_PATH), whichever exists, abi0 first as the original tool would. A library that group or others may
    write is refused: it would be preloaded into the user's inference process.
    """
    toolkit = env.get("ASCEND_TOOLKIT_HOME")
    if not toolkit:
        return None
    folder = Path(toolkit) / "tools" / "ait_backend" / "dump"
    by_abi = {abi: folder / f"libatb_probe_abi{abi}.so" for abi in (0, 1)}
    existing = [abi for abi, path in by_abi.items() if path.is_file()]
    if not existing:
        return None
    cxx11 = _libatb_uses_cxx11_abi(env)
    wanted = None if cxx11 is None else int(cxx11)
    chosen = by_abi[wanted] if wanted in existing else by_abi[existing[0]]
    mode = chosen.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ExecError(f"{chosen}: refusing to LD_PRELOAD a probe library that group/others can write "
                        f"(chmod go-w it)")
    return chosen


def atb_dump_env(output_dir: str | os.PathLike, *, tokens: Iterable[int] | None = (0,),
                 token_range: str | None = None, save_time: int = 3, save_part: int = 2,
                 base_env: Mapping[str, str] | None = None, device_id: int | None = None) -> dict[str, str]:
    """The environment that makes ATB dump tensors and topology into ``output_dir``, as ``llm dump`` sets it.

    ``tokens``: the token ids to dump (None: every token), e.g. from :func:`pytest_ait_llm.token_range.parse_tokens`;
    ``token_range``, when given, is ``ATB_SAVE_TENSOR_RANGE``'s own form (inclusive start,end pairs) and wins.
    ``base_env`` (default: ``os.environ``) is copied, never modified. ``save_time``: 0 before, 1 after, 2 both,
    3 inputs before + outputs after (written as TIME=1 plus ``ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER=1``; it is the
    default because in-place ops overwrite their inputs by "after"). ``save_part``: 0 inputs, 1 outputs, 2 both.
    ``ATB_DUMP_TYPE`` is ``tensor|model``: the model topology is what pairs ATB ops with torch modules.
    """
    if isinstance(save_time, bool) or save_time not in (0, 1, 2, 3):
        raise ExecError(f"save_time={save_time!r}: must be 0 (before), 1 (after), 2 (both) or 3 (inputs before, "
                        f"outputs after)")
    if isinstance(save_part, bool) or save_part not in (0, 1, 2):
        raise ExecError(f"save_part={save_part!r}: must be 0 (inputs), 1 (outputs) or 2 (both)")
    if device_id is not None and (isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0):
        raise ExecError(f"device_id={device_id!r}: must be a non-negative int")
    env = dict(os.environ if base_env is None else base_env)
    out = os.fspath(Path(output_dir).absolute())
    env.update({
        "ATB_SAVE_TENSOR": "1",
        "ATB_OUTPUT_DIR": out.rstrip("/") + "/",
        "ATB_SAVE_TENSOR_RANGE": check_token_range(token_range) if token_range is not None else atb_range(tokens),
        "ATB_SAVE_TENSOR_TIME": "1" if save_time == 3 else str(save_time),
        "ATB_SAVE_TENSOR_PART": str(save_part),
        "ATB_SAVE_CHILD": "1",
        "ATB_SAVE_TILING": "0",
        "ATB_DUMP_TYPE": "tensor|model",
        "ATB_SAVE_CPU_PROFILING": "0",
    })
    if save_time == 3:
        env["ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER"] = "1"
    else:  # an inherited value would silently change what TIME means
        env.pop("ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER", None)
    if device_id is not None:
        env["ATB_DEVICE_ID"] = str(device_id)
    probe = probe_library(env)
    if probe is not None:
        preload = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{probe}:{preload}" if preload else str(probe)
    return env


def _split_command(cmd: str | Sequence[str], label: str) -> list[str]:
    if isinstance(cmd, (str, bytes)):
        try:
            args = shlex.split(os.fsdecode(cmd))
        except ValueError as err:  # unbalanced quotes
            raise ExecError(f"{label} {cmd!r}: cannot split the command ({err})") from None
    else:
        args = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in cmd]
    if not args:
        raise ExecError(f"{label}: the command is empty")
    return args


def _dump_dir(path: Path, label: str) -> Path:
    """``path`` itself, created if missing; refused when it already holds a dump (two runs must never mix)."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ExecError(f"{label} {path}: not a directory")
    path.mkdir(parents=True, exist_ok=True)
    existing = find_dump_roots(path)
    if existing:
        raise ExecError(f"{label} {path}: already holds a dump ({existing[0].name}); choose another directory")
    if (path / LOG_NAME).exists():
        raise ExecError(f"{label} {path}: already holds {LOG_NAME} of an earlier run; choose another directory")
    return path


def _fresh_dir(path: Path) -> Path:
    """``path`` if it does not exist or is an empty directory, else the first free ``path-1``, ``path-2``, ...

    ``mkdir(exist_ok=False)`` makes the claim atomic, so parallel workers never share a directory.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
        return path
    except FileExistsError:
        if path.is_dir() and not any(path.iterdir()):
            return path
    for n in range(1, 100_000):
        candidate = path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ExecError(f"{path}: no free sibling directory for a fresh dump")


def last_line(log_path: Path, max_bytes: int = 4096) -> str:
    """The last non-blank line the command wrote (progress bars' carriage returns split lines too)."""
    text = _tail(log_path, lines=50, max_bytes=max_bytes)
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _tail(log_path: Path, lines: int = TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _stop_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the command's whole process group, then SIGKILL whatever is left after ``grace`` seconds."""
    pgid = proc.pid  # start_new_session=True: the command leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            break
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``.

    ``killpg(pgid, 0)`` also succeeds for zombies (exited, not yet reaped by whoever inherited them), so on Linux
    the group's members are read from ``/proc``; elsewhere the signal probe is the answer.
    """
    proc = Path("/proc")
    if proc.is_dir() and (proc / "self" / "stat").exists():
        for stat_file in proc.glob("[0-9]*/stat"):
            try:
                fields = stat_file.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait(proc: subprocess.Popen, timeout: float | None, log_path: Path,
          on_wait: Callable[[float, str], None] | None, interval: float) -> int:
    """``proc.wait(timeout)``, telling ``on_wait`` the elapsed time and last output line every ``interval`` s."""
    if on_wait is None:
        return proc.wait(timeout=timeout)
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        step = interval if timeout is None else min(interval, timeout - elapsed)
        if step <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout or 0.0)
        try:
            returncode = proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            on_wait(time.monotonic() - start, last_line(log_path))
            continue
        on_wait(time.monotonic() - start, last_line(log_path))
        return returncode


def find_dump_roots(output_dir: Path) -> list[Path]:
    """The ATB dump roots directly under ``output_dir``: ``ait_dump`` and ``msit_dump_*`` directories."""
    output_dir = Path(output_dir)
    roots = [output_dir / "ait_dump"] if (output_dir / "ait_dump").is_dir() else []
    roots += sorted(p for p in output_dir.glob("msit_dump_*") if p.is_dir())
    return roots


def run_atb_command(cmd: str | Sequence[str], *, output_dir: str | os.PathLike, env: Mapping[str, str] | None = None,
                    timeout: float | None = 3600, cwd: str | os.PathLike | None = None, fresh: bool = True,
                    label: str = "--ait-exec", on_wait: Callable[[float, str], None] | None = None,
                    wait_interval: float = 2.0) -> AtbDump:
    """Run ``cmd`` with the ATB dump environment and return the dump it wrote (``open_atb_dump``).

    ``cmd``: a string (split with :func:`shlex.split`, never run by a shell) or an argument list.
    ``output_dir``: where the dump goes; if it exists and is not empty, a fresh sibling ``<output_dir>-N`` is used.
    ``env``: the full environment, usually from :func:`atb_dump_env` (default: ``atb_dump_env(output_dir)``);
    ``ATB_OUTPUT_DIR`` is always pointed at the directory actually used. ``timeout``: seconds (None: no limit).
    ``cwd``: the command's working directory (default: the current one). ``fresh=False``: use ``output_dir``
    itself (created if missing), refusing one that already holds a dump. ``label`` starts every message (the
    option the user typed). ``on_wait(elapsed_seconds, last_output_line)`` is called every ``wait_interval``
    seconds while the command runs, and once when it ends.

    Raises :class:`ExecFailed` (an :class:`ExecError`) when the command is not found, exits non-zero, times out
    (its process group is killed first) or exits 0 without writing a dump; the message names the command and
    the log file and ends with the last lines of the command's output.
    """
    args = _split_command(cmd, label)
    out = _fresh_dir(Path(output_dir)) if fresh else _dump_dir(Path(output_dir), label)
    run_env = dict(atb_dump_env(out) if env is None else env)
    run_env["ATB_OUTPUT_DIR"] = os.fspath(out).rstrip("/") + "/"
    log_path = out / LOG_NAME
    shown = shlex.join(args)

    def failed(summary: str) -> ExecFailed:
        return ExecFailed(summary, output_tail=_tail(log_path), log_path=log_path)

    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(args, env=run_env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                    cwd=cwd)
        except FileNotFoundError:
            raise ExecError(f"{label} {shown}: command not found: {args[0]!r} "
                            f"(not on PATH and not an existing file)") from None
        except PermissionError:
            raise ExecError(f"{label} {shown}: {args[0]!r} is not executable") from None
        except OSError as err:
            raise ExecError(f"{label} {shown}: cannot start it: {err}") from None
        try:
            returncode = _wait(proc, timeout, log_path, on_wait, wait_interval)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise failed(f"{label} {shown}: timed out after {timeout:g} s; its process group was killed") \
                from None
        except BaseException:  # KeyboardInterrupt: do not leave the inference running
            _stop_group(proc, grace=0.5)
            raise
        if _group_alive(proc.pid):  # background children left behind by a command that itself exited
            _stop_group(proc, grace=1.0)
    if returncode != 0:
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
        raise failed(f"{label} {shown}: {how}")
    roots = find_dump_roots(out)
    if not roots:
        raise failed(f"{label} {shown}: exited 0 but wrote no ATB dump (no ait_dump/ or msit_dump_*/) in {out}; "
                     f"does it run ATB with the dump environment (ATB_SAVE_TENSOR, ATB_OUTPUT_DIR)?")
    if len(roots) > 1:
        raise failed(f"{label} {shown}: wrote {len(roots)} dump roots in {out} "
                     f"({', '.join(p.name for p in roots)}); expected one")
    from ..formats.atb_layout import open_atb_dump

    try:
        return open_atb_dump(roots[0])
    except AitLlmError as err:  # exit 0 but a broken dump: show what the command said
        raise failed(f"{label} {shown}: exited 0 but its dump cannot be read: {err}") from None


class ExecRuns:
    """The ATB command runs of one pytest session: each distinct ``(command, extra env)`` runs once, into its own
    directory under ``root``; its dump, or its failure, is kept for every later test that asks.

    ``on_wait(elapsed, last_line)`` is called while a command runs, ``on_end(elapsed, last_line, outcome)`` once
    it ended (outcome ``"finished"`` or ``"failed"``).
    """

    def __init__(self, root: Path, *, tokens: Iterable[int] | None, save_time: int, save_part: int,
                 timeout: float | None, cwd: Path | None = None,
                 on_wait: Callable[[float, str], None] | None = None,
                 on_end: Callable[[float, str, str], None] | None = None):
        self.root = Path(root)
        self.tokens = tokens
        self.save_time, self.save_part, self.timeout, self.cwd = save_time, save_part, timeout, cwd
        self.on_wait, self.on_end = on_wait, on_end
        self._done: dict[tuple, AtbDump | AitLlmError] = {}

    def dump(self, cmd: str | Sequence[str], env: Mapping[str, str] | None = None) -> AtbDump:
        """The dump ``cmd`` wrote with ``env`` on top of the ATB dump environment; raises its AitLlmError."""
        extra = {str(k): str(v) for k, v in (env or {}).items()}
        key = (cmd if isinstance(cmd, str) else tuple(map(str, cmd)), tuple(sorted(extra.items())))
        if key not in self._done:
            self._done[key] = self._run(cmd, extra, self.root / f"run{len(self._done)}")
        value = self._done[key]
        if isinstance(value, AitLlmError):
            raise value
        return value

    def _run(self, cmd: str | Sequence[str], extra: dict[str, str], out: Path) -> AtbDump | AitLlmError:
        seen = [0.0, ""]

        def waiting(elapsed: float, line: str) -> None:
            seen[:] = [elapsed, line]
            if self.on_wait is not None:
                self.on_wait(elapsed, line)

        start = time.monotonic()
        try:
            env = atb_dump_env(out, tokens=self.tokens, save_time=self.save_time, save_part=self.save_part,
                               base_env={**os.environ, **extra})
            env.update({k: v for k, v in extra.items() if k != "LD_PRELOAD"})
            result: AtbDump | AitLlmError = run_atb_command(cmd, output_dir=out, env=env, timeout=self.timeout,
                                                          cwd=self.cwd, on_wait=waiting)
            outcome = "finished"
        except AitLlmError as err:
            result, outcome = err, "failed"
        if self.on_end is not None:
            self.on_end(time.monotonic() - start, seen[1], outcome)
        return result
