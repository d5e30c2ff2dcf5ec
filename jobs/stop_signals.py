"""How salgl's commands stop: SIGTERM (what ``kill``, ``timeout`` and schedulers send) and SIGHUP
(a closed terminal) stop a command the way Ctrl-C does, so its clean-up runs and it exits 130.

All of salgl's signal handling is here: the ``salgl`` command installs ``stop_like_ctrl_c``
(``handling``), ``jobs.training.driver.init_ray`` keeps it across ``ray.init``
(``sigterm_handler_kept``), and a sweep hands the stop signals to Tune's graceful Ctrl-C handler
(``forward_to_sigint_handler``). Handlers live in the main thread only: elsewhere these do nothing.
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


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """``handler`` for ``signals`` while the context lasts; the previous handlers after."""
    if not in_main_thread():
        yield
        return
    previous = {stop: signal.signal(stop, handler) for stop in signals}
    try:
        yield
    finally:
        for stop, old in previous.items():
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
