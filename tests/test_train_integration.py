"""Integration: real Ray Train on a local instance, real parquet, a real MLflow tracking server.

Tiny sizes (a timm test backbone, 256 mosaic images of 64 px, 2 workers at half a CPU each); each
fit takes tens of seconds on 2 cores. Every Ray test has a timeout: these failures hang.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from jobs.training.checkpoints import read_checkpoint
from salgl.config import preset
from tests._servers import free_port, start_server, stop_server

pytestmark = pytest.mark.integration
EPOCHS = 2


@pytest.fixture(scope="module")
def mosaic_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Twice the shared tiny mosaic (tests/conftest.py): the step counts below assume 256 images."""
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = tmp_path_factory.mktemp("data") / "mosaic"
    convert_mosaic(out, MosaicConfig(train=256, test=64, canvas=64), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` process; ready once /health answers."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]
    uri = f"http://127.0.0.1:{port}"
    proc = start_server(cmd, uri + "/health", name="mlflow server")
    yield uri
    stop_server(proc)


def _config(mosaic_dir: str, storage: Path, tracking_uri: str, **overrides):
    base = {
        "data.path": mosaic_dir, "data.img_size": 64, "optim.epochs": EPOCHS, "optim.batch_size": 16,
        "run.workers": 2, "run.storage": str(storage), "run.tracking_uri": tracking_uri,
        "run.checksum_every": 4, "run.keep_checkpoints": 1, "ema.decay": 0.9,
    }
    return preset("tiny", {**base, **overrides})


def _live_counts(checkpoint: str) -> torch.Tensor:
    return read_checkpoint(checkpoint)["model"]["head.counts"]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, mosaic_dir, mlflow_server, tmp_path_factory):
    from jobs.training.driver import train

    storage = tmp_path_factory.mktemp("runs")
    return train(_config(mosaic_dir, storage, mlflow_server, **{"run.name": "straight"}), log_model=True)


@pytest.mark.timeout(600)
def test_training_reports_metrics_and_checkpoints(uninterrupted) -> None:
    out = uninterrupted
    assert out.metrics["epoch"] == EPOCHS
    state = read_checkpoint(out.last_checkpoint)
    assert state["epoch"] == EPOCHS and state["step"] == EPOCHS * (256 // 2 // 8)
    counts = state["model"]["head.counts"]
    assert counts.dtype == torch.float64 and counts.sum() > 0
    assert torch.equal(counts, counts.round()), "counts must stay exact integers"
    for key in ("mAP", "ema_mAP", "CF1", "OF1", "ema_scene_entropy", "images_per_s", "ema_occupancy_0", "loss_scene_target"):
        assert key in out.metrics, key
    assert out.best_checkpoint is not None


@pytest.mark.timeout(600)
def test_the_run_writes_its_log_into_its_folder(uninterrupted) -> None:
    """The driver, the Train controller (epoch lines) and rank 0 (progress lines, on long epochs)
    append to ``<run folder>/salgl.log``."""
    lines = (Path(uninterrupted.run_dir) / "salgl.log").read_text().splitlines()
    assert sum("run straight: 2 workers on cpu, precision fp32; data " in line for line in lines) == 1
    assert [line.split(": ", 1)[1].split("  ")[0] for line in lines if "EMA mAP" in line] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert any(line.endswith("finished: run straight") for line in lines)
    assert sum(": scene mixture: 3 scenes fitted to 256 training label sets" in line for line in lines) == 1


@pytest.mark.timeout(600)
def test_tiny_cue_free_run_spreads_its_test_images_over_scenes(uninterrupted) -> None:
    """The mosaic shows its scenes only in which items co-occur; with lambda > 0 the test images
    still spread over the scenes in eval mode, and every scene metric is reported."""
    m = uninterrupted.metrics
    assert m["ema_scene_entropy"] > 0 and m["scene_entropy"] > 0
    assert 0 <= m["scene_agreement"] <= 1 and 0 <= m["scene_nmi"] <= 1 and "scene_ari" in m  # the mosaic has true scenes
    mixture = read_checkpoint(uninterrupted.last_checkpoint)["model"]
    assert mixture["head.label_mixture.theta"].shape == (3, 10)  # the fitted label mixture travels with the model


@pytest.mark.timeout(600)
def test_pretrained_backbone_scenes_hold_at_test_time(ray_local, mosaic_dir, tmp_path) -> None:
    """The default recipe's kind of backbone (offline ImageNet EfficientNet-Lite0, so frozen
    BatchNorm): eval mode assigns the probe images the scenes train mode does. (How the test
    images spread over the scenes needs a longer run than these 32 steps: tests/bench/scenes.py.)"""
    from jobs.training.driver import train

    overrides = {
        "model.backbone.name": "tf_efficientnet_lite0", "model.backbone.weights": "efficientnet_lite0_offline",
        "data.normalize": "half", "run.workers": 1, "K": 4, "run.name": "pretrained-scenes",
    }
    cfg = _config(mosaic_dir, tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}", **overrides)
    assert cfg.model.backbone.frozen_batchnorm
    m = train(cfg, log_model=False, quiet=True).metrics
    assert m["scene_agreement"] >= 0.9 and m["ema_scene_agreement"] >= 0.9


@pytest.mark.timeout(600)
def test_mlflow_server_holds_params_metrics_and_artifacts(uninterrupted) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uninterrupted.tracking_uri)
    run = client.get_run(uninterrupted.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.head.num_scenes"] == "3"
    assert run.data.params["run.workers"] == "2"
    # What the run asked for and what it got (no GPUs here: run.device=auto runs on CPUs).
    assert {k: run.data.params[k] for k in ("run.device", "optim.precision", "resources.device", "resources.workers",
                                            "resources.gpus_per_worker")} == {
        "run.device": "auto", "optim.precision": "fp32", "resources.device": "cpu", "resources.workers": "2",
        "resources.gpus_per_worker": "0"}
    assert run.data.params["schema_version"] == "3" and len(run.data.params["scene_mixture.prior"].split()) == 3
    # The label mixture's fit (jobs.training.scene_mixture): once, at the start, with every restart.
    assert {"scene_mixture.log_likelihood", "scene_mixture.effective_scenes", "scene_mixture.supported_scenes"} <= set(run.data.metrics)
    restarts = client.get_metric_history(run.info.run_id, "scene_mixture.restart_log_likelihood")
    assert sorted(m.step for m in restarts) == list(range(8))
    assert max(m.value for m in restarts) == run.data.metrics["scene_mixture.log_likelihood"]
    history = client.get_metric_history(run.info.run_id, "ema_mAP")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "metrics", "scenes", "best_checkpoint"} <= top
    scenes = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "scenes")}
    assert {"scene_0_cooccurrence.png", "scene_occupancy.png", "top_labels_per_scene.json"} <= scenes
    checkpoint_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert "state.pt" in checkpoint_files

    from jobs.inference.loading import load_for_inference

    model, cfg, vocabulary = load_for_inference(f"runs:/{run.info.run_id}/model", tracking_uri=uninterrupted.tracking_uri)
    assert cfg.data.img_size == 64 and len(vocabulary) == 10
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 10)


@pytest.mark.timeout(600)
def test_killed_worker_recovers_to_the_same_counts(uninterrupted, mosaic_dir, mlflow_server, tmp_path) -> None:
    from jobs.training.driver import train

    cfg = _config(mosaic_dir, tmp_path, mlflow_server, **{"run.name": "crashy", "run.inject_failure": "1:1"})
    out = train(cfg, log_model=False)
    assert (Path(out.run_dir) / ".salgl_failure_injected").exists(), "the failure was not injected"
    assert out.metrics["epoch"] == EPOCHS
    torch.testing.assert_close(_live_counts(out.last_checkpoint), _live_counts(uninterrupted.last_checkpoint), rtol=0, atol=0)


@pytest.mark.timeout(600)
def test_stopped_run_resumes_to_the_uninterrupted_state(uninterrupted, mosaic_dir, mlflow_server, tmp_path) -> None:
    from jobs.training.driver import train

    cfg = _config(mosaic_dir, tmp_path, mlflow_server, **{"run.name": "pausing", "run.stop_after_epoch": 1})
    first = train(cfg, log_model=False)
    assert first.metrics["epoch"] == 1
    resumed = train(cfg, resume="pausing", log_model=False)
    assert resumed.metrics["epoch"] == EPOCHS and resumed.mlflow_run_id == first.mlflow_run_id
    log_lines = (Path(resumed.run_dir) / "salgl.log").read_text().splitlines()
    assert sum("scene mixture: kept from the run folder" in line for line in log_lines) == 1  # not fitted again
    a, b = read_checkpoint(resumed.last_checkpoint), read_checkpoint(uninterrupted.last_checkpoint)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    torch.testing.assert_close(a["model"]["head.counts"], b["model"]["head.counts"], rtol=0, atol=0)
    torch.testing.assert_close(a["ema"]["module.head.counts"], b["ema"]["module.head.counts"], rtol=0, atol=0)


@pytest.mark.timeout(600)
def test_a_resume_sets_a_damaged_checkpoint_aside_and_redoes_its_epoch(uninterrupted, mosaic_dir, mlflow_server, tmp_path) -> None:
    """The newest checkpoint altered on disk: the resume continues from the one before, ends in the
    uninterrupted state, and the damaged one no longer holds one of the two places Ray keeps."""
    from jobs.training.checkpoints import DAMAGED_DIR, STATE_FILE, newest_checkpoint
    from jobs.training.driver import train

    cfg = _config(mosaic_dir, tmp_path, mlflow_server, **{"run.name": "damaged", "run.keep_checkpoints": 2})
    first = train(cfg, log_model=False)
    last = Path(first.last_checkpoint)
    data = bytearray((last / STATE_FILE).read_bytes())
    data[1000:1004] = b"\xff\xff\xff\xff"
    (last / STATE_FILE).write_bytes(bytes(data))

    resumed = train(cfg, resume="damaged", log_model=False)
    assert resumed.metrics["epoch"] == EPOCHS
    assert (Path(first.run_dir) / DAMAGED_DIR / last.name / STATE_FILE).is_file()
    assert "set aside" in (Path(first.run_dir) / "salgl.log").read_text()
    torch.testing.assert_close(_live_counts(resumed.last_checkpoint), _live_counts(uninterrupted.last_checkpoint), rtol=0, atol=0)
    kept = sorted(p.parent.name for p in Path(first.run_dir).glob("checkpoint_*/" + STATE_FILE))
    assert len(kept) == 2 and newest_checkpoint(first.run_dir)[1] == EPOCHS  # epoch 1 and the redone epoch 2


@pytest.mark.timeout(600)
def test_a_run_copied_elsewhere_resumes_on_its_moved_data_under_a_new_mlflow_run(ray_local, mosaic_dir, mlflow_server, tmp_path) -> None:
    """As a user resumes on another machine: the run folder copied, its dataset at another path (the
    old one gone), a tracking store that never held its MLflow run."""
    import shutil

    from mlflow.tracking import MlflowClient

    from jobs.training.driver import train
    from jobs.training.run_folder import RUN_FILE
    from jobs.training.resume import RESUMED_FROM_TAG

    data = Path(shutil.copytree(mosaic_dir, tmp_path / "data"))
    first = train(_config(str(data), tmp_path / "runs", mlflow_server, **{"run.name": "travels", "run.stop_after_epoch": 1}),
                  log_model=False, quiet=True)
    run_dir = Path(shutil.copytree(first.run_dir, tmp_path / "elsewhere" / "travels"))
    moved = data.rename(tmp_path / "moved")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resumed = train(preset("tiny"), resume=str(run_dir), overrides={"data.path": str(moved), "run.tracking_uri": tracking},
                    log_model=False, quiet=True)
    assert resumed.metrics["epoch"] == EPOCHS and resumed.mlflow_run_id != first.mlflow_run_id
    run = MlflowClient(tracking).get_run(resumed.mlflow_run_id)
    assert run.data.tags[RESUMED_FROM_TAG] == first.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params["data.path"] == str(moved) and run.data.metrics["epoch"] == EPOCHS
    log_text = (run_dir / "salgl.log").read_text()
    assert f"MLflow run {first.mlflow_run_id} is not in {tracking}: continuing under a new MLflow run {run.info.run_id}" in log_text
    record = json.loads((run_dir / RUN_FILE).read_text())  # the next resume needs neither override
    assert (record["data_dir"], record["tracking_uri"], record["mlflow_run_id"]) == (str(moved), tracking, run.info.run_id)


@pytest.mark.timeout(600)
def test_reusing_a_run_name_is_refused(uninterrupted) -> None:
    from jobs.training.driver import train

    cfg = preset("tiny", {"run.storage": str(Path(uninterrupted.run_dir).parent), "run.name": "straight"})
    with pytest.raises(FileExistsError, match="--resume straight"):
        train(cfg)


def _count_probe_loop(config: dict) -> None:
    """A Ray Train worker loop built from the project's pieces that records every step's payload."""
    import ray.train
    import ray.train.torch

    from jobs.training.distributed import make_count_sync
    from pipeline.ingest import iter_train_batches
    from salgl.losses import salgl_loss
    from salgl.model import build_model

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = ray.train.torch.prepare_model(
        build_model(cfg.model, num_labels=10, label_dim=16), parallel_strategy_kwargs={"broadcast_buffers": False}
    )
    head = getattr(model, "module", model).head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sync = make_count_sync(8)
    scenes, targets = [], []
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), batch_size=8, epoch=0, normalize=cfg.data.normalize):
        out = model(batch["image"], batch["target"], sync=sync)
        salgl_loss(out.logits, out.scene_probs, batch["target"], cfg.loss).total.backward()
        optimizer.step()
        optimizer.zero_grad()
        scenes.append(out.scene_probs.argmax(-1).tolist())
        targets.append(batch["target"].tolist())
    ray.train.report({"counts": head.counts.tolist(), "scenes": scenes, "targets": targets})


@pytest.mark.timeout(600)
def test_two_workers_hold_identical_counts_equal_to_one_process_over_their_batches(ray_local, mosaic_dir, tmp_path) -> None:
    import ray.train
    from ray.train import UserCallback
    from ray.train.torch import TorchTrainer

    from pipeline.ingest import build_datasets, data_config
    from salgl.graph import count_delta

    record = tmp_path / "reports.json"

    class Capture(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            record.write_text(json.dumps(metrics))

    cfg = preset("tiny", {"data.img_size": 64})
    trainer = TorchTrainer(
        _count_probe_loop,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.49}),
        run_config=ray.train.RunConfig(name="probe", storage_path=str(tmp_path), callbacks=[Capture()]),
        datasets=build_datasets(mosaic_dir, cfg.data, seed=0, num_workers=2, eval_split=None),
        dataset_config=data_config(["train"]),
    )
    trainer.fit()
    reports = json.loads(record.read_text())
    assert len(reports) == 2
    counts = [torch.tensor(r["counts"], dtype=torch.float64) for r in reports]
    assert torch.equal(counts[0], counts[1])
    steps = {len(r["scenes"]) for r in reports}
    assert steps == {256 // 2 // 8}, "every worker must run the same number of steps"
    expected = torch.zeros_like(counts[0])
    for r in reports:
        for scene_ids, y in zip(r["scenes"], r["targets"]):
            weights = torch.nn.functional.one_hot(torch.tensor(scene_ids), 3).double()
            expected += count_delta(weights, torch.tensor(y, dtype=torch.float64))
    assert torch.equal(counts[0], expected)
