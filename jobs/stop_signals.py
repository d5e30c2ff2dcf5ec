"""How salgl's commands stop: SIGTERM (what ``kill``, ``timeout`` and schedulers send) and SIGHUP
(a closed terminal) stop a command the way Ctrl-C does, so its clean-up runs and it exits 130.
A signal the process was started ignoring stays ignored (``nohup`` ignores SIGHUP, so the command
outlives its terminal), as Python leaves an ignored SIGINT alone.

All of salgl's signal handling is here: the ``salgl`` command installs ``stop_like_ctrl_c``
(``handling``), ``jobs.training.ray_setup.init_ray`` keeps it across ``ray.init``
(``sigterm_handler_kept``), a training run's ``fit()`` puts its controller abort on Ctrl-C and the
stop signals alike (``jobs.training.interrupt``), and a sweep hands the stop signals to Tune's
graceful Ctrl-C handler (``forward_to_sigint_handler``). Handlers live in the main thread only:
elsewhere these do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def stop_like_ctrl_c(signum: int, frame: Any) -> None:
    """Raise what Ctrl-C raises, naming the signal: ``KeyboardInterrupt('SIGTERM')``."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def forward_to_sigint_handler(signum: int, frame: Any) -> None:
    """Do what Ctrl-C would do now: call the SIGINT handler in place (Tune's, while a sweep runs,
    saves its state and returns), or stop like Ctrl-C where none is callable."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        stop_like_ctrl_c(signum, frame)


def install(handler: Callable[[int, Any], None], signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> dict[signal.Signals, Any]:
    """``handler`` for each of ``signals`` but those ignored (SIG_IGN), which stay ignored; returns
    the handlers it replaced. Main thread only."""
    return {stop: signal.signal(stop, handler) for stop in signals if signal.getsignal(stop) is not signal.SIG_IGN}


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """``handler`` for ``signals`` (but ignored ones, ``install``) while the context lasts; the
    previous handlers after."""
    if not in_main_thread():
        yield
        return
    previous = install(handler, signals)
    try:
        yield
    finally:
        for stop, old in previous.items():
            signal.signal(stop, old)


@contextlib.contextmanager
def handlers_restored(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """The handlers of ``signals`` set again as they were when the context ends, whatever set
    others meanwhile (a library that installs its own for a call)."""
    saved = {stop: signal.getsignal(stop) for stop in signals} if in_main_thread() else {}
    try:
        yield
    finally:
        for stop, old in saved.items():
            if old is not None:  # None: a handler not set from Python, which Python cannot set back
                signal.signal(stop, old)


@contextlib.contextmanager
def sigterm_handler_kept() -> Iterator[None]:
    """Keep the process's Python SIGTERM handler across ``ray.init``.

    ``ray.init`` installs its own (``sys.exit(15)``), and Ray's core worker then puts absl's
    failure handler on SIGTERM, which prints a stack dump and aborts the process (exit 134) after
    our clean-up has run. Setting a Python handler again also takes SIGTERM back from absl (its
    handlers for crashes stay). Where no Python handler was set (library use), Ray's stays.
    """
    ours = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(ours) and in_main_thread():
            signal.signal(signal.SIGTERM, ours)
