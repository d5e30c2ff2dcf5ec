"""Runs written by older salgl versions load, predict, evaluate and resume as those versions ran.

The fixtures (tests/data/legacy_v1, legacy_v2; tests/data/README.md says how each was made) are
real run folders, stopped after epoch 1 of 2, written by the code before the scene change (config
schema 1, ad013f7^) and by the code before schema versions were recorded (schema 2, 44c10ec).
Their configs lack the keys added since; ``salgl.config.LEGACY`` gives each the value that
reproduces the old behaviour. Unit tests need no Ray; the integration tests evaluate on a real
local Ray instance and resume each run with Ray Train and a sqlite MLflow store.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.inference.loading import load_for_inference, score_images
from jobs.training.checkpoints import (
    CONFIG_FILE, META_FILE, file_record, load_model_from_checkpoint, newest_checkpoint, read_checkpoint,
    read_checkpoint_config,
)
from jobs.training.run_folder import RUN_FILE
from salgl.config import SCHEMA_VERSION, Config, ConfigError, to_flat
from salgl.errors import CorruptFile
from tests._data_trees import noise_pngs

DATA = Path(__file__).parent / "data"
RUNS = {1: DATA / "legacy_v1" / "legacy-v1", 2: DATA / "legacy_v2" / "legacy-v2"}
EPOCHS = 2  # the fixtures' optim.epochs; they stopped after the first

# How each version trained, as this version's config must read its stored config.
OLD_BEHAVIOUR: dict[int, dict[str, Any]] = {
    1: {
        "model.head.scene_targets": "none", "model.head.isolate_scenes": False, "model.head.graph_trains_scenes": True,
        "model.backbone.batchnorm": "train", "ema.warmup": False, "loss.scene_target_weight": 1.0,
        "optim.precision": "fp32", "run.preset": "paper",
    },
    # Version 2's isolate_scenes=true detached pi in P^I too: graph_trains_scenes=false.
    2: {
        "model.head.scene_targets": "labels", "model.head.isolate_scenes": True, "model.head.graph_trains_scenes": False,
        "model.head.mixture_restarts": 8, "ema.warmup": True, "run.preset": "tiny",
    },
}
VERSIONS = sorted(RUNS)


def only(flat: dict[str, Any], version: int) -> dict[str, Any]:
    return {key: flat[key] for key in OLD_BEHAVIOUR[version]}


def checkpoint_of(run: Path) -> Path:
    (folder,) = [path for path in run.glob("checkpoint_*") if path.is_dir()]
    return folder


@pytest.fixture(scope="module")
def mosaic_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The fixtures' own dataset made again (its folder was on the machine that wrote them): the
    same mosaic settings give the same 10 labels and 32 training images, so a resumed run keeps
    its steps per epoch (its one-cycle schedule is sized from them)."""
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = tmp_path_factory.mktemp("data") / "mosaic"
    convert_mosaic(out, MosaicConfig(train=32, test=16, canvas=64), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def edit_checkpoint_config(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a checkpoint's config.json and its meta.json record, as a writer that meant it would."""
    record = json.loads((folder / CONFIG_FILE).read_text())
    change(record)
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    meta = json.loads((folder / META_FILE).read_text())
    meta["files"][CONFIG_FILE] = file_record(folder / CONFIG_FILE)
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------------
# Unit: loading, predict


@pytest.mark.parametrize("version", VERSIONS)
def test_stored_config_reads_as_its_version_ran(version: int) -> None:
    run = RUNS[version]
    model, cfg, vocabulary = load_model_from_checkpoint(checkpoint_of(run))
    assert only(to_flat(cfg), version) == OLD_BEHAVIOUR[version]
    assert len(vocabulary) == 10 and cfg.model.head.num_scenes == 3
    if version == 2:  # the label mixture fitted by that run travels in its weights
        assert model.head.label_mixture.theta.shape == (3, 10)
    # What `salgl evaluate` and `salgl predict` load from a run folder: its best checkpoint, the same config.
    loaded, loaded_cfg, loaded_vocabulary = load_for_inference(str(run))
    assert loaded_cfg == cfg and loaded_vocabulary == vocabulary
    images = torch.stack([torch.randn(3, 64, 64), torch.rand(3, 64, 64)])
    scores, scene_probs = score_images(loaded, images)
    assert scores.shape == (2, 10) and np.isfinite(scores).all() and np.isfinite(scene_probs).all()
    np.testing.assert_allclose(scene_probs.sum(1), 1.0, atol=1e-5)


def test_run_record_and_checkpoint_agree() -> None:
    """The run record (read on resume) and the checkpoint config (read for inference) of one run
    give one config, in either version."""
    from salgl.config import from_stored

    for version, run in RUNS.items():
        record = json.loads((run / RUN_FILE).read_text())
        flat, _, stored = read_checkpoint_config(checkpoint_of(run))
        assert "schema_version" not in record and stored is None  # written before versions were recorded
        assert only(to_flat(from_stored(record["config"])), version) == OLD_BEHAVIOUR[version]
        assert to_flat(from_stored(record["config"])) == to_flat(from_stored(flat))


@pytest.mark.parametrize("version", VERSIONS)
def test_predict_on_a_legacy_run(version: int, tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    images = noise_pngs(tmp_path)
    assert main(["predict", str(RUNS[version]), *map(str, images), "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in records] == [p.name for p in images]
    for r in records:
        assert "error" not in r and 0 <= r["scene"] < 3
        assert all(math.isfinite(t["score"]) and 0 <= t["score"] <= 1 for t in r["top_k"])


def test_version_2_model_files_read_as_version_2() -> None:
    """An MLflow model's salgl_model.json as version 2 wrote it (config and vocabulary, no version)."""
    import tempfile

    from safetensors.torch import save_file

    from jobs.inference.model_files import CONFIG_FILE as MODEL_CONFIG, WEIGHTS_FILE, read_model_files

    checkpoint = checkpoint_of(RUNS[2])
    flat, vocabulary, _ = read_checkpoint_config(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, _, _ = load_model_from_checkpoint(checkpoint)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
        (folder / MODEL_CONFIG).write_text(json.dumps({"config": flat, "vocabulary": vocabulary}))
        _, cfg, _ = read_model_files(folder / WEIGHTS_FILE, folder / MODEL_CONFIG)
    assert only(to_flat(cfg), 2) == OLD_BEHAVIOUR[2]


@pytest.mark.parametrize("version", VERSIONS)
def test_mlflow_params_of_a_legacy_run_read_as_its_version(version: int, tracking_store: str) -> None:
    """A pickled MLflow model's config comes from its run's params: strings, and no schema_version
    before version 3."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from jobs.inference.loading import _mlflow_config

    client = MlflowClient(tracking_store)
    run_id = client.create_run(client.create_experiment(f"legacy-v{version}")).info.run_id
    record = json.loads((RUNS[version] / RUN_FILE).read_text())
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in record["config"].items()])
    model, _, _ = load_model_from_checkpoint(checkpoint_of(RUNS[version]))
    # _mlflow_config reads the tracking URI its caller set (load_pickled_mlflow_model does); an
    # earlier test may have left another in mlflow's global, so set it here and put it back after.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_store)
    try:
        assert only(to_flat(_mlflow_config(run_id, model)), version) == OLD_BEHAVIOUR[version]
    finally:
        mlflow.set_tracking_uri(previous)


# ---------------------------------------------------------------------------------------------
# Unit: what still fails, and says why


def test_a_config_from_a_future_version_is_refused_naming_the_versions(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(checkpoint_of(RUNS[2]), tmp_path / "checkpoint"))
    edit_checkpoint_config(folder, lambda record: record.update(schema_version=99))
    with pytest.raises(ConfigError, match=f"config schema 99; this version reads up to {SCHEMA_VERSION}"):
        load_model_from_checkpoint(folder)
    err = tmp_path / "err"
    assert main(["predict", str(folder), *map(str, noise_pngs(tmp_path)), "--out", str(err), "--no-progress"]) == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_tensors_that_do_not_fit_their_config_fail_naming_the_version(version: int, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(checkpoint_of(RUNS[version]), tmp_path / "checkpoint"))
    edit_checkpoint_config(folder, lambda record: record["config"].update({"model.head.num_scenes": 4}))
    with pytest.raises(CorruptFile, match="does not fit the model its config.json describes") as failure:
        load_model_from_checkpoint(folder)
    message = str(failure.value)
    assert f"(config schema {version}, read by salgl's schema {SCHEMA_VERSION})" in message
    assert "head." in message  # the tensors that do not fit
    # Written by this version, the message names no version.
    edit_checkpoint_config(folder, lambda record: record.update(config=to_flat(Config()) | {
        k: v for k, v in record["config"].items() if k in to_flat(Config())}, schema_version=SCHEMA_VERSION))
    with pytest.raises(CorruptFile) as failure:
        load_model_from_checkpoint(folder)
    assert "config schema" not in str(failure.value)


# ---------------------------------------------------------------------------------------------
# Integration: evaluate on Ray Data, resume on Ray Train


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("version", VERSIONS)
def test_evaluate_a_legacy_run(version: int, ray_local, mosaic_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    args = ["evaluate", str(RUNS[version]), "--data", mosaic_dir, "--out", str(out), "--batch-size", "8", "--workers", "1"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 16 and len(result["per_class_ap"]) == 10
    assert all(math.isfinite(result["metrics"][k]) for k in ("mAP", "CF1", "OF1", "scene_entropy"))


def continue_here(fixture: Path, storage: Path, data_dir: str, tracking_uri: str) -> Path:
    """A copy of a fixture run whose record points at this test's dataset and MLflow store.

    The record names the data folder, the tracking store and the MLflow run of the machine that
    wrote the fixture (under /tmp there, gone here), so the copy gets the dataset made again and a
    fresh sqlite store with a run to continue, created as ``salgl train`` would have.
    """
    from mlflow.tracking import MlflowClient

    run_dir = Path(shutil.copytree(fixture, storage / fixture.name))
    record = json.loads((run_dir / RUN_FILE).read_text())
    client = MlflowClient(tracking_uri)
    name = record["config"]["run.experiment"]
    found = client.get_experiment_by_name(name)
    experiment = found.experiment_id if found else client.create_experiment(name)
    run_id = client.create_run(experiment, run_name=record["run_name"]).info.run_id
    record.update(data_dir=data_dir, tracking_uri=tracking_uri, mlflow_run_id=run_id)
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=1))
    return run_dir


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("version", VERSIONS)
def test_a_legacy_run_resumes_to_its_last_epoch_as_its_version_ran(
    version: int, ray_local, mosaic_dir: str, tracking_store: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.training.driver import train
    from pipeline.ray_compat import RAY_SNAPSHOT_FILE

    run_dir = continue_here(RUNS[version], tmp_path / "runs", mosaic_dir, tracking_store)
    out = train(Config(), resume=str(run_dir), log_model=False, quiet=True)
    assert out.metrics["epoch"] == EPOCHS
    last = Path(newest_checkpoint(str(run_dir))[0])
    assert read_checkpoint(last)["epoch"] == EPOCHS and read_checkpoint(last)["step"] == 2 * EPOCHS
    # It continued from the fixture's checkpoint: epoch 2 alone was trained and logged, and Ray
    # Train took over the fixture's record of its checkpoints.
    history = MlflowClient(tracking_store).get_metric_history(out.mlflow_run_id, "ema_mAP")
    assert [m.step for m in history] == [EPOCHS]
    snapshot = json.loads((run_dir / RAY_SNAPSHOT_FILE).read_text())
    kept = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}  # in Ray's order: by score
    assert kept == {checkpoint_of(RUNS[version]).name, last.name}
    # The worker trained with the old behaviour: the config it wrote into its checkpoint.
    flat, _, stored = read_checkpoint_config(last)
    assert stored == SCHEMA_VERSION and only(flat, version) == OLD_BEHAVIOUR[version]
