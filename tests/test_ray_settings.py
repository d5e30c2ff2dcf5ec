"""The Ray settings a run applies before it starts Ray or a TorchTrainer: defaults that a user's
exported value overrides, and the MLflow warm-up the Train controller runs as it starts."""

from __future__ import annotations

import os

import pytest

from jobs.resources import WORKER_ALLOCATOR_ENV
from jobs.training.epoch_report import make_tracking_warmup
from jobs.training.ray_setup import CONTROLLER_POLL_S, controller_env_defaults, local_instance_env

POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
SOFT_LIMIT = "RAY_num_workers_soft_limit"
PREEMPTION = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def test_controller_poll_interval_defaults_and_a_user_value_wins(monkeypatch) -> None:
    monkeypatch.delenv(POLL, raising=False)
    controller_env_defaults()
    assert os.environ[POLL] == CONTROLLER_POLL_S and float(CONTROLLER_POLL_S) < 2.0  # Ray's own default is 2 s
    monkeypatch.setenv(POLL, "5")
    controller_env_defaults()
    assert os.environ[POLL] == "5"


def test_local_instance_keeps_more_worker_processes_than_cpus_and_a_user_value_wins(monkeypatch) -> None:
    monkeypatch.delenv(SOFT_LIMIT, raising=False)
    monkeypatch.delenv(PREEMPTION, raising=False)
    local_instance_env()
    # Above the ~10 actor processes of one Train run plus the CPUs' data tasks.
    assert int(os.environ[SOFT_LIMIT]) >= (os.cpu_count() or 1) + 12
    assert os.environ[PREEMPTION] == "0"  # no node of a local instance is ever drained
    monkeypatch.setenv(SOFT_LIMIT, "3")
    monkeypatch.setenv(PREEMPTION, "1")
    local_instance_env()
    assert os.environ[SOFT_LIMIT] == "3" and os.environ[PREEMPTION] == "1"


def test_local_instance_workers_get_the_allocator_settings_and_a_user_value_wins(monkeypatch) -> None:
    for key in WORKER_ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    local_instance_env()
    assert {key: os.environ[key] for key in WORKER_ALLOCATOR_ENV} == WORKER_ALLOCATOR_ENV
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    local_instance_env()
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "0"


@pytest.mark.timeout(120)
def test_tracking_warmup_is_a_controller_callback_that_opens_the_store(tmp_path) -> None:
    from ray.train import UserCallback
    from ray.train.v2._internal.execution.callback import ControllerCallback

    warmup = make_tracking_warmup(f"sqlite:///{tmp_path / 'mlflow.db'}", "no-run-yet")
    # Train hands UserCallbacks only their report hooks; a controller hook needs a ControllerCallback.
    assert isinstance(warmup, ControllerCallback) and not isinstance(warmup, UserCallback)
    warmup.after_controller_start(None)
    assert warmup.thread.daemon  # never holds up the controller's exit
    warmup.thread.join(timeout=100)
    assert (tmp_path / "mlflow.db").is_file()  # the store was opened (and its tables created)
