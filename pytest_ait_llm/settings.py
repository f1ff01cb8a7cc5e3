"""The plugin's ``--ait-*`` options and ini keys: their declaration (with pytest's own types and defaults) and
their validation into one frozen :class:`Settings`.

A bad value, an unknown ``ait_*`` ini key or an ``--ait-output`` that cannot be written is a pytest usage error
(exit 4, one line naming the option or key): a misspelt key that pytest only warns about would let a test pass
without what the key was meant to add. Only the standard library and pytest are imported here.
"""
from __future__ import annotations

import difflib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .errors import AitLlmError
from .token_range import parse_tokens


@dataclass(frozen=True)
class Option:
    """One ``--flag`` and its ini key (the flag without dashes, ``-`` as ``_``)."""

    flag: str
    metavar: str
    help: str
    type: type = str
    default: Any = None
    choices: tuple[int, ...] | None = None
    is_path: bool = False

    @property
    def ini(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS = (
    Option("--ait-exec", "CMD", "your ATB inference command; run once per session with the ATB dump environment "
           "(split like a shell would, never run by one) to produce the atb_dump fixture."),
    Option("--op-mapping-file", "DIR", "directory holding op_mapping_file.json: extra ATB op type -> torch module "
           "type pairs.", is_path=True),
    Option("--ait-golden-path", "DIR", "a pre-recorded torch (golden) dump to use as torch_dump instead of running "
           "the ait_golden_model fixture.", is_path=True),
    Option("--ait-my-path", "DIR", "a pre-recorded ATB dump to use as atb_dump instead of running --ait-exec.",
           is_path=True),
    Option("--ait-output", "DIR", "where dumps and CSV reports go (default: pytest's temporary directory). Each "
           "session (and xdist worker) gets a fresh sub-directory.", is_path=True),
    Option("--ait-token-range", "TOKENS", "tokens (execution rounds: prefill 0, then each decode step) to dump and "
           "compare: ids and inclusive ranges such as 0, 0,3 (two tokens), 0-3, 0-1,5, or all (default: every "
           "token the golden run produces).", default="all"),
    Option("--ait-save-time", "{0,1,2,3}", "when ATB saves tensors: 0 before the op, 1 after, 2 both, 3 inputs "
           "before + outputs after (default; in-place ops overwrite their inputs by 'after').", type=int,
           default=3, choices=(0, 1, 2, 3)),
    Option("--ait-save-part", "{0,1,2}", "which tensors are dumped: 0 inputs, 1 outputs, 2 both (default).",
           type=int, default=2, choices=(0, 1, 2)),
    Option("--ait-exec-timeout", "SECONDS", "kill --ait-exec (its whole process group) after this many seconds "
           "(default 3600).", type=float, default=3600.0),
    Option("--ait-max-bin-bytes", "BYTES", "largest ATB .bin file read (default 2 GiB, the original tool's limit).",
           type=int),
    Option("--ait-allow-symlinks", "{0,1}", "1: follow symlinks that point out of a dump root (refused by default).",
           type=int, default=0, choices=(0, 1)),
)

#: Ini keys that look like ours: an unknown one among them is a usage error, not a warning.
_OURS_PREFIXES = ("ait_", "ait-", "op_mapping", "op-mapping")


@dataclass(frozen=True)
class Settings:
    """The validated ``--ait-*`` settings of one pytest run (command line wins over the ini file)."""

    exec: str | None
    op_mapping_file: Path | None
    golden_path: Path | None
    my_path: Path | None
    output: Path | None
    tokens: tuple[int, ...] | None  # None: every token
    save_time: int
    save_part: int
    exec_timeout: float
    max_bin_bytes: int | None
    allow_symlinks: bool
    invocation_dir: Path
    html_report: Path | None
    worker: str

    @property
    def in_use(self) -> bool:
        """Whether this run was pointed at dumps (so the report header may spend an import on the pass in use)."""
        return any(v is not None for v in (self.exec, self.golden_path, self.my_path, self.op_mapping_file))


def add_options(parser: pytest.Parser) -> None:
    """Declare every option and its ini key, with pytest's types; the ini default is the option's default."""
    group = parser.getgroup("ait-llm", "pytest-ait-llm: ATB port vs PyTorch model, op by op")
    for opt in OPTIONS:
        # default=None on the command line: "not given" must be told apart, so the ini value can apply
        group.addoption(opt.flag, action="store", dest=opt.ini, metavar=opt.metavar, default=None,
                        type=opt.type, choices=opt.choices, help=opt.help)
        parser.addini(opt.ini, help=f"default for {opt.flag}", type={str: "string", int: "int",
                      float: "float"}[opt.type], default=opt.default)


def check_ini_keys(config: pytest.Config) -> None:
    """An unknown ``ait_*`` / ``op_mapping*`` ini key (or ``-o`` override) is a usage error naming it."""
    known = {opt.ini for opt in OPTIONS}
    # pytest >= 9.2 keeps the parsed ini (with -o overrides) in _inicfg; older ones in the public inicfg
    keys = getattr(config, "_inicfg", None)
    keys = keys if keys is not None else getattr(config, "inicfg", {})
    for key in sorted(keys):
        if key.lower().startswith(_OURS_PREFIXES) and key not in known and not _registered(config, key):
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise pytest.UsageError(f"{_ini_name(config)}: unknown pytest-ait-llm ini key {key!r}; {hint}")


def _registered(config: pytest.Config, key: str) -> bool:
    """Whether a plugin declared ``key`` (pytest's getini refuses undeclared keys): the baselines' keys, say."""
    try:
        config.getini(key)
    except ValueError:
        return False
    return True


def _ini_name(config: pytest.Config) -> str:
    return str(config.inipath) if config.inipath else "-o"


def _raw(config: pytest.Config, opt: Option) -> tuple[Any, str, Path]:
    """(value, where it came from, the directory a relative path is relative to)."""
    value = config.getoption(opt.ini, None)
    if value is not None:
        return value, opt.flag, config.invocation_params.dir
    try:
        ini_value = config.getini(opt.ini)
    except (ValueError, TypeError, pytest.UsageError) as err:  # pytest's type check, e.g. "ait_save_time = x"
        raise pytest.UsageError(f"ini key {opt.ini}: {err}") from None
    base = config.inipath.parent if config.inipath else config.invocation_params.dir
    if isinstance(ini_value, str):
        ini_value = ini_value.strip() or None
    where = f"ini key {opt.ini}"
    if opt.choices is not None and ini_value is not None and ini_value not in opt.choices:
        raise pytest.UsageError(f"{where}={ini_value!r}: expected one of {', '.join(map(str, opt.choices))}")
    return ini_value, where, base


def _path(value: str, base: Path) -> Path:
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else base / path


def _output_dir(path: Path, where: str, value: str) -> Path:
    """Create ``--ait-output`` now: a path under a file or in a read-only directory fails before any test runs."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise pytest.UsageError(f"{where}={value!r}: cannot create the directory {path}: "
                                f"{err.strerror or err}") from None
    if not path.is_dir():
        raise pytest.UsageError(f"{where}={value!r}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"{where}={value!r}: {path} is not writable")
    return path


def _html_report_path(config: pytest.Config) -> Path | None:
    """Where pytest-html writes its report (resolved as pytest-html does), or None when it writes none."""
    if not config.pluginmanager.hasplugin("html"):
        return None
    path = config.getoption("htmlpath", None)
    if not path:
        return None
    return Path.cwd() / Path(os.path.expandvars(path)).expanduser()


def read_settings(config: pytest.Config) -> Settings:
    """Validate the ``--ait-*`` options / ini keys; a bad value is a usage error naming the option."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value, where, base = _raw(config, opt)
        if opt.is_path and value is not None:
            path = _path(str(value), base)
            if opt.ini == "ait_output":
                path = _output_dir(path, where, str(value))
            elif not path.exists():
                raise pytest.UsageError(f"{where}={value!r}: no such file or directory ({path})")
            value = path
        values[opt.ini] = (value, where)

    exec_value, exec_where = values["ait_exec"]
    if exec_value is not None:
        try:
            if not shlex.split(exec_value):
                raise pytest.UsageError(f"{exec_where}: the command is empty")
        except ValueError as err:
            raise pytest.UsageError(f"{exec_where}={exec_value!r}: cannot split the command ({err})") from None
    timeout, timeout_where = values["ait_exec_timeout"]
    if not 0 < timeout < float("inf"):  # NaN fails both comparisons
        raise pytest.UsageError(f"{timeout_where}={timeout:g}: expected a positive number of seconds")
    max_bytes, max_where = values["ait_max_bin_bytes"]
    if max_bytes is not None and max_bytes <= 0:
        raise pytest.UsageError(f"{max_where}={max_bytes!r}: expected a positive number of bytes")
    range_value, range_where = values["ait_token_range"]
    try:
        tokens = parse_tokens(range_value, range_where)
    except AitLlmError as err:
        raise pytest.UsageError(str(err)) from None
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    return Settings(
        exec=exec_value,
        op_mapping_file=values["op_mapping_file"][0],
        golden_path=values["ait_golden_path"][0],
        my_path=values["ait_my_path"][0],
        output=values["ait_output"][0],
        tokens=tokens,
        save_time=values["ait_save_time"][0],
        save_part=values["ait_save_part"][0],
        exec_timeout=timeout,
        max_bin_bytes=max_bytes,
        allow_symlinks=bool(values["ait_allow_symlinks"][0]),
        invocation_dir=Path(config.invocation_params.dir),
        html_report=_html_report_path(config),
        worker=str(worker),
    )
