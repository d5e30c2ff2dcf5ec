"""How a `salgl train` run that stops short ends, through the real command on a local Ray instance
(tiny preset, 64 px mosaic):

- Ctrl-C (SIGINT to the process group, as a terminal sends it, once the first epoch line is out):
  exit 130, the MLflow run KILLED, the resume command printed, and that command finishes the run;
- SIGTERM to the command alone: the same end as Ctrl-C, through the same abort of Train's controller;
- a loss that stops being finite: exit 1, the MLflow run FAILED, the epoch, step and loss terms
  named, and no checkpoint of non-finite weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


def _salgl(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, **kwargs,
    )


def _stopped_after_first_epoch(mosaic_dir: str, tmp_path: Path, name: str, *, epochs: int,
                               stop: Callable[[subprocess.Popen], None]) -> tuple[int, list[str]]:
    """A tiny `salgl train` run named ``name`` (runs and MLflow store under ``tmp_path``), stopped by
    ``stop`` once its first epoch line is out (a checkpoint exists by then): (exit code, output lines)."""
    proc = _salgl("train", "tiny", f"data.path={mosaic_dir}", f"run.storage={tmp_path / 'runs'}",
                  f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"run.name={name}", f"optim.epochs={epochs}")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"epoch 1/{epochs}" in line:
            stop(proc)
            break
    lines += proc.stdout.readlines()
    return proc.wait(), lines


def test_ctrl_c_marks_the_run_killed_and_prints_a_resume_command_that_works(mosaic_dir: str, tmp_path: Path) -> None:
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    returncode, lines = _stopped_after_first_epoch(mosaic_dir, tmp_path, "stopped", epochs=2,
                                                   stop=lambda proc: os.killpg(proc.pid, signal.SIGINT))
    output = "".join(lines)
    assert returncode == 130, output
    run_dir = tmp_path / "runs" / "stopped"
    assert f"salgl train: error: interrupted; run stopped stopped. Continue it with: salgl train --resume {run_dir}" in output
    assert not any(line.startswith("Traceback") for line in lines)  # the driver's own; actors' lines carry a prefix

    mlflow.set_tracking_uri(tracking)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"

    resumed = _salgl("train", "--resume", str(run_dir))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["epoch"] == 2


def test_sigterm_stops_a_run_as_ctrl_c_does(mosaic_dir: str, tmp_path: Path) -> None:
    """SIGTERM to the command alone (`kill`, `timeout`, a scheduler): Ray's own handler
    (sys.exit(15), then its failure handler's stack dump) must not replace the command's."""
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    returncode, lines = _stopped_after_first_epoch(mosaic_dir, tmp_path, "terminated", epochs=3,
                                                   stop=lambda proc: proc.send_signal(signal.SIGTERM))
    output = "".join(lines)
    assert returncode == 130, output
    run_dir = tmp_path / "runs" / "terminated"
    assert f"salgl train: error: interrupted; run terminated stopped. Continue it with: salgl train --resume {run_dir}" in output
    assert "received at time" not in output  # no stack dump from Ray's failure handler
    assert "SIGTERM: stopping the run's workers" in output  # the controller's abort, as for Ctrl-C
    mlflow.set_tracking_uri(tracking)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"


def test_a_run_whose_loss_stops_being_finite_fails_naming_epoch_step_and_terms(mosaic_dir: str, tmp_path: Path) -> None:
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _salgl("train", "tiny", f"data.path={mosaic_dir}", f"run.storage={tmp_path / 'runs'}", f"run.tracking_uri={tracking}",
                  "run.name=diverges", "optim.lr=1e30", "optim.epochs=3", "run.checksum_every=1")
    output = proc.communicate()[0]
    assert proc.returncode == 1, output
    assert "salgl train: error: training diverged: " in output and "at epoch 1, step " in output
    assert "loss_cls" in output and "finished" not in output
    mlflow.set_tracking_uri(tracking)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert not list((tmp_path / "runs" / "diverges").glob("checkpoint_*/state.pt"))  # no checkpoint of NaN weights
