"""What every run logs beside its epoch metrics (``jobs.tracking``)."""

from __future__ import annotations

import json

from jobs.tracking import BestSoFar


def test_best_ema_map_and_its_epoch_follow_the_best_epoch_not_the_last() -> None:
    best = BestSoFar()
    assert best.update({"epoch": 1, "loss": 0.3}) == {}
    seen = [best.update({"epoch": e, "ema_mAP": v}) for e, v in ((1, 40.0), (2, 55.0), (3, 50.0))]
    assert seen == [
        {"best_ema_mAP": 40.0, "best_epoch": 1}, {"best_ema_mAP": 55.0, "best_epoch": 2}, {"best_ema_mAP": 55.0, "best_epoch": 2},
    ]
    assert best.update({"epoch": 4, "ema_mAP": float("nan")}) == {"best_ema_mAP": 55.0, "best_epoch": 2}


def test_a_resumed_run_starts_from_its_folders_best_checkpoint(tmp_path) -> None:
    for epoch, value in ((1, 30.0), (2, 45.0), (3, 20.0)):
        folder = tmp_path / f"checkpoint_{epoch}"
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"ema_mAP": value}}))
    best = BestSoFar.from_run_dir(str(tmp_path))
    assert best.update({"epoch": 4, "ema_mAP": 44.0}) == {"best_ema_mAP": 45.0, "best_epoch": 2}
    assert BestSoFar.from_run_dir(str(tmp_path / "none")).update({}) == {}


def test_per_class_ap_is_a_csv_artifact_beside_the_metrics(tmp_path) -> None:
    from jobs.tracking import MlflowLogger, start_run
    from jobs.training.final_artifacts import log_per_class_ap

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MlflowLogger(uri, start_run(uri, "records", run_name="r", params={}))
    log_per_class_ap(logger, {"ema_ap": [50.0, None, 20.125], "ap": [1.0, None, 2.0]}, ["cat", "dog", "sky"])
    log_per_class_ap(logger, {"ema_ap": [50.0, None, 20.125], "ap": [1.0, None, 2.0]}, ["cat", "dog", "sky"])  # again: replaced
    text = (tmp_path / logger.client.download_artifacts(logger.run_id, "metrics/per_class_ap.csv", str(tmp_path))).read_text()
    assert text == "label,ema_ap,ap\ncat,50.0000,1.0000\ndog,,\nsky,20.1250,2.0000\n"


def test_runs_carry_the_commit_the_dataset_and_the_experiment_kind(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.tracking import PROJECT_ROOT, git_tags, log_dataset, start_run
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    data = tmp_path / "mosaic"
    convert_mosaic(data, MosaicConfig(train=16, test=8, canvas=64), progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "records", run_name="r", params={})
    log_dataset(uri, run_id, str(data))
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert client.get_experiment_by_name("records").tags["mlflow.experimentKind"] == "custom_model_development"
    if (PROJECT_ROOT / ".git").exists():
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40 and run.data.tags["salgl.git_dirty"] in ("true", "false")
    assert git_tags(tmp_path) == {}  # outside a checkout: no tags, no error
    (entry,) = run.inputs.dataset_inputs
    assert entry.dataset.name == "mosaic" and str(data) in entry.dataset.source
    assert json.loads(entry.dataset.profile)["splits"] == {"train": 16, "test": 8}
    assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "training"}
