"""pytest plugin: gate an Ascend ATB port of an LLM against its PyTorch model, operator by operator.

This module holds the options, the marker, the fixtures and the hand-offs to the layers that do the work
(settings.py parses the options, dump/ runs the golden model and the ATB command, api.py compares, report/ builds
the HTML extras). Installing the package activates it in *every* pytest run of the environment, so it imports
nothing heavy: torch, numpy and pandas are imported inside the fixtures and hooks that use them.

The user manual of each fixture is its docstring (``pytest --fixtures`` prints it); docs/plugin.md has the rest.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from .settings import Settings, add_options, check_ini_keys, read_settings
from .terminal import CSV_PROPERTY, VERDICT_PROPERTY, CsvSummary

if TYPE_CHECKING:  # pragma: no cover - names for annotations only
    from .compare.result import CompareResult
    from .formats.atb_layout import AtbDump
    from .formats.torch_layout import TorchDump

MARKER = "ait_tolerance"
#: Regression baselines (options, marker, HTML table) live in their own plugin module, loaded with this one.
pytest_plugins = ["pytest_ait_llm.baseline_plugin"]

_SETTINGS = pytest.StashKey[Settings]()
_RESULTS = pytest.StashKey[list]()  # on a test item: (CompareResult, output dir) of each compare_ops call


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(cos=..., red=..., ops={{...}}, dtypes={{...}}, skip=[...], mode=...): precision bounds that "
        "compare_ops judges this test's op pairs with; the nearest marker (test, then class, then module) wins.",
    )
    check_ini_keys(config)
    config.stash[_SETTINGS] = read_settings(config)
    config.pluginmanager.register(CsvSummary(), "ait_llm_csv_summary")


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say once which comparison pass runs (compiled or numpy, and why), when this run is pointed at dumps."""
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or not settings.in_use:
        return None  # the import below costs numpy: not for test suites that do not use the plugin
    from .comparison_pass import describe

    return f"ait-llm: comparison pass: {describe()}"


def _settings(config: pytest.Config) -> Settings:
    return config.stash[_SETTINGS]


def _safe_name(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-limit:] or "test"


def _call(where: str, errors: tuple[type[BaseException], ...], fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """``fn(*args, **kwargs)``; one of ``errors`` fails the test with one line starting with ``where`` (the
    user's input was wrong, our traceback would not help)."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except errors as exc:
        text = str(exc)  # failing outside the except block keeps pytest from printing the caught exception
    if where and not text.startswith(where):
        text = f"{where}: {text.removeprefix(MARKER + ': ')}"
    pytest.fail(text, pytrace=False)


def _tolerance(node: pytest.Item, overrides: dict[str, Any] | None = None):
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

    _call(f"@pytest.mark.{MARKER} on {item.nodeid}", (ToleranceError,), _tolerance, item)


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
    While it runs, the terminal shows its elapsed time and last output line; the output goes to
    ``ait_exec.log``. A command that is not found, exits non-zero, outlives ``--ait-exec-timeout`` (its whole
    process group is then killed) or writes no dump fails the test with the last lines of its output::

        def test_port_without_rope_scaling(torch_dump, ait_exec_run, compare_ops):
            atb = ait_exec_run("python run_port.py --no-rope-scaling", env={"MY_PORT_DTYPE": "bf16"})
            compare_ops(torch_dump, atb)
    """
    from .dump.atb_exec import ExecRuns
    from .errors import AitLlmError
    from .terminal import LiveStatus

    settings = _settings(request.config)
    status = LiveStatus(request.config, "ait-llm --ait-exec")
    runs = ExecRuns(ait_llm_session_dir / "atb_exec", tokens=settings.tokens, save_time=settings.save_time,
                    save_part=settings.save_part, timeout=settings.exec_timeout, cwd=settings.invocation_dir,
                    on_wait=status.exec_waiting, on_end=status.exec_finished)

    def run(command: str | list[str] | None = None, *, env: dict[str, str] | None = None) -> AtbDump:
        __tracebackhide__ = True
        cmd = command if command is not None else settings.exec
        if not cmd:
            pytest.skip("ait_exec_run() has no command: pass --ait-exec CMD (or set ait_exec in the ini file), "
                        "or call ait_exec_run('your command')")
        return _call("", (AitLlmError,), runs.dump, cmd, env)

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
            assert atb_dump.tokens == [0, 1]
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


@pytest.fixture(scope="session")
def torch_dump(request: pytest.FixtureRequest, ait_llm_session_dir: Path) -> TorchDump:
    """The golden (PyTorch) side of the comparison, made once per session; a ``TorchDump`` handle.

    - ``--ait-golden-path DIR``: that pre-recorded torch dump (the dir holding ``{PID}_{device}``, that dir, or
      one token dir).
    - otherwise your session-scoped ``ait_golden_model`` fixture is run under the dump hooks, dumping every
      token it produces (or those of ``--ait-token-range``). It returns ``(model, input_ids)`` (one forward =
      token 0), ``(model, input_ids, generate_kwargs)`` (``model.generate(input_ids, **generate_kwargs)``:
      prefill is token 0, each decode step the next), or a ``callable(dump_config)`` that runs the model itself
      under ``register_hook(model, dump_config)``.
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
    from .errors import AitLlmError
    from .formats.torch_layout import open_torch_dump

    settings = _settings(request.config)
    if settings.golden_path is not None:
        return _call("--ait-golden-path", (AitLlmError,), open_torch_dump, settings.golden_path,
                     allow_symlinks=settings.allow_symlinks or None)
    try:
        golden = request.getfixturevalue("ait_golden_model")
    except pytest.FixtureLookupError:
        pytest.skip("torch_dump needs the golden side: pass --ait-golden-path DIR (a pre-recorded torch dump) or "
                    "define a session-scoped fixture ait_golden_model returning (model, input_ids, generate_kwargs)")
    from .dump.torch_hooks import run_golden

    dump_dir = ait_llm_session_dir / "torch_dump"
    dump_dir.mkdir(parents=True, exist_ok=True)
    # Only our own complaint is shortened: an exception from the user's model keeps its traceback.
    golden_dir = _call("ait_golden_model", (AitLlmError,), run_golden, golden, dump_dir, tokens=settings.tokens,
                       tensor_part=settings.save_part)
    return _call("torch_dump", (AitLlmError,), open_torch_dump, golden_dir)


@pytest.fixture
def compare_ops(request: pytest.FixtureRequest, ait_llm_session_dir: Path) -> Callable[..., CompareResult]:
    """Compare a golden torch dump with an ATB dump op by op, and fail the test on a precision breach.

    ``compare_ops(golden, my, *, tokens=None, ranks=None, **tolerance_overrides) -> CompareResult``:
    ``golden``/``my`` are dump handles (``torch_dump``, ``atb_dump``, ``ait_exec_run(...)``) or plain paths (a
    dump root or a token dir). ``tokens`` defaults to ``--ait-token-range`` (every token); a token dumped on
    one side only is not compared and said so in a warning. Each op pair is judged with the nearest
    ``@pytest.mark.ait_tolerance(...)`` (on the test, else its class, else its module; the nearest one wins,
    they are not merged) updated with ``tolerance_overrides``, or with the dtype-aware defaults.
    ``--op-mapping-file`` adds op pairs. The per-op CSV is written under the session directory; its path is in
    the terminal summary and, with ``--html``, linked from the test's report entry with a table of the worst
    ops and a plot of the error along the model.

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
        from .terminal import LiveStatus

        where = f"@pytest.mark.{MARKER}" + (" / compare_ops() overrides" if tolerance_overrides else "")
        tolerance = _call(where, (ToleranceError,), _tolerance, node, tolerance_overrides)
        from .baseline_plugin import baseline_gate

        gate = baseline_gate(node, baseline)
        calls[0] += 1
        out = ait_llm_session_dir / "compare" / f"{_safe_name(node.nodeid)}-{calls[0]}"
        out.mkdir(parents=True, exist_ok=True)
        wanted = _as_list(tokens) if tokens is not None else settings.tokens
        result = _call("compare_ops", (AitLlmError,), run_compare, golden, my, mapping_dir=settings.op_mapping_file,
                       tolerance=tolerance, output_dir=out, tokens=wanted, ranks=_as_list(ranks),
                       max_bin_bytes=settings.max_bin_bytes, allow_symlinks=settings.allow_symlinks or None,
                       progress=LiveStatus(request.config, "ait-llm compare").compare_progress,
                       write_csv=gate is None)
        regression_failure = gate.check(result, out) if gate is not None else ""  # also writes the CSV
        node.stash.setdefault(_RESULTS, []).append((result, out))
        if result.csv_path is not None:
            node.user_properties.append((CSV_PROPERTY, str(result.csv_path)))
        node.user_properties.append((VERDICT_PROPERTY, "breach" if not result.passed else
                                     "baseline" if regression_failure else "ok"))
        for row in result.rows:  # a whole token that one side lacks: say so, it was not compared
            if row.status == "unpaired" and row.token_id is not None and not (row.atb_op or row.torch_module):
                warnings.warn(f"ait-llm: {node.nodeid}: token {row.token_id} not compared: {row.reason}",
                              stacklevel=2)
        if not result.passed or regression_failure:
            raise AssertionError("\n".join(m for m in (
                "" if result.passed else result.failure_message(), regression_failure) if m))
        return result

    return compare


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, set, range)) else [value]
    return None if values == [None] else values  # ait_token None: every token


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``ait_token`` / ``ait_rank``: each token (and rank) of the dump becomes its own test.

    Under ``pytest -n N`` (pytest-xdist) the tests spread over the workers::

        def test_port_token(torch_dump, atb_dump, compare_ops, ait_token, ait_rank):
            compare_ops(torch_dump, atb_dump, tokens=[ait_token], ranks=[ait_rank])

    Tokens and ranks come from ``--ait-my-path`` when given (the dump's own, within ``--ait-token-range``);
    otherwise the tokens of ``--ait-token-range`` (one ``ait_token`` of None when that is every token) and one
    ``ait_rank`` of None (all ranks).
    """
    wants_token, wants_rank = "ait_token" in metafunc.fixturenames, "ait_rank" in metafunc.fixturenames
    if not (wants_token or wants_rank):
        return
    settings = _settings(metafunc.config)
    tokens: list = list(settings.tokens) if settings.tokens is not None else [None]
    ranks: list = [None]
    if settings.my_path is not None:
        from .errors import AitLlmError
        from .formats.atb_layout import open_atb_dump

        try:
            dump = open_atb_dump(settings.my_path, allow_symlinks=settings.allow_symlinks or None)
        except AitLlmError as err:
            raise pytest.UsageError(f"--ait-my-path: {err}") from None
        tokens = [t for t in dump.tokens if settings.tokens is None or t in settings.tokens] or dump.tokens
        ranks = [rank.path.name for rank in dump.ranks]
    if wants_token:
        metafunc.parametrize("ait_token", tokens, ids=[f"token{t}" if t is not None else "all-tokens" for t in tokens])
    if wants_rank:
        metafunc.parametrize("ait_rank", ranks, ids=[f"rank{r}" if r else "all-ranks" for r in ranks])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach each comparison's CSV link, worst-ops table and error plot to the test's pytest-html entry."""
    report = yield
    results = item.stash.get(_RESULTS, None)
    settings = item.config.stash.get(_SETTINGS, None)
    if report.when == "call" and results and settings is not None and settings.html_report is not None:
        from .report.html import pytest_html_extras

        extras = pytest_html_extras(results, settings.html_report.parent, _safe_name(item.nodeid))
        report.extras = [*(getattr(report, "extras", None) or []), *extras]
    return report
