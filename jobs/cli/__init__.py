"""The `salgl` command. Each subcommand lives in its own module exposing
``register(subparsers) -> None``; the parser imports them lazily so ``salgl --help`` stays fast
and a broken optional command cannot break the others."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that defines it (module.register(subparsers) adds the parser and sets
# `func` on it, which receives the parsed namespace and returns an exit code).
COMMANDS: dict[str, str] = {
    "prepare": "jobs.cli.prepare",
    "train": "jobs.cli.train",
    "evaluate": "jobs.cli.evaluate",
    "predict": "jobs.cli.predict",
    "inspect": "jobs.cli.inspect",
    "tune": "jobs.cli.tune",
    "submit": "jobs.cli.submit",
    "jobs": "jobs.cli.jobs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salgl", description="Scene-Aware Label Graph Learning pipeline")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(subparsers)
    return parser


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
    from jobs.errors import UsageError
    from salgl.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as err:
        print(f"salgl {args.command}: error: {err}", file=sys.stderr)
        return 2

