"""Integration: a sweep whose folder is in an S3 bucket (``run.storage=s3://...``), on a real
S3-compatible server on 127.0.0.1 (moto's server mode), through a real `salgl tune` subprocess.

Stopped with SIGTERM once a trial has finished, continued with ``--resume s3://...``: Tune's state
(scheduler and searcher), every trial's run and checkpoints, the sweep record, summary and log are
in the bucket, nothing of the sweep but logs lies on the local disk, and the resumed Optuna search
is the saved study (a random sweep resumed from a local folder: tests/test_tune_resume_integration.py).
A module of its own: the sweep's subprocess starts its own Ray instance, and no other may be up
(see tests/test_tune_resume_integration.py).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._sweep import sweep_overrides
from tests.conftest import S3_BUCKET as BUCKET

pytestmark = pytest.mark.integration


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))


def _a_trial_finished(s3, prefix: str, epochs: int) -> bool:
    metas = [k for k in _keys(s3, prefix) if k.startswith("trials/") and k.endswith("/meta.json")]
    return any(json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + k)["Body"].read()).get("epoch") == epochs
               for k in metas)


def _interrupt_after_a_trial(cmd: list[str], s3, prefix: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not _a_trial_finished(s3, prefix, 1):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1)  # polling the bucket a child process writes to, not synchronising the test
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def _local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.timeout(900)
def test_a_sweep_in_s3_is_interrupted_and_resumes_from_the_bucket(s3_endpoint, mosaic_dir: str, tmp_path: Path) -> None:
    s3 = s3_endpoint
    prefix = "sweeps/sweep-s3/"
    overrides = {**sweep_overrides(mosaic_dir, tmp_path), "run.storage": f"s3://{BUCKET}/sweeps", "run.name": "sweep-s3"}
    args = [f"{k}={v}" for k, v in {**overrides, "K": "1,2", "lambda": "1.0", "T": "1"}.items()]
    cmd = [sys.executable, "-m", "jobs.cli", "tune", "tiny", *args, "--samples", "2", "--max-epochs", "1", "--search", "optuna"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    work = tmp_path / "cwd"
    work.mkdir()

    stopped = _interrupt_after_a_trial(cmd, s3, prefix, env, work)
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert f"salgl tune --resume s3://{BUCKET}/sweeps/sweep-s3" in stopped.stdout, stopped.stdout[-3000:]

    resumed = subprocess.run([sys.executable, "-m", "jobs.cli", "tune", "--resume", f"s3://{BUCKET}/sweeps/sweep-s3"],
                             capture_output=True, text=True, env=env, cwd=work, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep sweep-s3 (optuna search)" in resumed.stderr and "[2/2 trials done]" in resumed.stderr
    assert "registered: models:/salgl/" in resumed.stderr, resumed.stderr[-3000:]

    keys = _keys(s3, prefix)
    assert {"salgl_sweep.json", "salgl.log", "summary/summary.json", "summary/summary.csv"} <= set(keys), keys
    assert any(k.startswith("tune/experiment_state") for k in keys), keys  # Tune's own state
    assert any(k.startswith("tune/searcher-state") for k in keys), keys  # the Optuna study, restored by --resume
    trials = {k.split("/")[1] for k in keys if k.startswith("trials/trial-")}
    assert len(trials) == 2, keys
    for trial in trials:
        assert {f"trials/{trial}/salgl_run.json", f"trials/{trial}/salgl.log"} <= set(keys), [k for k in keys if trial in k]
        assert any(k.startswith(f"trials/{trial}/checkpoint_") and k.endswith("/state.pt") for k in keys), keys
    summary = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "summary/summary.json")["Body"].read())
    assert sorted(row["K"] for row in summary) == [1, 2]
    assert all(row["best_checkpoint"].startswith(f"s3://{BUCKET}/{prefix}trials/") for row in summary)

    # The resumed searcher is the saved study, holding the trial told to it before the interrupt (a
    # fresh study would hold the later trial alone), and it asked no more.
    newest = max(k for k in keys if k.startswith("tune/searcher-state"))  # named by the session's start time
    study = pickle.loads(s3.get_object(Bucket=BUCKET, Key=prefix + newest)["Body"].read())["_ot_study"]
    told = [(t.state.name, t.params) for t in study.get_trials(deepcopy=False)]
    assert [state for state, _ in told] == ["COMPLETE", "COMPLETE"], told  # max_t = 1: nothing for ASHA to stop
    assert sorted(params["model.head.num_scenes"] for _, params in told) == [1, 2]
    from mlflow.tracking import MlflowClient

    record = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "salgl_sweep.json")["Body"].read())
    assert record["search"] == "optuna"
    assert MlflowClient(overrides["run.tracking_uri"]).get_run(record["parent_run_id"]).data.params["sweep.search"] == "optuna"

    # On the local disk: the MLflow store and the data this test made, the log cache, nothing of the sweep.
    assert _local_files(work) == []
    cache = Path(os.environ["XDG_CACHE_HOME"])
    assert not any("checkpoint_" in name or name.endswith(".pt") for name in _local_files(cache)), _local_files(cache)
