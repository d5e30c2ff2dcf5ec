"""While a sweep runs, SIGTERM reaches the SIGINT handler Tune installs for Ctrl-C (its graceful
stop); without a callable SIGINT handler it stops the command as Ctrl-C does. No Ray: the handlers
are plain functions. The real sweep stopped by SIGTERM is in tests/test_tune_resume_integration.py."""

from __future__ import annotations

import signal

import pytest

from jobs.sweep.tune import sigterm_stops_like_ctrl_c


@pytest.fixture
def sigint_handler():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigterm_goes_to_the_sigint_handler_while_tune_runs(sigint_handler: None) -> None:
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))  # as Tune's handler is
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_stops_like_ctrl_c():
        signal.raise_signal(signal.SIGTERM)
    assert calls == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the sweep


def test_sigterm_without_a_sigint_handler_stops_like_ctrl_c(sigint_handler: None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_stops_like_ctrl_c():
            signal.raise_signal(signal.SIGTERM)
