"""Integration: an ASHA sweep on a local Ray instance (2 CPUs), tiny mosaic data, MLflow sqlite.

Trials run one at a time on 2 CPUs. The grid puts a learning rate that learns nothing after one
that learns, so ASHA has a worse trial to stop at its first rung whatever the noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from salgl.config import preset

from tests._sweep import SPACE, sweep_overrides

pytestmark = pytest.mark.integration
MAX_EPOCHS = 3
RAY_DASHBOARD = True  # for ray.util.state.list_actors (the ray_local fixture)


@pytest.fixture(scope="module")
def sweep_run(ray_local, mosaic_dir, tmp_path_factory):
    """The sweep's outcome and its log (the lines `salgl tune` shows, kept in the sweep's folder)."""
    from jobs.sweep.tune import tune_sweep

    root = tmp_path_factory.mktemp("sweep")
    cfg = preset("tiny", {**sweep_overrides(mosaic_dir, root), "run.name": "sweep-a"})
    outcome = tune_sweep(cfg, samples=1, max_epochs=MAX_EPOCHS, space_overrides=SPACE, register_as="salgl-test")
    return outcome, (Path(outcome.sweep_dir) / "salgl.log").read_text()


@pytest.fixture(scope="module")
def sweep(sweep_run):
    return sweep_run[0]


@pytest.mark.timeout(900)
def test_asha_stops_a_trial_and_the_summary_covers_every_trial(sweep) -> None:
    assert len(sweep.summary) == 4
    assert {row["K"] for row in sweep.summary} == {1, 2}
    stopped = [row for row in sweep.summary if row["stopped_early"]]
    assert stopped, f"ASHA stopped nothing: {sweep.summary}"
    assert all(row["epochs"] < MAX_EPOCHS for row in stopped)
    assert sweep.best["best_ema_mAP"] == max(r["best_ema_mAP"] for r in sweep.summary if r["best_ema_mAP"] is not None)


@pytest.mark.timeout(900)
def test_the_sweep_prints_each_trial_its_epochs_and_asha_stops(sweep_run) -> None:
    outcome, printed = sweep_run
    lines = printed.splitlines()
    for row in outcome.summary:
        name = f"K{row['K']}-lam1.0-T1-{row['trial']}"
        assert sum(line.endswith(f"{name} started") for line in lines) == 1, printed
        epochs = [line for line in lines if f"{name}  epoch " in line]
        assert len(epochs) == row["epochs"] and "EMA mAP" in epochs[-1]
        ended = "stopped by ASHA after epoch" if row["stopped_early"] else f"finished {MAX_EPOCHS} epochs"
        assert sum(f"trial {name} {ended}" in line for line in lines) == 1, printed
        trial_log = (Path(outcome.sweep_dir) / "trials" / f"trial-{row['trial']}" / "salgl.log").read_text()
        assert f"run trial-{row['trial']}: " in trial_log and "EMA mAP" in trial_log  # quiet on the console only
    assert any(line.endswith("[4/4 trials done]") for line in lines)


@pytest.mark.timeout(900)
def test_trials_on_a_local_instance_start_no_preemption_watcher(sweep) -> None:
    """Every trial's Train run read the local instance's settings from the environment the raylet
    passed on: one actor process fewer per trial."""
    from ray.util.state import list_actors

    classes = {actor.class_name for actor in list_actors(limit=10_000)}  # ended actors included
    assert "TrainController" in classes and "PreemptionWatcher" not in classes


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
        assert child.info.status == "FINISHED"
        assert client.get_metric_history(child.info.run_id, "ema_mAP")
    stopped = [c for c in children if c.data.tags.get("asha.stopped_early") == "true"]
    assert stopped and all(c.info.status == "FINISHED" for c in stopped)
    files = {Path(a.path).name for a in client.list_artifacts(sweep.parent_run_id, "sweep")}
    assert {"summary.csv", "summary.json", "best_map_vs_K.png", "scene_entropy_vs_K.png", "asha_stopped.json"} <= files


@pytest.mark.timeout(900)
def test_every_trial_ends_finished_with_its_records_and_asha_stops_are_tagged(sweep) -> None:
    """Completed and ASHA-stopped trials alike: FINISHED, scene pictures, weights only, the params
    and best-so-far metrics runs are compared by, and the dataset they trained on."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    parent = client.get_run(sweep.parent_run_id)
    assert {k: v for k, v in parent.data.params.items() if k.startswith("space.")} == {
        "space.K": "grid[1, 2]", "space.optim.lr": "grid[0.003, 1e-09]", "space.lambda": "1.0", "space.T": "1",
    }
    assert parent.data.params["preset"] == "tiny" and parent.data.params["sweep.metric"] == "ema_mAP"
    rows = {row["trial"]: row for row in sweep.summary}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    for child in children:
        run_id, row = child.info.run_id, rows[child.data.params["trial_id"]]
        assert child.info.status == "FINISHED"
        if row["stopped_early"]:
            assert child.data.tags["salgl.stopped_by"] == "asha"
            assert child.data.tags["salgl.stopped_at_epoch"] == str(row["epochs"])
        else:
            assert "salgl.stopped_by" not in child.data.tags and row["epochs"] == MAX_EPOCHS
        assert {k: child.data.params[k] for k in ("K", "lambda", "T", "preset")} == {
            "K": str(row["K"]), "lambda": "1.0", "T": "1", "preset": "tiny",
        }
        assert child.data.metrics["best_ema_mAP"] == pytest.approx(row["best_ema_mAP"])
        assert 1 <= child.data.metrics["best_epoch"] <= row["epochs"]
        assert len(child.data.tags["mlflow.source.git.commit"]) == 40
        (dataset,) = client.get_run(run_id).inputs.dataset_inputs
        assert dataset.dataset.name == "mosaic" and json.loads(dataset.dataset.profile)["splits"] == {"train": 128, "test": 32}
        scenes = {Path(a.path).name for a in client.list_artifacts(run_id, "scenes")}
        assert {"scene_0_cooccurrence.png", "scene_occupancy.png", "top_labels_per_scene.json"} <= scenes, (row, scenes)
        top = {a.path for a in client.list_artifacts(run_id)}
        assert "best_weights" in top and "best_checkpoint" not in top  # no optimiser state per trial
        assert {Path(a.path).name for a in client.list_artifacts(run_id, "best_weights")} == {"weights.pt", "config.json"}
        assert "metrics/per_class_ap.csv" in {a.path for a in client.list_artifacts(run_id, "metrics")}
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.timeout(900)
def test_best_checkpoint_is_registered_and_predicts(sweep) -> None:
    import io

    import mlflow.pyfunc
    import pandas as pd
    from PIL import Image

    from jobs.training.checkpoints import read_checkpoint

    assert sweep.registered_model == "models:/salgl-test/1"
    best_meta = json.loads((Path(sweep.best["best_checkpoint"]) / "meta.json").read_text())
    assert best_meta["metrics"]["ema_mAP"] == pytest.approx(sweep.best["best_ema_mAP"])
    assert read_checkpoint(sweep.best["best_checkpoint"])["epoch"] >= 1
    mlflow.set_tracking_uri(sweep.tracking_uri)
    model = mlflow.pyfunc.load_model(sweep.registered_model)  # the pyfunc, weights and code without pickles
    images = []
    for shade in (40, 200):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (shade, shade, shade)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    records = model.predict(pd.DataFrame({"image": images}), params={"top_k": 10})
    assert len(records) == 2 and all(len(r["top_k"]) == 10 and 0 <= r["scene"] for r in records)
    assert all(0.0 <= t["score"] <= 1.0 for r in records for t in r["top_k"])
