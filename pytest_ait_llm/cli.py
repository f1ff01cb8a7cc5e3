"""`ait-llm` — the same engine as the pytest plugin, from a shell.

    ait-llm compare -gp GOLDEN -mp MY [--op-mapping-file DIR] [-o OUTDIR] [--tokens 0-1] [--fail-on-breach]
                    [--baseline FILE [--update-baseline]]
    ait-llm dump --exec "bash run.sh ..." [-o OUTDIR] [-er 0-1] [-time 3] [-stp 2]
    ait-llm --version

Tokens are chosen in one syntax everywhere (``0``, ``0,3``, ``0-3``, ``0-1,5``, ``all``; see token_range.py).
Exit codes: 0 compared (or dumped), 1 a pair breached (or regressed against --baseline) with --fail-on-breach,
2 bad input (one-line error).
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_BREACH, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _bound(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METRIC=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a number") from None


def _tokens(text: str) -> tuple[int, ...] | None:
    from .errors import AitLlmError
    from .token_range import SYNTAX, parse_tokens

    try:
        return parse_tokens(text)
    except AitLlmError:
        raise argparse.ArgumentTypeError(f"expected {SYNTAX}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="ait-llm", description="Compare an ATB port's dumps with its PyTorch model's dumps.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cmp = sub.add_parser("compare", help="compare a torch (golden) dump with an ATB (my) dump, write the CSV")
    cmp.add_argument("-gp", "--golden-path", required=True, help="torch dump: root, {PID}_{device} dir or token dir")
    cmp.add_argument("-mp", "--my-path", required=True, help="ATB dump: ait_dump/msit_dump_* root, rank dir or token dir")
    cmp.add_argument("-mf", "--op-mapping-file", metavar="DIR", help="directory holding op_mapping_file.json")
    cmp.add_argument("-o", "--output", default=".", help="directory for ait_cmp_report_{TIMESTAMP}.csv (default .)")
    cmp.add_argument("--fail-on-breach", action="store_true", help="exit 1 when any pair breaches the tolerance")
    cmp.add_argument("-t", "--tolerance", action="append", type=_bound, default=[], metavar="METRIC=VALUE",
                     help="a bound, e.g. cos=0.999 or red=0.02 (repeatable); defaults are dtype-aware")
    cmp.add_argument("--mode", choices=("added", "absolute"), default="added",
                     help="judge each op on the error it adds (default) or on its absolute error")
    cmp.add_argument("--tokens", type=_tokens, metavar="TOKENS",
                     help="tokens to compare: ids and inclusive ranges, e.g. 0,3 (two tokens), 0-3, 0-1,5 "
                          "(default: all); a token missing from a dump is an error")
    cmp.add_argument("-j", "--workers", type=int, help="parallel comparisons (default: CPU count)")
    cmp.add_argument("-alg", "--custom-metric", action="append", default=[], metavar="FILE.py:FUNC",
                     help="an extra metric func(golden, my) -> number; becomes a CSV column (repeatable)")
    cmp.add_argument("--max-bin-bytes", type=int, help="largest .bin accepted (default 2 GiB, as the original)")
    cmp.add_argument("--allow-symlinks", action="store_true", default=None,
                     help="follow symlinks that point out of a dump root (refused by default)")
    cmp.add_argument("--baseline", metavar="FILE", help="check each op against this accepted regression baseline "
                     "(written from this run when it does not exist yet); see docs/baselines.md")
    cmp.add_argument("--update-baseline", action="store_true", help="(re)write --baseline FILE from this run")

    dump = sub.add_parser("dump", help="run an ATB inference command with the ATB dump environment set")
    dump.add_argument("--exec", dest="exec_cmd", required=True, help='the command, e.g. "bash run.sh model.py"')
    dump.add_argument("-o", "--output", default=".",
                      help="ATB_OUTPUT_DIR: the dump goes to OUTPUT/ait_dump or OUTPUT/msit_dump_* (OUTPUT is created; "
                           "refused if it already holds a dump)")
    dump.add_argument("-er", "--execute-range", type=_tokens, default=(0,), metavar="TOKENS",
                      help="tokens to dump, in the --tokens syntax: 0, 0-3, 0-1,5 or all (default 0: the prefill)")
    dump.add_argument("-time", "--save-time", type=int, choices=(0, 1, 2, 3), default=3,
                      help="0 before, 1 after, 2 both, 3 inputs before/outputs after (default)")
    dump.add_argument("-stp", "--save-tensor-part", type=int, choices=(0, 1, 2), default=2,
                      help="0 inputs, 1 outputs, 2 both (default)")
    dump.add_argument("--timeout", type=float, default=3600.0, help="seconds before the command is killed")
    return parser


def _progress():
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\rcomparing [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def _check_tokens(wanted, golden, my) -> None:
    """A requested token that a dump lacks is an error, not a comparison of nothing."""
    from .errors import AitLlmError
    from .token_range import format_tokens

    for side, dump, flag in (("golden", golden, "-gp"), ("my", my, "-mp")):
        missing = sorted(set(wanted) - set(dump.tokens))
        if missing:
            raise AitLlmError(f"--tokens {format_tokens(wanted)}: token(s) {format_tokens(missing)} not in the "
                              f"{side} dump {flag} {dump.root} (it holds {format_tokens(dump.tokens) or 'none'})")


def _compare(args) -> int:
    from .api import run_compare
    from .errors import AitLlmError
    from .compare.metrics import load_custom_metric
    from .compare.tolerance import Tolerance
    from .formats.atb_layout import open_atb_dump
    from .formats.torch_layout import open_torch_dump
    from .comparison_pass import describe as comparison_pass

    if args.update_baseline and not args.baseline:
        raise AitLlmError("--update-baseline needs --baseline FILE")
    tolerance = Tolerance.from_marker(mode=args.mode, **dict(args.tolerance))
    metrics = [load_custom_metric(spec) for spec in args.custom_metric]
    golden = open_torch_dump(args.golden_path, allow_symlinks=args.allow_symlinks)
    my = open_atb_dump(args.my_path, allow_symlinks=args.allow_symlinks)
    if args.tokens is not None:
        _check_tokens(args.tokens, golden, my)
    print(f"comparison pass: {comparison_pass()}", file=sys.stderr)
    result = run_compare(golden, my, mapping_dir=args.op_mapping_file, tolerance=tolerance,
                         output_dir=args.output, tokens=args.tokens, workers=args.workers, custom_metrics=metrics,
                         max_bin_bytes=args.max_bin_bytes, progress=_progress(),
                         allow_symlinks=args.allow_symlinks, write_csv=not args.baseline)
    outcome = _check_baseline(args, result) if args.baseline else None
    print(result.csv_path)
    print(result.summary())
    if outcome is not None:
        print(f"baseline {outcome.written}: {outcome.path}" if outcome.written and outcome.passed
              else outcome.message("--update-baseline") or outcome.regression.summary())
    baseline_ok = outcome is None or outcome.passed
    if args.fail_on_breach and not (result.passed and baseline_ok):
        return EXIT_BREACH
    return EXIT_OK


def _check_baseline(args, result):
    """Check (or write) --baseline FILE and write the CSV with its columns; a bad baseline is an exit-2 error."""
    from .errors import AitLlmError
    from .report.baseline import check_baseline

    outcome = check_baseline(result, args.baseline, update=args.update_baseline, output_dir=args.output)
    if outcome.error:
        raise AitLlmError(outcome.error)
    return outcome


def _dump(args) -> int:
    from .dump.atb_exec import atb_dump_env, run_atb_command

    env = atb_dump_env(args.output, tokens=args.execute_range, save_time=args.save_time,
                       save_part=args.save_tensor_part)
    dump = run_atb_command(args.exec_cmd, output_dir=args.output, env=env, timeout=args.timeout, fresh=False,
                           label="--exec")
    print(dump.root)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from .errors import AitLlmError

    args = build_parser().parse_args(argv)
    try:
        return _compare(args) if args.command == "compare" else _dump(args)
    except AitLlmError as exc:
        print(f"ait-llm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"ait-llm: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ait-llm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
