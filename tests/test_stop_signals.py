"""``jobs.stop_signals``: SIGTERM and SIGHUP stop a command as Ctrl-C does, an ignored signal stays
ignored, and a training run's ``fit()`` aborts its controller on any of them. No Ray: the handlers
are plain functions, raised in this process (the trainer's with a stand-in controller). The
processes stopped for real are in tests/test_serve_process.py, tests/test_train_stops.py and
tests/test_tune_resume_integration.py."""

from __future__ import annotations

import signal
import threading

import pytest

from jobs.stop_signals import forward_to_sigint_handler, handling, sigterm_handler_kept, stop_like_ctrl_c

STOPS = pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])


@pytest.fixture(autouse=True)
def handlers_restored():
    """Each test starts with SIGHUP at its default, as in a terminal (a suite run under nohup
    inherits it ignored, and an ignored signal is kept ignored by design), and leaves the handlers
    as it found them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
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


def test_an_ignored_signal_stays_ignored() -> None:
    """`nohup salgl train`: SIGHUP ignored from the start, so the command outlives its terminal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with handling(stop_like_ctrl_c):
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)  # nothing happens
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_an_ignored_sighup_is_kept_in_a_process_started_with_it_ignored() -> None:
    """As `nohup` starts a command: the `salgl` entry point's handlers installed, a SIGHUP sent."""
    import subprocess
    import sys

    code = ("import os, signal\n"
            "from jobs.stop_signals import handling, stop_like_ctrl_c\n"
            "with handling(stop_like_ctrl_c):\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert (done.returncode, done.stdout) == (0, "survived\n"), done.stderr


class _Controller:
    """What the trainer's handler calls: ``controller.abort.remote()``, counted."""

    def __init__(self) -> None:
        self.aborts = 0
        self.abort = self

    def remote(self) -> None:
        self.aborts += 1


def _fitting(monkeypatch: pytest.MonkeyPatch) -> _Controller:
    """An ``InterruptibleTorchTrainer`` as ``fit()`` leaves it once Ray Train's controller runs: its
    handlers registered (no Ray started; ``ray.get`` returns at once). Returns the controller."""
    import ray

    from jobs.training.interrupt import InterruptibleTorchTrainer

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    controller = _Controller()
    object.__new__(InterruptibleTorchTrainer)._register_sigint_handler(controller)
    return controller


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"])
def test_a_stop_during_fit_aborts_the_controller_then_raises_what_ctrl_c_raises(
    stop: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = _fitting(monkeypatch)
    with pytest.raises(KeyboardInterrupt, match=stop.name):
        signal.raise_signal(stop)
    assert controller.aborts == 1
    with pytest.raises(KeyboardInterrupt):  # a second stop ends at once, no second abort
        signal.raise_signal(signal.SIGTERM)
    assert controller.aborts == 1


def test_during_fit_an_ignored_sighup_stays_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    controller = _fitting(monkeypatch)
    signal.raise_signal(signal.SIGHUP)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and controller.aborts == 0


def test_fit_leaves_the_handlers_as_it_found_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.torch import TorchTrainer

    from jobs.training.interrupt import InterruptibleTorchTrainer

    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(TorchTrainer, "fit", lambda self: self._register_sigint_handler(_Controller()) or "result")
    assert object.__new__(InterruptibleTorchTrainer).fit() == "result"
    assert {s: signal.getsignal(s) for s in before} == before
