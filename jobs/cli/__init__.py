"""The `salgl` command. Each subcommand lives in its own module exposing
``register(subparsers) -> None``; the parser imports them lazily so ``salgl --help`` stays fast
and a broken optional command cannot break the others."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import traceback

from jobs.stop_signals import handling, stop_like_ctrl_c

# subcommand name -> module that defines it (module.register(subparsers) adds the parser and sets
# `func` on it, which receives the parsed namespace and returns an exit code).
COMMANDS: dict[str, str] = {
    "prepare": "jobs.cli.prepare",
    "train": "jobs.cli.train",
    "evaluate": "jobs.cli.evaluate",
    "predict": "jobs.cli.predict",
    "serve": "jobs.cli.serve",
    "inspect": "jobs.cli.inspect",
    "tune": "jobs.cli.tune",
    "submit": "jobs.cli.submit",
    "jobs": "jobs.cli.jobs",
}


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """-v / -q / --debug, on every (sub)command so they may follow its other arguments."""
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv: debug logs)")
    group.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    group.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that end a command line (``salgl train``, ``salgl prepare mosaic``, ...)."""
    children = [
        child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child in dict.fromkeys(action.choices.values())
    ]
    return [leaf for child in children for leaf in leaf_parsers(child)] if children else [parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salgl", description="Scene-Aware Label Graph Learning pipeline")
    parser.add_argument("--version", action="version", version=f"salgl {project_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(subparsers)
    for leaf in leaf_parsers(parser):
        add_common_options(leaf)
    return parser


def project_version() -> str:
    try:
        return importlib.metadata.version("salgl")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def report(command: str, err: BaseException, debug: bool) -> None:
    """``salgl CMD: error: MESSAGE`` on stderr; the traceback before it with ``--debug``."""
    if debug:
        traceback.print_exception(err)
    message = str(err) or type(err).__name__
    print(f"salgl {command}: error: {message}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; the one place where failures become exit codes (salgl.errors)."""
    from salgl.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, SalglError

    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except SalglError as err:
        report(args.command, err, debug)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGHUP (jobs.stop_signals)
        if debug:
            traceback.print_exception(err)
        print(f"salgl {args.command}: interrupted" + (f" ({err.args[0]})" if err.args else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except FileNotFoundError as err:  # a path given on the command line (or in a config) is not there
        report(args.command, err, debug)
        return EXIT_USAGE
    except OSError as err:  # an unreadable file met while working: its message names it
        report(args.command, err, debug)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "args", None)  # train's and tune's [CONFIG] key=value ...
    if extra and isinstance(overrides, list) and all("=" in item and not item.startswith("-") for item in extra):
        # argparse collects a positional list in one run, so `salgl tune tiny --samples 4 K=2,4`
        # leaves K=2,4 over: it is one of the overrides all the same.
        overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from jobs.logs import configure_logging

    configure_logging(args.verbose - args.quiet)
    with handling(stop_like_ctrl_c):  # clean-up runs: temporary folders removed, runs marked
        return run_command(args)
