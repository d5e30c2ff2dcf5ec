"""While a sweep runs, SIGTERM and SIGHUP reach the SIGINT handler Tune installs for Ctrl-C (its
graceful stop); without a callable SIGINT handler they stop the command as Ctrl-C does. No Ray: the
handlers are plain functions. The real sweep stopped by SIGTERM is in
tests/test_tune_resume_integration.py."""

from __future__ import annotations

import signal

import pytest

from jobs.sweep.tune import stops_like_ctrl_c

STOPS = pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])


@pytest.fixture
def sigint_handler():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


@STOPS
def test_stop_signals_go_to_the_sigint_handler_while_tune_runs(sigint_handler: None, stop: signal.Signals) -> None:
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))  # as Tune's handler is
    before = signal.getsignal(stop)
    with stops_like_ctrl_c():
        signal.raise_signal(stop)
    assert calls == [signal.SIGINT]
    assert signal.getsignal(stop) is before  # put back after the sweep


@STOPS
def test_stop_signals_without_a_sigint_handler_stop_like_ctrl_c(sigint_handler: None, stop: signal.Signals) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with pytest.raises(KeyboardInterrupt, match=stop.name):
        with stops_like_ctrl_c():
            signal.raise_signal(stop)
