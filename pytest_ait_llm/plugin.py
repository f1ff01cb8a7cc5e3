"""pytest plugin: gate an Ascend ATB port of an LLM against its PyTorch model, operator by operator.

This module only declares options, the marker, fixtures and report hooks. Installing the package activates it in
*every* pytest run of the environment, so it imports nothing heavy: torch, numpy, pandas, matplotlib and the
engines that need them are imported inside the fixtures and hooks that use them (measured by
``tests/test_import_cost.py``).

The user manual of each fixture is its docstring (``pytest --fixtures`` prints it); docs/plugin.md has the rest.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:  # pragma: no cover - names for annotations only, never imported at run time
    from .compare.result import CompareResult
    from .formats.atb_layout import AtbDump
    from .formats.torch_layout import TorchDump

MARKER = "ait_tolerance"
#: Regression baselines (options, marker, HTML table) live in their own plugin module, loaded with this one.
pytest_plugins = ["pytest_ait_llm.baseline_plugin"]
#: user_properties name under which each comparison's CSV path travels with the test report (xdist, junitxml).
CSV_PROPERTY = "ait_llm_csv"
VERDICT_PROPERTY = "ait_llm_verdict"

_DEFAULTS = {"ait_token_range": "0,0", "ait_save_time": "3", "ait_save_part": "2", "ait_exec_timeout": "3600",
             "ait_allow_symlinks": "0"}


@dataclass(frozen=True)
class _Option:
    flag: str
    metavar: str
    help: str
    is_path: bool = False

    @property
    def ini(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


_OPTIONS = (
    _Option("--ait-exec", "CMD", "your ATB inference command; run once per session with the ATB dump environment "
            "(split like a shell would, never run by one) to produce the atb_dump fixture."),
    _Option("--op-mapping-file", "DIR", "directory holding op_mapping_file.json: extra ATB op type -> torch module "
            "type pairs.", is_path=True),
    _Option("--ait-golden-path", "DIR", "a pre-recorded torch (golden) dump to use as torch_dump instead of running "
            "the ait_golden_model fixture.", is_path=True),
    _Option("--ait-my-path", "DIR", "a pre-recorded ATB dump to use as atb_dump instead of running --ait-exec.",
            is_path=True),
    _Option("--ait-output", "DIR", "where dumps and CSV reports go (default: pytest's temporary directory). Each "
            "session (and xdist worker) gets a fresh sub-directory.", is_path=True),
    _Option("--ait-token-range", "PAIRS", "tokens (execution rounds) to dump and compare, as inclusive start,end "
            "pairs like ATB_SAVE_TENSOR_RANGE: '0,0' (default), '0,1', '0,0,3,3'."),
    _Option("--ait-save-time", "{0,1,2,3}", "when ATB saves tensors: 0 before the op, 1 after, 2 both, 3 inputs "
            "before + outputs after (default; in-place ops overwrite their inputs by 'after')."),
    _Option("--ait-save-part", "{0,1,2}", "which tensors are dumped: 0 inputs, 1 outputs, 2 both (default)."),
    _Option("--ait-exec-timeout", "SECONDS", "kill --ait-exec (its whole process group) after this many seconds "
            "(default 3600)."),
    _Option("--ait-max-bin-bytes", "BYTES", "largest ATB .bin file read (default 2 GiB, the original tool's limit)."),
    _Option("--ait-allow-symlinks", "{0,1}", "1: follow symlinks that point out of a dump root (refused by default)."),
)


@dataclass(frozen=True)
class Settings:
    """The validated ``--ait-*`` settings of one pytest run (command line wins over the ini file)."""

    exec: str | None
    op_mapping_file: Path | None
    golden_path: Path | None
    my_path: Path | None
    output: Path | None
    token_range: str
    save_time: int
    save_part: int
    exec_timeout: float
    max_bin_bytes: int | None
    allow_symlinks: bool
    invocation_dir: Path
    html_report: Path | None
    worker: str

    @property
    def token_ids(self) -> list[int]:
        numbers = [int(n) for n in self.token_range.split(",")]
        ids: set[int] = set()
        for start, end in zip(numbers[::2], numbers[1::2]):
            ids.update(range(start, end + 1))
        return sorted(ids)


_SETTINGS = pytest.StashKey[Settings]()
_RESULTS = pytest.StashKey[list]()  # on a test item: (CompareResult, output dir) of each compare_ops call


# ------------------------------------------------------------------------------------------------- options, marker

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ait-llm", "pytest-ait-llm: ATB port vs PyTorch model, op by op")
    for opt in _OPTIONS:
        group.addoption(opt.flag, action="store", dest=opt.ini, metavar=opt.metavar, default=None, help=opt.help)
        parser.addini(opt.ini, help=f"default for {opt.flag}: {opt.help}", default=None)


def _raw_setting(config: pytest.Config, opt: _Option) -> tuple[str | None, str, Path]:
    """(value, where it came from, the directory a relative path is relative to)."""
    value = config.getoption(opt.ini, None)
    if value is not None:
        return str(value), opt.flag, config.invocation_params.dir
    ini_value = config.getini(opt.ini)
    if ini_value not in (None, "", []):
        base = config.inipath.parent if config.inipath else config.rootpath
        return str(ini_value).strip(), f"ini option {opt.ini}", base
    return _DEFAULTS.get(opt.ini), opt.flag, config.invocation_params.dir


def _choice(value: str, where: str, allowed: tuple[int, ...], meaning: str) -> int:
    text = value.strip()
    if not text.isdigit() or int(text) not in allowed:
        raise pytest.UsageError(f"{where}={value!r}: expected {meaning}")
    return int(text)


_TOKEN_RANGE = re.compile(r"^\d+,\d+(,\d+,\d+)*$")


def _token_range(value: str, where: str) -> str:
    text = "".join(value.split())
    problem = None
    if not _TOKEN_RANGE.match(text):
        problem = "expected inclusive start,end pairs such as '0,0', '0,1' or '0,0,3,3'"
    else:
        numbers = [int(n) for n in text.split(",")]
        if any(a > b for a, b in zip(numbers[::2], numbers[1::2])):
            problem = "a start,end pair has its start after its end"
    if problem:
        raise pytest.UsageError(f"{where}={value!r}: {problem}")
    return text


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
    for opt in _OPTIONS:
        value, where, base = _raw_setting(config, opt)
        if opt.is_path and value is not None:
            path = Path(os.path.expandvars(value)).expanduser()
            path = path if path.is_absolute() else base / path
            if opt.ini != "ait_output" and not path.exists():
                raise pytest.UsageError(f"{where}={value!r}: no such file or directory ({path})")
            value = path
        values[opt.ini] = (value, where)
    exec_value, exec_where = values["ait_exec"]
    if exec_value is not None:
        import shlex

        try:
            if not shlex.split(exec_value):
                raise pytest.UsageError(f"{exec_where}: the command is empty")
        except ValueError as err:
            raise pytest.UsageError(f"{exec_where}={exec_value!r}: cannot split the command ({err})") from None
    timeout_value, timeout_where = values["ait_exec_timeout"]
    try:
        timeout = float(timeout_value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise pytest.UsageError(f"{timeout_where}={timeout_value!r}: expected a positive number of seconds")
    max_value, max_where = values["ait_max_bin_bytes"]
    if max_value is not None and (not max_value.strip().isdigit() or int(max_value) <= 0):
        raise pytest.UsageError(f"{max_where}={max_value!r}: expected a positive number of bytes")
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    return Settings(
        exec=exec_value,
        op_mapping_file=values["op_mapping_file"][0],
        golden_path=values["ait_golden_path"][0],
        my_path=values["ait_my_path"][0],
        output=values["ait_output"][0],
        token_range=_token_range(*values["ait_token_range"]),
        save_time=_choice(*values["ait_save_time"], (0, 1, 2, 3),
                          "0 (before), 1 (after), 2 (both) or 3 (inputs before, outputs after)"),
        save_part=_choice(*values["ait_save_part"], (0, 1, 2), "0 (inputs), 1 (outputs) or 2 (both)"),
        exec_timeout=timeout,
        max_bin_bytes=int(max_value) if max_value is not None else None,
        allow_symlinks=bool(_choice(*values["ait_allow_symlinks"], (0, 1), "0 (refuse) or 1 (follow)")),
        invocation_dir=Path(config.invocation_params.dir),
        html_report=_html_report_path(config),
        worker=str(worker),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(cos=..., red=..., ops={{...}}, dtypes={{...}}, skip=[...], mode=...): precision bounds that "
        "compare_ops judges this test's op pairs with; the nearest marker (test, then class, then module) wins.",
    )
    config.stash[_SETTINGS] = read_settings(config)
    config.pluginmanager.register(_CsvSummary(), "ait_llm_csv_summary")


def _settings(config: pytest.Config) -> Settings:
    return config.stash[_SETTINGS]


# ----------------------------------------------------------------------------------------------------- helpers

def _safe_name(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-limit:] or "test"


def _fail_user_error(where: str, err: BaseException) -> None:
    """Fail the current test with a short message: the user's input was wrong, our traceback would not help.

    Call it *outside* the ``except`` block, so that pytest does not print the caught exception as the context.
    """
    __tracebackhide__ = True
    text = str(err)
    if where and not text.startswith(where):
        text = f"{where}: {text.removeprefix(MARKER + ': ')}"
    pytest.fail(text, pytrace=False)


def _call(where: str, errors: tuple[type[BaseException], ...], fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """``fn(*args, **kwargs)``; one of ``errors`` fails the test with a one-line message starting with ``where``."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except errors as exc:
        caught = exc
    _fail_user_error(where, caught)


def _tolerance_from_marker(node: pytest.Item, overrides: dict[str, Any] | None = None):
    """The Tolerance of the nearest ``ait_tolerance`` marker (plus call-site overrides); defaults if none."""
    from .compare.tolerance import Tolerance

    marker = node.get_closest_marker(MARKER)
    if marker is None and not overrides:
        return Tolerance()
    layers = [*marker.args, dict(marker.kwargs)] if marker is not None else []
    return Tolerance.from_marker(*layers, **(overrides or {}))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Reject a bad ``ait_tolerance`` marker before the (possibly hour-long) dumps run, as a one-line failure."""
    if "compare_ops" not in getattr(item, "fixturenames", ()) or item.get_closest_marker(MARKER) is None:
        return
    from .errors import ToleranceError

    _call(f"@pytest.mark.{MARKER} on {item.nodeid}", (ToleranceError,), _tolerance_from_marker, item)


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def ait_llm_session_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fresh directory this session (this xdist worker) writes dumps and reports into.

    Under ``--ait-output DIR`` it is ``DIR/session-{time}-{worker}-{random}``; otherwise a pytest temporary
    directory (kept for the last few runs, like ``tmp_path``). Nothing already on disk is ever reused.
    """
    settings = _settings(request.config)
    if settings.output is None:
        return tmp_path_factory.mktemp("ait_llm")
    import tempfile
    import time

    settings.output.mkdir(parents=True, exist_ok=True)
    prefix = f"session-{time.strftime('%Y%m%d_%H%M%S')}-{_safe_name(settings.worker)}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=settings.output))


@pytest.fixture(scope="session")
def ait_exec_run(request: pytest.FixtureRequest, ait_llm_session_dir: Path) -> Callable[..., AtbDump]:
    """Run an ATB inference command with the ATB dump switched on; returns the dump it wrote (an ``AtbDump``).

    ``ait_exec_run(command=None, *, env=None)``: ``command`` (a string split like a shell would, or an argument
    list; default: ``--ait-exec``) runs once per distinct ``(command, env)`` per session, in its own process
    group, with the ATB dump environment (``ATB_SAVE_TENSOR=1``, ``ATB_OUTPUT_DIR``, ``ATB_SAVE_TENSOR_RANGE``
    from ``--ait-token-range``, ``ATB_SAVE_TENSOR_TIME``/``PART`` from ``--ait-save-time``/``--ait-save-part``,
    the probe library in ``LD_PRELOAD`` when the toolkit has one) plus ``env`` on top, into a fresh directory.
    Its output goes to ``ait_exec.log`` there. A command that is not found, exits non-zero, outlives
    ``--ait-exec-timeout`` (its whole process group is then killed) or writes no dump fails the test with the
    last lines of its output::

        def test_port_without_rope_scaling(torch_dump, ait_exec_run, compare_ops):
            atb = ait_exec_run("python run_port.py --no-rope-scaling", env={"MY_PORT_DTYPE": "bf16"})
            compare_ops(torch_dump, atb)
    """
    settings = _settings(request.config)
    cache: dict[tuple, Any] = {}

    def run(command: str | list[str] | None = None, *, env: dict[str, str] | None = None) -> AtbDump:
        __tracebackhide__ = True
        from .dump.atb_exec import atb_dump_env, run_atb_command
        from .errors import AitLlmError

        cmd = command if command is not None else settings.exec
        if not cmd:
            pytest.skip("ait_exec_run() has no command: pass --ait-exec CMD (or set ait_exec in the ini file), "
                        "or call ait_exec_run('your command')")
        extra = {str(k): str(v) for k, v in (env or {}).items()}
        key = (cmd if isinstance(cmd, str) else tuple(map(str, cmd)), tuple(sorted(extra.items())))
        if key not in cache:
            out = ait_llm_session_dir / "atb_exec" / f"run{len(cache)}"
            try:
                full_env = atb_dump_env(out, token_range=settings.token_range, save_time=settings.save_time,
                                        save_part=settings.save_part, base_env={**os.environ, **extra})
                full_env.update({k: v for k, v in extra.items() if k != "LD_PRELOAD"})
                cache[key] = run_atb_command(cmd, output_dir=out, env=full_env, timeout=settings.exec_timeout,
                                             cwd=settings.invocation_dir)
            except AitLlmError as err:
                cache[key] = err
        value = cache[key]
        if isinstance(value, BaseException):
            _fail_user_error("", value)
        return value

    return run


@pytest.fixture(scope="session")
def atb_dump(request: pytest.FixtureRequest) -> AtbDump:
    """The ATB side of the comparison ("my" dump), made once per session; an ``AtbDump`` handle.

    - ``--ait-my-path DIR``: that pre-recorded dump (an ``ait_dump``/``msit_dump_*`` root, the directory holding
      it, a ``tensors/{device}_{pid}`` rank dir or one token dir). This is how CI without an NPU gates a port.
    - ``--ait-exec CMD``: runs your ATB inference command with the ATB dump environment (see ``ait_exec_run``).
    - neither: the test is skipped, saying which option to pass.

    ::

        # pytest --ait-exec "bash run.sh patches/models/modeling_llama.py"
        def test_port(torch_dump, atb_dump, compare_ops):
            assert atb_dump.tokens == [0]
            compare_ops(torch_dump, atb_dump)
    """
    settings = _settings(request.config)
    if settings.my_path is not None:
        from .errors import AitLlmError
        from .formats.atb_layout import open_atb_dump

        return _call("--ait-my-path", (AitLlmError,), open_atb_dump, settings.my_path,
                     allow_symlinks=settings.allow_symlinks or None)
    if settings.exec:
        return request.getfixturevalue("ait_exec_run")()
    pytest.skip("atb_dump needs the ATB side: pass --ait-exec CMD (your ATB inference command, run with the dump "
                "enabled) or --ait-my-path DIR (a pre-recorded ATB dump)")


def _run_golden(golden: Any, dump_dir: Path, settings: Settings) -> Path:
    """Run what ``ait_golden_model`` returned under the dump hooks; returns the directory to open."""
    import torch

    from .dump.torch_hooks import DumpConfig, DumpHandle, register_hook

    config = DumpConfig(dump_path=dump_dir, token_range=settings.token_ids, tensor_part=settings.save_part)
    if callable(golden) and not isinstance(golden, (torch.nn.Module, tuple, list)):
        returned = golden(config)
        if isinstance(returned, DumpHandle):
            return returned.dump_dir
        if isinstance(returned, (str, os.PathLike)):
            return Path(returned)
        return dump_dir
    if not isinstance(golden, (tuple, list)) or len(golden) not in (2, 3) \
            or not isinstance(golden[0], torch.nn.Module):
        from .errors import AitLlmError

        raise AitLlmError(f"returned {type(golden).__name__}; expected (model, input_ids), "
                          f"(model, input_ids, generate_kwargs) or a callable(dump_config)")
    model, inputs = golden[0], golden[1]
    kwargs = golden[2] if len(golden) == 3 else None
    args, named = ((), dict(inputs)) if isinstance(inputs, dict) else \
        ((tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {})
    with register_hook(model, config), torch.no_grad():
        if kwargs is not None and callable(getattr(model, "generate", None)):
            model.generate(*args, **named, **kwargs)
        else:
            model(*args, **named, **(kwargs or {}))
    return dump_dir


@pytest.fixture(scope="session")
def torch_dump(request: pytest.FixtureRequest, ait_llm_session_dir: Path) -> TorchDump:
    """The golden (PyTorch) side of the comparison, made once per session; a ``TorchDump`` handle.

    - ``--ait-golden-path DIR``: that pre-recorded torch dump (the dir holding ``{PID}_{device}``, that dir, or
      one token dir).
    - otherwise your session-scoped ``ait_golden_model`` fixture is run under the dump hooks for the tokens of
      ``--ait-token-range``. It returns ``(model, input_ids)`` (one forward = token 0),
      ``(model, input_ids, generate_kwargs)`` (``model.generate(input_ids, **generate_kwargs)``: prefill is token
      0, each decode step the next), or a ``callable(dump_config)`` that runs the model itself under
      ``register_hook(model, dump_config)``.
    - neither: the test is skipped, saying what to provide.

    ::

        # conftest.py
        import pytest, torch
        from transformers import LlamaConfig, LlamaForCausalLM

        @pytest.fixture(scope="session")
        def ait_golden_model():
            model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, vocab_size=128)).eval()
            return model, torch.tensor([[1, 2, 3, 4]]), {"max_new_tokens": 2, "do_sample": False}
    """
    settings = _settings(request.config)
    from .errors import AitLlmError

    if settings.golden_path is not None:
        from .formats.torch_layout import open_torch_dump

        return _call("--ait-golden-path", (AitLlmError,), open_torch_dump, settings.golden_path,
                     allow_symlinks=settings.allow_symlinks or None)
    try:
        golden = request.getfixturevalue("ait_golden_model")
    except pytest.FixtureLookupError:
        pytest.skip("torch_dump needs the golden side: pass --ait-golden-path DIR (a pre-recorded torch dump) or "
                    "define a session-scoped fixture ait_golden_model returning (model, input_ids, generate_kwargs)")
    from .formats.torch_layout import open_torch_dump

    dump_dir = ait_llm_session_dir / "torch_dump"
    dump_dir.mkdir(parents=True, exist_ok=True)
    # Only our own complaint is shortened: an exception from the user's model keeps its traceback.
    golden_dir = _call("ait_golden_model", (AitLlmError,), _run_golden, golden, dump_dir, settings)
    return _call("torch_dump", (AitLlmError,), open_torch_dump, golden_dir)


@pytest.fixture
def compare_ops(request: pytest.FixtureRequest, ait_llm_session_dir: Path) -> Callable[..., CompareResult]:
    """Compare a golden torch dump with an ATB dump op by op, and fail the test on a precision breach.

    ``compare_ops(golden, my, **tolerance_overrides) -> CompareResult``: ``golden``/``my`` are dump handles
    (``torch_dump``, ``atb_dump``, ``ait_exec_run(...)``) or plain paths (a dump root or a token dir). Each op
    pair is judged with the nearest ``@pytest.mark.ait_tolerance(...)`` (on the test, else its class, else its
    module; the nearest one wins, they are not merged) updated with ``tolerance_overrides``, or with the
    dtype-aware defaults. ``--op-mapping-file`` adds op pairs. The per-op CSV is written under the session
    directory; its path is in the terminal summary and, with ``--html``, linked from the test's report entry
    with a table of the worst ops and a plot of the error along the model.

    On a breach it raises ``AssertionError`` naming the first divergent op (ATB op path, torch module, each
    breached metric vs its limit), then how many later breaches were propagated, then the unpaired ops::

        @pytest.mark.ait_tolerance(cos=0.999, ops={"SelfAttentionOperation": {"cos": 0.99}})
        def test_port(torch_dump, atb_dump, compare_ops):
            result = compare_ops(torch_dump, atb_dump)
            assert result.rows  # passed; the result is there to inspect

    A bad marker argument (``cos="high"``, an unknown metric) fails the test with a one-line message.

    ``baseline=True`` (or ``@pytest.mark.ait_baseline``) also checks the result against the test's accepted
    regression baseline (docs/baselines.md); ``baseline={"red": (0.5, 1e-3)}`` overrides its margins.
    """
    settings = _settings(request.config)
    node = request.node
    calls = [0]

    def compare(golden: Any, my: Any, *, tokens: Any = None, ranks: Any = None, baseline: Any = None,
                **tolerance_overrides: Any) -> CompareResult:
        __tracebackhide__ = True
        from .api import run_compare
        from .errors import AitLlmError, ToleranceError

        where = f"@pytest.mark.{MARKER}" + (" / compare_ops() overrides" if tolerance_overrides else "")
        tolerance = _call(where, (ToleranceError,), _tolerance_from_marker, node, tolerance_overrides)
        from .baseline_plugin import baseline_gate

        gate = baseline_gate(node, baseline)
        calls[0] += 1
        out = ait_llm_session_dir / "compare" / f"{_safe_name(node.nodeid)}-{calls[0]}"
        out.mkdir(parents=True, exist_ok=True)
        result = _call("compare_ops", (AitLlmError,), run_compare, golden, my, mapping_dir=settings.op_mapping_file,
                       tolerance=tolerance, output_dir=out, tokens=_as_list(tokens), ranks=_as_list(ranks),
                       max_bin_bytes=settings.max_bin_bytes, allow_symlinks=settings.allow_symlinks or None,
                       write_csv=gate is None)
        regression_failure = gate.check(result, out) if gate is not None else ""  # also writes the CSV
        node.stash.setdefault(_RESULTS, []).append((result, out))
        if result.csv_path is not None:
            node.user_properties.append((CSV_PROPERTY, str(result.csv_path)))
        node.user_properties.append((VERDICT_PROPERTY, "breach" if not result.passed else
                                     "baseline" if regression_failure else "ok"))
        if not result.passed or regression_failure:
            raise AssertionError("\n".join(m for m in (
                "" if result.passed else result.failure_message(), regression_failure) if m))
        return result

    return compare


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple, set, range)) else [value]


# ----------------------------------------------------------------------------------------------- scaling out

def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``ait_token`` / ``ait_rank``: each token (and rank) of the dump becomes its own test.

    Under ``pytest -n N`` (pytest-xdist) the tests spread over the workers::

        def test_port_token(torch_dump, atb_dump, compare_ops, ait_token, ait_rank):
            compare_ops(torch_dump, atb_dump, tokens=[ait_token], ranks=[ait_rank])

    Tokens and ranks come from ``--ait-my-path`` when given (the dump's own), else tokens from
    ``--ait-token-range`` and one ``ait_rank`` of None (all ranks).
    """
    wants_token, wants_rank = "ait_token" in metafunc.fixturenames, "ait_rank" in metafunc.fixturenames
    if not (wants_token or wants_rank):
        return
    settings = _settings(metafunc.config)
    tokens, ranks = settings.token_ids, [None]
    if settings.my_path is not None:
        from .errors import AitLlmError
        from .formats.atb_layout import open_atb_dump

        try:
            dump = open_atb_dump(settings.my_path, allow_symlinks=settings.allow_symlinks or None)
        except AitLlmError as err:
            raise pytest.UsageError(f"--ait-my-path: {err}") from None
        tokens = [t for t in dump.tokens if t in settings.token_ids] or dump.tokens
        ranks = [rank.path.name for rank in dump.ranks]
    if wants_token:
        metafunc.parametrize("ait_token", tokens, ids=[f"token{t}" for t in tokens])
    if wants_rank:
        metafunc.parametrize("ait_rank", ranks, ids=[f"rank{r}" if r else "all-ranks" for r in ranks])


# ------------------------------------------------------------------------------------------------------- reports

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach each comparison's CSV link, worst-ops table and error plot to the test's pytest-html entry."""
    report = yield
    if report.when != "call":
        return report
    results = item.stash.get(_RESULTS, None)
    settings = item.config.stash.get(_SETTINGS, None)
    if not results or settings is None or settings.html_report is None:
        return report
    from pytest_html import extras as html_extra

    from .report.html import attach_csv, report_fragment

    extras = list(getattr(report, "extras", None) or [])
    report_dir = settings.html_report.parent
    for index, (result, out_dir) in enumerate(results, start=1):
        name = f"{_safe_name(item.nodeid)}-{index}"
        href = None
        if result.csv_path is not None:
            try:
                href = attach_csv(result.csv_path, report_dir, name)
            except OSError:
                href = None
            if href is not None:
                extras.append(html_extra.url(href, name=f"ait-llm CSV {index}: {Path(result.csv_path).name}"))
        png = Path(out_dir) / (Path(result.csv_path).stem + ".png" if result.csv_path else "error_profile.png")
        extras.append(html_extra.html(report_fragment(result, png_path=png, csv_href=href)))
    report.extras = extras
    return report


class _CsvSummary:
    """Collects the compared tests' CSV paths for the terminal summary (one instance per session, on the config).

    The paths travel in ``report.user_properties``, so they also arrive from xdist workers (and land in junitxml).
    """

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        props = getattr(report, "user_properties", ())
        csvs = [str(v) for k, v in props if k == CSV_PROPERTY]
        verdicts = [str(v) for k, v in props if k == VERDICT_PROPERTY]
        for i, csv in enumerate(csvs):
            self.rows.append((report.nodeid, verdicts[i] if i < len(verdicts) else "", csv))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        terminalreporter.write_sep("-", "ait-llm per-op comparison reports (CSV)")
        for nodeid, verdict, csv in self.rows:  # the comparison's verdict, not the test's outcome
            terminalreporter.write_line(f"{(verdict or '?').upper():6} {nodeid}: {csv}")
