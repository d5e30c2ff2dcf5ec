"""The failures a user can act on, each with its exit code (mapped once, in ``jobs.cli.main``).

- ``UsageError`` (exit 2): the request cannot run as given (a missing run, dataset, checkpoint or
  list file; a run that exists; a bad value). The message says what to change.
- ``Failed`` (exit 1): the request was fine but the work failed (a corrupt checkpoint, a shard
  that no longer matches its manifest, a training run that diverged).
- ``Interrupted`` (exit 130): stopped by the user; the message says how to continue.

``salgl`` prints any of them as one line, ``salgl CMD: error: MESSAGE``, and their traceback only
with ``--debug``. Each is also the built-in error its kind has always been (``FileNotFoundError``,
``ValueError``, ...), so callers of the library catch them as before. They live in ``salgl`` (the
lowest layer) so that ``pipeline`` and ``jobs`` raise the same ones.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class SalglError(Exception):
    """A failure reported as one line; ``exit_code`` says how the command ends."""

    exit_code = EXIT_FAILED


class UsageError(SalglError):
    """A request that cannot run as given; the message says what to change."""

    exit_code = EXIT_USAGE


class NotFound(UsageError, FileNotFoundError):
    pass


class AlreadyExists(UsageError, FileExistsError):
    pass


class BadValue(UsageError, ValueError):
    pass


class Failed(SalglError):
    """The request was valid, the work failed; the message names what and where."""


class CorruptFile(Failed, ValueError):
    """A file that exists but is not what it should be (truncated, altered, not ours)."""


class Interrupted(SalglError):
    """Stopped by the user (Ctrl-C, SIGTERM); the message says how to continue."""

    exit_code = EXIT_INTERRUPTED
