"""The run's lines about its worker group (jobs.training.worker_watch), driven with stand-ins for
what Ray Train's controller hands its callbacks: a poll status with errors, a started group."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import jobs.training.worker_watch
from jobs.training.worker_watch import make_worker_watch


@pytest.fixture(autouse=True)
def _test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller's logging set-up stays out of this process (caplog reads the records)."""
    monkeypatch.setattr(jobs.training.worker_watch, "configure_worker_logging", lambda *args, **kwargs: None)


def _lose_and_restart(watch, errors: dict, size: int) -> None:
    watch.after_worker_group_poll_status(SimpleNamespace(errors={}))  # a healthy poll says nothing
    watch.after_worker_group_poll_status(SimpleNamespace(errors=errors))
    watch.after_worker_group_poll_status(SimpleNamespace(errors=errors))  # the same loss, seen again
    watch.after_worker_group_start(SimpleNamespace(get_workers=lambda: [object()] * size))


@pytest.mark.parametrize("workers, max_failures, then", [
    ((1, 2), 2, "continuing from the last checkpoint with 1 to 2 workers, as the cluster allows"),
    (2, 2, "restarting 2 workers from the last checkpoint"),
    (2, 0, "no restart left (run.max_failures=0): the run stops"),
])
def test_a_lost_worker_and_the_restart_are_said_once_each(workers, max_failures, then, caplog) -> None:
    watch = make_worker_watch(workers, max_failures=max_failures, level=logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="jobs.training.driver"):
        watch.after_worker_group_start(SimpleNamespace(get_workers=lambda: [object()] * 2))  # the first start: nothing
        _lose_and_restart(watch, {1: RuntimeError("node died\ntraceback...")}, size=1)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == f"lost worker 1 (RuntimeError: node died); {then}"
    assert lines[1].startswith("workers running again: 1 worker of 2, ") and lines[1].endswith(" s after the loss")


def test_every_loss_counts_against_max_failures(caplog) -> None:
    watch = make_worker_watch((1, 2), max_failures=1, level=logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="jobs.training.driver"):
        _lose_and_restart(watch, {0: RuntimeError("a")}, size=2)
        _lose_and_restart(watch, {0: RuntimeError("b"), 1: RuntimeError("c")}, size=1)
    losses = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost")]
    assert losses[0].endswith("as the cluster allows")
    assert losses[1].startswith("lost workers 0, 1 (RuntimeError: b); no restart left")
