"""``jobs.stop_signals``: SIGTERM and SIGHUP stop a command as Ctrl-C does. No Ray: the handlers are
plain functions, raised in this process. The processes stopped for real are in
tests/test_serve_process.py, tests/test_train_stops.py and tests/test_tune_resume_integration.py."""

from __future__ import annotations

import signal
import threading

import pytest

from jobs.stop_signals import forward_to_sigint_handler, handling, sigterm_handler_kept, stop_like_ctrl_c

STOPS = pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])


@pytest.fixture(autouse=True)
def handlers_restored():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@STOPS
def test_a_stop_signal_raises_what_ctrl_c_raises_and_the_old_handler_comes_back(stop: signal.Signals) -> None:
    before = signal.getsignal(stop)
    with pytest.raises(KeyboardInterrupt, match=stop.name):
        with handling(stop_like_ctrl_c):
            signal.raise_signal(stop)
    assert signal.getsignal(stop) is before


@STOPS
def test_while_tune_runs_stop_signals_go_to_its_sigint_handler(stop: signal.Signals) -> None:
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))  # as Tune's handler is
    with handling(forward_to_sigint_handler):
        signal.raise_signal(stop)
    assert calls == [signal.SIGINT]


def test_without_a_sigint_handler_a_forwarded_stop_raises_what_ctrl_c_raises() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with handling(forward_to_sigint_handler):
            signal.raise_signal(signal.SIGTERM)


def test_handlers_are_left_alone_outside_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def in_thread() -> None:
        with handling(stop_like_ctrl_c):  # signal.signal would raise ValueError here
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [before]


def test_the_command_handler_outlives_a_library_that_replaces_it() -> None:
    """What ray.init does: its own Python handler on SIGTERM (the C-level absl handler is the
    process test's)."""
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    with sigterm_handler_kept():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    assert signal.getsignal(signal.SIGTERM) is stop_like_ctrl_c


def test_without_a_python_handler_the_library_keeps_its_own() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    replaced = lambda signum, frame: None  # noqa: E731
    with sigterm_handler_kept():
        signal.signal(signal.SIGTERM, replaced)
    assert signal.getsignal(signal.SIGTERM) is replaced
