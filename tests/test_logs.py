"""Logging (jobs/logs.py) and the in-epoch progress line (jobs/training/progress.py): levels from
-v / -q, the run folder's salgl.log, the known noise, and the progress throttle on a fake clock."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

from jobs.logs import (
    FILE_ONLY, LOG_FILE, LOGGERS, NOISE_ENV, configure_logging, configure_worker_logging, console_level, level_for, run_log,
)
from jobs.training.progress import ProgressBar, StepProgress, format_duration, format_step_line

TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_BANNER = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."


@pytest.fixture(autouse=True)
def logging_state(monkeypatch: pytest.MonkeyPatch):
    """Each test leaves the process's logging (and the noise environment) as it found it."""
    names = ["", *LOGGERS, TOKEN_LOGGER]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate,
                 list(logging.getLogger(n).filters)) for n in names}
    for key in NOISE_ENV:
        monkeypatch.delenv(key, raising=False)
    yield
    for n, (level, handlers, propagate, filters) in saved.items():
        logger = logging.getLogger(n)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.setLevel(level)
        logger.handlers[:], logger.propagate, logger.filters[:] = handlers, propagate, filters


def test_levels_follow_verbose_and_quiet() -> None:
    assert [level_for(v) for v in (-2, -1, 0, 1, 2)] == [logging.WARNING] * 2 + [logging.INFO, logging.DEBUG, logging.DEBUG]
    for verbosity, console, ours, others in [
        (-1, logging.WARNING, logging.INFO, logging.WARNING),  # -q: our loggers keep INFO for the run log
        (0, logging.INFO, logging.INFO, logging.WARNING),
        (1, logging.DEBUG, logging.DEBUG, logging.INFO),
        (2, logging.DEBUG, logging.DEBUG, logging.DEBUG),
    ]:
        configure_logging(verbosity)
        assert console_level() == console
        assert all(logging.getLogger(n).level == ours for n in LOGGERS)
        assert logging.getLogger().level == others
    assert sum(h.name == "salgl-console" for h in logging.getLogger().handlers) == 1  # replaced, never added


def test_console_shows_our_lines_at_info_and_only_warnings_at_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(0)
    logging.getLogger("jobs.training.driver").info("run r: 2 workers")
    logging.getLogger("urllib3.connectionpool").info("a library's chatter")
    logging.getLogger("urllib3.connectionpool").warning("a library's real warning")
    err = capsys.readouterr().err.splitlines()
    assert err == ["[salgl] run r: 2 workers", "[urllib3.connectionpool] warning: a library's real warning"]
    configure_logging(-1)
    logging.getLogger("jobs.training.driver").info("hidden")
    logging.getLogger("jobs.sweep.tune").warning("sweep failed")
    assert capsys.readouterr().err.splitlines() == ["[salgl] warning: sweep failed"]


def passes(logger_name: str, message: str) -> bool:
    """Whether the logger's filters let a WARNING record through (wherever Ray sends it then)."""
    logger = logging.getLogger(logger_name)
    return bool(logger.filter(logger.makeRecord(logger_name, logging.WARNING, __file__, 0, message, (), None)))


def test_known_noise_is_off_by_default_and_back_with_verbose() -> None:
    configure_logging(0)
    assert not passes(TOKEN_LOGGER, TOKEN_BANNER)
    assert passes(TOKEN_LOGGER, "Token authentication is disabled for this Ray cluster.")  # a real warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead.", FutureWarning)
        warnings.warn("some other future change", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other future change"]
    assert {key: os.environ[key] for key in NOISE_ENV} == NOISE_ENV
    assert Path(NOISE_ENV["RAY_DATA_LOGGING_CONFIG"]).is_file()

    configure_logging(1)
    assert passes(TOKEN_LOGGER, TOKEN_BANNER)
    assert not any(key in os.environ for key in NOISE_ENV)


def test_a_users_noise_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    configure_logging(0)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    configure_logging(1)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"


def test_run_log_writes_the_run_folder_and_stops_at_its_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(-1)  # -q: the console shows warnings only, the run log still gets INFO
    log = logging.getLogger("jobs.training.driver")
    with run_log(tmp_path / "run") as path:
        log.info("run r: 2 workers")
        logging.getLogger("pipeline.ingest").debug("not at INFO")
    log.info("after the run")
    assert path == tmp_path / "run" / LOG_FILE
    text = path.read_text()
    assert "INFO jobs.training.driver: run r: 2 workers" in text
    assert "not at INFO" not in text and "after the run" not in text
    assert capsys.readouterr().err == ""

    with pytest.raises(ValueError), run_log(tmp_path / "run"):  # appended, and the error recorded
        raise ValueError("data shard ended early")
    lines = path.read_text().splitlines()
    assert lines[0].endswith("run r: 2 workers")
    assert any(line.endswith("ended by ValueError: data shard ended early") for line in lines)
    assert "Traceback" in path.read_text()


def test_run_log_records_info_where_nothing_was_configured(tmp_path: Path) -> None:
    """A sweep's trial process: no console set up, and still a complete log in the trial's folder."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    with run_log(tmp_path) as path:
        logging.getLogger("jobs.training.driver").info("trial run")
    assert path.read_text().rstrip().endswith("trial run")
    assert logging.getLogger("jobs").level == logging.NOTSET  # restored


def test_worker_logging_writes_console_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / LOG_FILE
    configure_worker_logging(logging.WARNING, log_file)  # a sweep's trial: console quiet
    logging.getLogger("jobs.training.progress").info("epoch 1/2  step 4/16")
    logging.getLogger("jobs.training.recipe").warning("slow shard")
    configure_worker_logging(logging.WARNING, log_file)  # configuring again replaces the handlers
    logging.getLogger("jobs.training.recipe").warning("once")
    assert capsys.readouterr().err.splitlines() == ["[salgl] warning: slow shard", "[salgl] warning: once"]
    text = log_file.read_text()
    assert "epoch 1/2  step 4/16" in text and text.count("once") == 1
    assert not logging.getLogger("jobs").propagate  # Ray Train's root console handler would print it twice


def test_file_only_records_stay_off_the_console(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure_worker_logging(logging.INFO, tmp_path / LOG_FILE)
    logging.getLogger("jobs.training.progress").info("epoch 1/2  step 4/16", extra=FILE_ONLY)  # the bar shows it
    assert capsys.readouterr().err == ""
    assert "epoch 1/2  step 4/16" in (tmp_path / LOG_FILE).read_text()


def test_duration_and_step_line() -> None:
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7325)] == ["0:00", "0:59", "1:01", "59:59", "1:00:00", "2:02:05"]
    line = format_step_line(2, 10, 40, 128, 52.34, 102.0, 2.43121)
    assert line == "epoch 2/10  step 40/128  loss 2.4312  52.3 img/s  ETA 1:42"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_writes_a_line_every_interval_with_rate_and_eta() -> None:
    clock, lines = FakeClock(), []
    progress = StepProgress(10, epoch=1, epochs=3, world_size=2, every_s=30.0, clock=clock, emit=lines.append)
    for step in range(1, 11):  # 8 images per step on this rank, 12 s a step
        clock.now += 12.0
        progress.update(step, 8 * step, 1.0 / step)
    # due at 36 s (step 3) and 72 s (step 6) and 108 s (step 9); never on the last step
    assert [line.split("  ")[1] for line in lines] == ["step 3/10", "step 6/10", "step 9/10"]
    # measured from the end of step 1: 2 steps of 8 images in 24 s; world size 2: twice rank 0's rate
    assert lines[0] == format_step_line(1, 3, 3, 10, 16 * 2 / 24.0, 7 * 12.0, 1 / 3)


def test_progress_leaves_the_first_steps_wait_out_of_the_rate() -> None:
    clock, lines = FakeClock(), []
    progress = StepProgress(20, epoch=1, epochs=1, clock=clock, emit=lines.append)
    clock.now += 40.0  # the data pipeline starts: the first batch takes 40 s
    progress.update(1, 8, 2.0)
    assert lines == []  # due, but no rate to tell yet
    clock.now += 2.0
    progress.update(2, 16, 2.0)
    assert lines == [format_step_line(1, 1, 2, 20, 4.0, 36.0, 2.0)]


def test_progress_step_fallback_and_disabled_ranks() -> None:
    clock, lines = FakeClock(), []
    progress = StepProgress(100, epoch=1, epochs=1, every_s=30.0, every_steps=25, clock=clock, emit=lines.append)
    for step in range(1, 101):  # fast steps: the step count comes first
        clock.now += 0.1
        progress.update(step, step, 0.5)
    assert [line.split("  ")[1] for line in lines] == ["step 25/100", "step 50/100", "step 75/100"]

    def no_clock() -> float:
        raise AssertionError("a rank that writes nothing reads no clock")

    silent = StepProgress(100, epoch=1, epochs=1, every_steps=1, enabled=False, emit=lines.append)
    silent.clock = no_clock
    for step in range(1, 101):
        silent.update(step, step, 0.5)
    assert len(lines) == 3


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_ray_data_loads_the_quiet_config(tmp_path: Path) -> None:
    """The file mirrors Ray Data's own default config: a Ray that no longer reads it fails here, not
    at ``import ray.data`` in every process of a run."""
    import subprocess
    import sys

    probe = (
        "import logging, ray.data\n"
        "data = logging.getLogger('ray.data')\n"
        "print(sorted(logging.getLevelName(h.level) for h in data.handlers), "
        "logging.getLevelName(logging.getLogger('ray.data._internal.progress').getEffectiveLevel()))\n"
    )
    env = {**os.environ, "RAY_DATA_LOGGING_CONFIG": NOISE_ENV["RAY_DATA_LOGGING_CONFIG"]}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['NOTSET',", "'WARNING']", "ERROR"]  # file: everything; console: warnings


def test_the_status_file_follows_the_steps_at_most_once_a_second(tmp_path: Path) -> None:
    import json

    clock, status = FakeClock(), tmp_path / "progress.json"
    progress = StepProgress(6, epoch=2, epochs=3, clock=clock, emit=lambda line: None, status_file=status)
    seen = []
    for step in range(1, 7):
        clock.now += 0.4
        progress.update(step, 4 * step, 0.5)
        seen.append(json.loads(status.read_text())["step"])
    assert seen == [1, 1, 1, 4, 4, 6]  # at the first step, then a second apart, and at the last step
    last = json.loads(status.read_text())
    assert last == {"epoch": 2, "epochs": 3, "step": 6, "total": 6, "images_per_s": pytest.approx(10.0), "eta_s": 0.0, "loss": 0.5}


def test_the_bar_shows_the_status_and_starts_again_each_epoch(tmp_path: Path) -> None:
    import io
    import json

    status, screen = tmp_path / "progress.json", io.StringIO()
    bar = ProgressBar(status, stream=screen)
    bar.poll()  # nothing written yet: no bar
    assert bar.bar is None
    for epoch, step in ((1, 3), (1, 5), (2, 1), (2, 2)):
        status.write_text(json.dumps({"epoch": epoch, "epochs": 2, "step": step, "total": 8, "images_per_s": 12.5,
                                      "eta_s": 65.0, "loss": 0.25}))
        os.utime(status, ns=(step * 10**9 + epoch, step * 10**9 + epoch))  # a new mtime, as each write has
        bar.poll()
        assert (bar.epoch, bar.bar.n, bar.bar.total) == (epoch, step, 8)
    status.write_text(json.dumps({"epoch": 2, "epochs": 2, "step": 8, "total": 8, "images_per_s": 12.5, "eta_s": 0.0, "loss": 0.25}))
    bar.poll()
    assert bar.bar is None  # the epoch's last step clears the bar for the epoch line
    text = screen.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "5/8" in text and "loss 0.2500  12.5 img/s  ETA 1:05" in text
    bar._close()
