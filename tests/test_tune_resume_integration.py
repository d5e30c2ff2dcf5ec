"""Integration: stop a real `salgl tune` subprocess with SIGTERM and finish the sweep with `--resume`.

SIGTERM (what `kill`, `timeout` and schedulers send) goes to the handler Tune installs for Ctrl-C
(jobs.stop_signals.forward_to_sigint_handler), so this covers the Ctrl-C path too.

A module of its own so that no other Ray instance is up on the machine while it runs (pytest ends
a module's fixtures, the other sweep module's `ray_local` instance included, before the next
module). With two local instances, Ray Train's PlacementGroupCleaner cannot tell which one to query
("multiple active Ray instances"), dies, and the worker placement group of a trial that ASHA
stopped is never released: the next trial then waits for CPUs forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests._sweep import SPACE, sweep_overrides

pytestmark = pytest.mark.integration


def interrupt_after_a_trial(cmd: list[str], trials, epochs: int, env: dict, cwd) -> subprocess.CompletedProcess:
    """Run `salgl tune` and SIGTERM it once one trial's run holds its final (``epochs``) checkpoint
    (waiting bounded); returns the stopped command's code and output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    deadline = time.monotonic() + 600
    while not any(json.loads(p.read_text()).get("epoch") == epochs for p in trials.glob("trial-*/checkpoint_*/meta.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1)  # polling a child process's output files, not synchronising the test
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


@pytest.mark.timeout(1200)
def test_interrupted_sweep_resumes(mosaic_dir, tmp_path) -> None:
    """SIGTERM a real `salgl tune` once a trial has finished; --resume completes the rest."""
    overrides = {**sweep_overrides(mosaic_dir, tmp_path), "run.name": "sweep-b"}
    args = [f"{k}={v}" for k, v in {**overrides, **SPACE}.items()]
    cmd = [sys.executable, "-m", "jobs.cli", "tune", "tiny", *args, "--samples", "1", "--max-epochs", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    trials = tmp_path / "runs" / "sweep-b" / "trials"
    stopped = interrupt_after_a_trial(cmd, trials, 2, env, tmp_path)
    output = stopped.stdout
    assert "sweep interrupted with" in output and "salgl tune --resume" in output, output[-3000:]  # Tune's graceful stop
    assert stopped.returncode == 130, output[-3000:]
    assert "registered:" not in output, "an interrupted sweep must not pick a best trial yet"

    resumed = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "tune", "--resume", str(tmp_path / "runs" / "sweep-b")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "registered: models:/salgl/" in resumed.stderr  # log lines go to stderr
    assert "[4/4 trials done]" in resumed.stderr, resumed.stderr[-3000:]  # the progress callback came back with the sweep
    assert len(list(trials.glob("trial-*"))) == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(overrides["run.tracking_uri"])
    record = json.loads((tmp_path / "runs" / "sweep-b" / "salgl_sweep.json").read_text())
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4, "a finished trial must not be run again (nor logged twice) after resuming"
