"""Integration: an ASHA sweep on a local Ray instance (2 CPUs), tiny mosaic data, MLflow sqlite.

Trials run one at a time on 2 CPUs. The grid puts a learning rate that learns nothing after one
that learns, so ASHA has a worse trial to stop at its first rung whatever the noise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salgl.config import preset

pytestmark = pytest.mark.integration
MAX_EPOCHS = 3


@pytest.fixture(scope="module")
def mosaic_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = tmp_path_factory.mktemp("data") / "mosaic"
    convert_mosaic(out, MosaicConfig(train=128, test=32, canvas=64), progress=False)
    return str(out)


def _overrides(mosaic_dir: str, root: Path) -> dict:
    return {
        "data.path": mosaic_dir, "data.img_size": 64, "optim.batch_size": 16, "run.workers": 1,
        "run.storage": str(root / "runs"), "run.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "ema.decay": 0.5, "run.keep_checkpoints": 1,
    }


SPACE = {"K": "grid:1,2", "optim.lr": "grid:0.003,1e-9", "lambda": "1.0", "T": "1"}


@pytest.fixture(scope="module")
def sweep(mosaic_dir, tmp_path_factory):
    import ray

    from jobs.tune import tune_sweep

    root = tmp_path_factory.mktemp("sweep")
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        cfg = preset("tiny", {**_overrides(mosaic_dir, root), "run.name": "sweep-a"})
        yield tune_sweep(cfg, samples=1, max_epochs=MAX_EPOCHS, space_overrides=SPACE, register_as="salgl-test")
    finally:
        ray.shutdown()


@pytest.mark.timeout(900)
def test_asha_stops_a_trial_and_the_summary_covers_every_trial(sweep) -> None:
    assert len(sweep.summary) == 4
    assert {row["K"] for row in sweep.summary} == {1, 2}
    stopped = [row for row in sweep.summary if row["stopped_early"]]
    assert stopped, f"ASHA stopped nothing: {sweep.summary}"
    assert all(row["epochs"] < MAX_EPOCHS for row in stopped)
    assert sweep.best["best_ema_mAP"] == max(r["best_ema_mAP"] for r in sweep.summary if r["best_ema_mAP"] is not None)


@pytest.mark.timeout(900)
def test_mlflow_holds_parent_and_named_children(sweep) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    parent = client.get_run(sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    assert len(children) == 4
    for child in children:
        params = child.data.params
        assert child.info.run_name.startswith(f"K{params['K']}-lam1.0-T1-")
        assert child.info.status in ("FINISHED", "KILLED")
        assert client.get_metric_history(child.info.run_id, "ema_mAP")
    stopped = [c for c in children if c.data.tags.get("asha.stopped_early") == "true"]
    assert stopped and all(c.info.status == "KILLED" for c in stopped)
    files = {Path(a.path).name for a in client.list_artifacts(sweep.parent_run_id, "sweep")}
    assert {"summary.csv", "summary.json", "best_map_vs_K.png", "scene_entropy_vs_K.png", "asha_stopped.json"} <= files


@pytest.mark.timeout(900)
def test_best_checkpoint_is_registered_and_predicts(sweep) -> None:
    import mlflow.pytorch

    from jobs.checkpoints import read_checkpoint

    assert sweep.registered_model == "models:/salgl-test/1"
    best_meta = json.loads((Path(sweep.best["best_checkpoint"]) / "meta.json").read_text())
    assert best_meta["metrics"]["ema_mAP"] == pytest.approx(sweep.best["best_ema_mAP"])
    assert read_checkpoint(sweep.best["best_checkpoint"])["epoch"] >= 1
    mlflow.set_tracking_uri(sweep.tracking_uri)
    model = mlflow.pytorch.load_model(sweep.registered_model)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 10) and torch.isfinite(out.logits).all()


@pytest.mark.timeout(1200)
def test_interrupted_sweep_resumes(mosaic_dir, tmp_path) -> None:
    """Ctrl-C a real `salgl tune` once a trial has finished; --resume completes the rest."""
    overrides = {**_overrides(mosaic_dir, tmp_path), "run.name": "sweep-b"}
    args = [f"{k}={v}" for k, v in {**overrides, **SPACE}.items()]
    cmd = [sys.executable, "-m", "jobs.cli", "tune", "tiny", *args, "--samples", "1", "--max-epochs", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    trials = tmp_path / "runs" / "sweep-b" / "trials"
    # Wait (bounded) until one trial's run holds its final checkpoint, then interrupt.
    deadline = time.monotonic() + 600
    while not any(json.loads(p.read_text()).get("epoch") == 2 for p in trials.glob("trial-*/checkpoint_*/meta.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1)  # polling a child process's output files, not synchronising the test
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert "salgl tune --resume" in output, output[-3000:]
    assert proc.returncode == 130, output[-3000:]
    assert "registered:" not in output, "an interrupted sweep must not pick a best trial yet"

    resumed = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "tune", "--resume", str(tmp_path / "runs" / "sweep-b")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "registered: models:/salgl/" in resumed.stdout
    assert len(list(trials.glob("trial-*"))) == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(overrides["run.tracking_uri"])
    record = json.loads((tmp_path / "runs" / "sweep-b" / "salgl_sweep.json").read_text())
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4, "a finished trial must not be run again (nor logged twice) after resuming"

