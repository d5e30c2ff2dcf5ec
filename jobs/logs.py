"""Logging for salgl, chosen once per process.

The ``salgl`` command calls ``configure_logging`` with its ``-v`` / ``-q`` count; the Ray processes
that run our code for a run (the Train controller's epoch reporter, the training workers) call
``configure_worker_logging`` with the console level the command chose (``console_level``). Every
run also writes its log into its folder (``run_log``: ``<run folder>/salgl.log``).

The console shows our loggers (``salgl``, ``jobs``, ``pipeline``) at INFO, everything else at
WARNING; at the default verbosity the known noise of Ray and MLflow is off (``KNOWN_NOISE``,
``KNOWN_WARNINGS``, ``NOISE_ENV``), and ``-v`` brings it back.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOGGERS = ("salgl", "jobs", "pipeline")
LOG_FILE = "salgl.log"
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_CONSOLE, _FILE = "salgl-console", "salgl-file"  # handler names: configuring again replaces, never adds
FILE_ONLY = {"file_only": True}  # ``extra=`` of a record that goes to salgl.log but not the console

# Records that tell a salgl user nothing, by logger and message start; dropped unless -v.
KNOWN_NOISE = {
    # ray.init on a new local instance: token auth is Ray's default there, not a choice made.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
}
# Python warnings dropped unless -v: (message regex, category).
KNOWN_WARNINGS = (
    # The head's counts stay rank-local until summed, so DDP must not broadcast buffers at all;
    # forward_sync_buffers, which the warning suggests, still syncs them at init.
    (r"`broadcast_buffers` is deprecated", FutureWarning),
)
# Read by MLflow and Ray Data at import, and by Tune as a sweep starts, in this process and in every
# process of a local Ray instance started from here (they inherit the environment); a value the user
# exported wins.
NOISE_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables...", run links
    # "Downloading artifacts" bars, drawn mid-run when logging the model copies its own local files.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Ray Data's console at WARNING ("Dataset ... execution finished") and its progress-bar notices off.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    # Tune's experiment table and "View detailed results here" on stdout, which its new output
    # prints even at verbose=0 (the sweep logs its own lines: jobs.sweep.progress).
    "RAY_AIR_NEW_OUTPUT": "0",
    # Lines other Ray processes print, forwarded to the console (read as Ray is imported). As
    # `salgl serve` stops, Serve's controller is killed while Ray still retries its own
    # graceful_shutdown call, and the raylet says so.
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"Task ServeController\.graceful_shutdown failed",
}


def level_for(verbosity: int) -> int:
    """The console level of our loggers: -q WARNING, default INFO, -v DEBUG."""
    return logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING


class ConsoleFormatter(logging.Formatter):
    """``[salgl] message`` for our records (``[salgl] warning: ...`` from WARNING up), ``[logger]
    level: message`` for other libraries' (only their warnings show, unless -v)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        ours = record.name.partition(".")[0] in LOGGERS
        return f"[salgl] {level}{text}" if ours else f"[{record.name}] {level or 'info: '}{text}"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (pytest replaces it per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def configure_logging(verbosity: int = 0) -> None:
    """The ``salgl`` command's logging: a concise console on stderr, at the level of ``-v`` / ``-q``.

    Our loggers keep INFO even with ``-q`` so that the run log (``run_log``) stays complete; ``-q``
    raises only the console's level. Other libraries show their warnings (``-v``: INFO, ``-vv``:
    everything).
    """
    level = level_for(verbosity)
    console = StderrHandler()
    console.name = _CONSOLE
    console.setLevel(level)
    console.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.name != _CONSOLE] + [console]
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(min(level, logging.INFO))
    quiet_known_noise(verbosity <= 0)


def console_level() -> int:
    """The console level the ``salgl`` command chose (INFO where nothing was configured): what the
    Ray processes of its runs show (``configure_worker_logging``)."""
    return next((h.level for h in logging.getLogger().handlers if h.name == _CONSOLE), logging.INFO)


def configure_worker_logging(level: int, log_file: str | Path | None = None) -> None:
    """Logging in a Ray process that runs our code for a run: our records on stderr at ``level``
    (Ray forwards them to the driver, prefixed with the process), and into ``log_file`` at INFO.

    Our loggers get their own handlers and stop propagating: Ray Train gives its workers' root
    logger a console handler of its own, which would print every line twice.
    """
    console = StderrHandler()
    console.name = _CONSOLE
    console.setLevel(level)
    console.setFormatter(ConsoleFormatter())
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [console]
    if log_file:
        handlers.append(_file_handler(Path(log_file)))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if h.name in (_CONSOLE, _FILE)]:
            logger.removeHandler(handler)
            handler.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(min(level, logging.INFO))
        logger.propagate = False
    quiet_known_noise(level > logging.DEBUG)


@contextmanager
def run_log(folder: str | Path) -> Iterator[Path]:
    """Our records also go to ``<folder>/salgl.log`` (appended: a resumed run continues its log)
    while the context lasts, at INFO whatever the console shows; an exception that ends the
    context is written there too (the console's report of it is the command's)."""
    path = Path(folder) / LOG_FILE
    handler = _file_handler(path)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        logger.addHandler(handler)
    try:
        yield path
    except BaseException as err:
        from salgl.errors import SalglError

        expected = isinstance(err, (SalglError, SystemExit, KeyboardInterrupt))  # the message says it all
        trace = None if expected else (type(err), err, err.__traceback__)
        handler.handle(logging.makeLogRecord({
            "name": __name__, "levelno": logging.ERROR, "levelname": "ERROR",
            "msg": f"ended by {type(err).__name__}: {err}", "exc_info": trace,
        }))
        raise
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()


def _file_handler(path: Path) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.name = _FILE
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    return handler


def quiet_known_noise(quiet: bool = True) -> None:
    """Turn the known noise off (``quiet=False``: back on, but for the warnings filters): see
    ``KNOWN_NOISE``, ``KNOWN_WARNINGS`` and ``NOISE_ENV``. Idempotent."""
    for name, starts in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(old)
        if quiet:
            logger.addFilter(DropMessages(starts))
    if quiet:  # a warnings filter stays for the process (undoing one is not worth private API)
        for pattern, category in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
    for key, value in NOISE_ENV.items():
        if quiet:
            os.environ.setdefault(key, value)
        elif os.environ.get(key) == value:  # ours, not the user's
            del os.environ[key]
