"""Errors in what the user asked for (a missing run or dataset, a run that exists, a bad search
space). The `salgl` command prints their message as one line and exits with 2, as argparse does
for a bad option; any other exception keeps its traceback. Each is also the built-in error its
kind has always been (``FileNotFoundError``, ...), so callers of the library see no change."""

from __future__ import annotations


class UsageError(Exception):
    """A request that cannot run as given; the message says what to change."""


class NotFound(UsageError, FileNotFoundError):
    pass


class AlreadyExists(UsageError, FileExistsError):
    pass


class BadValue(UsageError, ValueError):
    pass
