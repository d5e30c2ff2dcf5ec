"""``salgl evaluate`` and ``salgl predict``, and loading every checkpoint kind for inference.

Unit tests (seconds, no Ray): our checkpoint folders (EMA and live), run folders, released-layout
``.pth`` files, MLflow model URIs, predict with broken files among good ones. Integration tests
(real Ray Data on a local 2-CPU instance, real parquet, sqlite MLflow): evaluate against a
single-process computation of the same metrics, and a released checkpoint end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from jobs.cli import main
from jobs.inference.loading import checkpoint_kind, guess_released_backbone, load_for_inference, resolve_checkpoint_folder, score_images
from pipeline.shards import read_manifest, shard_paths
from pipeline.transforms import transform_batch
from salgl.config import Config
from salgl.metrics import multilabel_metrics, scene_entropy, scene_occupancy
from salgl.official import ReleasedFlags
from tests._tiny_checkpoint import IMG_SIZE, make_mosaic, write_tiny_checkpoint
from tests.reference.released_reference import ReleasedHead

RELEASED_DIMS = {"dim": 512, "label_dim": 24, "num_scenes": 4, "ffn": 64, "att_dim": 32}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_mosaic(tmp_path_factory.mktemp("data") / "mosaic")


@pytest.fixture(scope="module")
def vocabulary(data_dir: str) -> list[str]:
    return list(read_manifest(data_dir)["vocabulary"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: str, vocabulary: list[str]) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", vocabulary, data_dir))


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, vocabulary: list[str]) -> tuple[str, ReleasedHead, torch.nn.Module]:
    """A released-layout EMA checkpoint (``module.`` keys under ``state_dict``): a timm ResNet-18
    as the backbone, the reference head with 2 steps and no ``--outmess``, non-zero counts."""
    import timm

    torch.manual_seed(1)
    cnn = timm.create_model("resnet18", num_classes=0, global_pool="").eval()
    head = ReleasedHead(num_labels=len(vocabulary), steps=2, outmess=False, **RELEASED_DIMS).eval()
    head.comatrix.copy_(torch.randint(0, 5, head.comatrix.shape).float())
    state = {f"backbone.{k}": v for k, v in cnn.state_dict().items()}
    state.update(head.state_dict())
    path = tmp_path_factory.mktemp("released") / "salgl_coco.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 40}, path)
    return str(path), head, cnn


def _object_column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [np.asarray(v, dtype=np.int32) if isinstance(v, list) else v for v in values]
    return out


def direct_scores(model: torch.nn.Module, cfg: Config, data_dir: str, split: str = "test") -> tuple[np.ndarray, ...]:
    """The split scored in this process: pyarrow rows -> the test transform -> the model."""
    table = pq.ParquetDataset(shard_paths(data_dir, split)).read()
    batch = {name: _object_column(table.column(name).to_pylist()) for name in ("image", "labels", "ignore", "id")}
    out = transform_batch(batch, cfg=cfg.data, num_labels=len(read_manifest(data_dir)["vocabulary"]), train=False, seed=None)
    scores, scene_probs = score_images(model, torch.from_numpy(out["image"]))
    return scores, scene_probs, out["target"], out["ignore"]


# ---------------------------------------------------------------------------------------------
# Loading (no Ray)


def test_checkpoint_kinds(checkpoint: str, released, tmp_path: Path) -> None:
    assert checkpoint_kind(checkpoint) == "folder"
    assert checkpoint_kind(str(Path(checkpoint) / "state.pt")) == "folder"
    assert checkpoint_kind(released[0]) == "released"
    assert checkpoint_kind("runs:/0123/model") == checkpoint_kind("models:/salgl/3") == "mlflow"
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    assert checkpoint_kind(str(tmp_path)) == "mlflow"
    with pytest.raises(FileNotFoundError, match="no such file"):
        checkpoint_kind(str(tmp_path / "nothing"))


def test_folder_checkpoint_gives_ema_or_live_weights(checkpoint: str, vocabulary: list[str]) -> None:
    state = torch.load(Path(checkpoint) / "state.pt", weights_only=True)
    ema, cfg, vocab = load_for_inference(checkpoint)
    live, _, _ = load_for_inference(checkpoint, which="live")
    assert vocab == vocabulary and cfg.data.img_size == IMG_SIZE and not ema.training
    torch.testing.assert_close(ema.head.counts, state["ema"]["module.head.counts"])
    torch.testing.assert_close(live.head.counts, state["model"]["head.counts"])
    assert live.head.counts.sum() > 0 and not torch.equal(ema.head.counts, live.head.counts)
    with pytest.raises(ValueError, match="other labels"):
        load_for_inference(checkpoint, vocabulary=vocabulary[::-1])


def test_run_folder_takes_its_best_checkpoint(checkpoint: str, tmp_path: Path) -> None:
    for name, score in (("checkpoint_000000", 40.0), ("checkpoint_000001", 60.0), ("checkpoint_000002", 55.0)):
        shutil.copytree(checkpoint, tmp_path / name)
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        (tmp_path / name / "meta.json").write_text(json.dumps({**meta, "metrics": {"ema_mAP": score}}))
    assert resolve_checkpoint_folder(tmp_path) == tmp_path / "checkpoint_000001"
    assert resolve_checkpoint_folder(tmp_path / "checkpoint_000002" / "state.pt") == tmp_path / "checkpoint_000002"
    model, _, _ = load_for_inference(str(tmp_path))
    assert model.head.counts.sum() > 0


def test_released_checkpoint_loads_with_its_flags(released, vocabulary: list[str]) -> None:
    path, head, cnn = released
    state = torch.load(path, weights_only=True)["state_dict"]
    assert guess_released_backbone({k[len("module."):]: v for k, v in state.items()}) == "resnet18"
    model, cfg, vocab = load_for_inference(path, vocabulary=vocabulary, flags=ReleasedFlags(num_steps=2, outmess=False))
    assert vocab == vocabulary and cfg.model.backbone.name == "resnet18"
    assert (cfg.model.head.num_scenes, cfg.model.head.steps, cfg.model.head.message) == (4, 2, "in")
    images = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        expected = head(cnn.forward_features(images).flatten(2).transpose(1, 2))  # tokens (B, m, d)
        got = model(images)
    torch.testing.assert_close(got.logits, expected["logits"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="holds no label names"):
        load_for_inference(path)
    with pytest.raises(ValueError, match="has 10 labels"):
        load_for_inference(path, vocabulary=vocabulary[:3])
    with pytest.raises(ValueError, match="--released-"):  # the default --outmess doubles the GRU input
        load_for_inference(path, vocabulary=vocabulary)


def test_released_flags_from_the_command_line() -> None:
    from jobs.cli.checkpoint_args import add_checkpoint_arguments, released_flags

    parser = argparse.ArgumentParser()
    add_checkpoint_arguments(parser)
    assert released_flags(parser.parse_args(["x.pth"])) == ReleasedFlags()
    args = parser.parse_args(["x.pth", "--released-steps", "2", "--no-released-outmess", "--released-soft"])
    assert released_flags(args) == ReleasedFlags(num_steps=2, outmess=False, soft=True)


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory, checkpoint: str) -> tuple[str, str, torch.nn.Module]:
    """A sqlite store with a training-like run (flat config as params) that logged the tiny
    checkpoint's model as training does, registered as ``salgl-tiny`` version 1: (tracking URI,
    run id, the checkpoint's model)."""
    import mlflow

    from jobs.inference.pyfunc import log_checkpoint_model
    from jobs.tracking import start_run
    from salgl.config import to_flat

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, cfg, _ = load_for_inference(checkpoint)
    run_id = start_run(uri, "salgl-test", run_name="train", params=to_flat(cfg), artifact_root=str(root / "mlruns"))
    mlflow.set_tracking_uri(uri)
    mlflow.register_model(log_checkpoint_model(checkpoint, uri, run_id), "salgl-tiny")
    return uri, run_id, model


def test_mlflow_model_uri_loads(mlflow_run, vocabulary: list[str], tmp_path: Path) -> None:
    import mlflow

    uri, run_id, model = mlflow_run
    images = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    expected = score_images(model, images)
    downloaded = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path), tracking_uri=uri)
    for source in (f"runs:/{run_id}/model", "models:/salgl-tiny/1", downloaded):
        loaded, loaded_cfg, vocab = load_for_inference(source, tracking_uri=uri)
        assert vocab == vocabulary and loaded_cfg.data.img_size == IMG_SIZE
        np.testing.assert_allclose(score_images(loaded, images)[0], expected[0], atol=1e-6)
        torch.testing.assert_close(loaded.head.counts, model.head.counts)


def test_evaluation_logs_into_an_existing_run(mlflow_run, vocabulary: list[str]) -> None:
    """``--mlflow-run-id``: metrics named by split beside the run's own, the JSON and the chart."""
    from mlflow.tracking import MlflowClient

    from jobs.inference.evaluate import Scored, log_evaluation, summarize

    uri, run_id, _ = mlflow_run
    rng = np.random.default_rng(0)
    targets = (rng.random((12, len(vocabulary))) < 0.3).astype(np.float32)
    scored = Scored([str(i) for i in range(12)], rng.random(targets.shape), rng.random((12, 3)), targets, np.zeros(targets.shape, bool))
    result = summarize(scored, vocabulary, num_scenes=3)
    client = MlflowClient(uri)
    status = client.get_run(run_id).info.status
    assert log_evaluation(result, split="val", tracking_uri=uri, run_id=run_id) == run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics["val_mAP"] == pytest.approx(result["metrics"]["mAP"]) and "val_occupancy_2" in metrics
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == {"evaluation/val_metrics.json", "evaluation/val_scene_occupancy.png"}
    assert client.get_run(run_id).info.status == status  # a run it did not start is left as it was


# ---------------------------------------------------------------------------------------------
# predict (no Ray)


def _write_test_images(data_dir: str, folder: Path, count: int) -> list[Path]:
    table = pq.ParquetDataset(shard_paths(data_dir, "test")).read().slice(0, count)
    paths = []
    for i, data in enumerate(table.column("image").to_pylist()):
        path = folder / ("nested" if i % 2 else "") / f"image_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_predict_skips_broken_images_and_predicts_the_rest(
    checkpoint: str, data_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests._data_trees import truncated_jpeg

    good = _write_test_images(data_dir, tmp_path / "images", 5)
    (tmp_path / "images" / "nested" / "corrupt.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "images" / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "images" / "notes.txt").write_text("not an image file name: not searched")
    out = tmp_path / "out" / "predictions.jsonl"
    args = ["predict", checkpoint, str(tmp_path / "images"), str(tmp_path / "missing.jpg"), "--out", str(out),
            "--top-k", "3", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {p.name for p in good} | {"corrupt.jpg", "garbage.png", "missing.jpg"}
    err = capsys.readouterr().err
    for name in ("corrupt.jpg", "garbage.png", "missing.jpg"):
        assert "error" in records[name] and name in err
    assert "truncated" in records["corrupt.jpg"]["error"]

    model, cfg, vocabulary = load_for_inference(checkpoint)
    scores, scene_probs, _, _ = direct_scores(model, cfg, data_dir)  # the dataset's own test transform
    for i, path in enumerate(good):
        r = records[path.name]
        assert [t["label"] for t in r["top_k"]] == [vocabulary[j] for j in np.argsort(-scores[i], kind="stable")[:3]]
        np.testing.assert_allclose([t["score"] for t in r["top_k"]], np.sort(scores[i])[::-1][:3], atol=1e-5)
        assert r["labels"] == [vocabulary[j] for j in np.argsort(-scores[i], kind="stable") if scores[i, j] >= 0.5]
        np.testing.assert_allclose(r["scores"], [scores[i, vocabulary.index(label)] for label in r["labels"]], atol=1e-5)
        assert r["scene"] == int(scene_probs[i].argmax())
        assert r["scene_probability"] == pytest.approx(float(scene_probs[i].max()), abs=1e-5)


def test_predict_fails_when_nothing_is_readable(checkpoint: str, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["predict", checkpoint, str(tmp_path / "bad.png"), "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 1
    assert main(["predict", str(tmp_path / "nope"), str(tmp_path / "bad.png"), "--out", str(tmp_path / "p.jsonl")]) == 2  # no such checkpoint: a usage error


# ---------------------------------------------------------------------------------------------
# evaluate (Ray Data)

SCENE_PROBES = {"scene_agreement", "scene_stability_batch", "scene_stability_augment"}
METRIC_KEYS = {"mAP", "mAP_noninterp", "classes_without_positives", "scene_entropy", "scene_nmi", "scene_ari", *SCENE_PROBES} | {
    f"{k}{s}" for k in ("CP", "CR", "CF1", "OP", "OR", "OF1") for s in ("", "_top3")
}


@pytest.mark.integration
@pytest.mark.timeout(600)  # tens of seconds alone, minutes when other jobs share the 2 cores
def test_evaluate_matches_a_single_process_computation(
    ray_local, checkpoint: str, data_dir: str, vocabulary: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "eval.json", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["evaluate", checkpoint, "--data", data_dir, "--out", str(out), "--batch-size", "8", "--workers", "2",
            "--mlflow", "--tracking-uri", uri, "--experiment", "salgl-eval-test"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "CF13" in printed and "scene entropy" in printed and "Ankle boot" in printed
    assert "NMI vs true scenes" in printed and "train/eval agreement" in printed

    result = json.loads(out.read_text())
    assert set(result["metrics"]) == METRIC_KEYS and result["images"] == 32 and list(result["per_class_ap"]) == vocabulary
    model, cfg, _ = load_for_inference(checkpoint)
    scores, scene_probs, targets, ignore = direct_scores(model, cfg, data_dir)
    expected = multilabel_metrics(scores, targets, ignore)
    for key in METRIC_KEYS - {"scene_entropy", "scene_nmi", "scene_ari", *SCENE_PROBES}:
        assert result["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert list(result["per_class_ap"].values()) == pytest.approx(expected["ap"], abs=1e-6)
    scenes = scene_probs.argmax(1)
    assert result["metrics"]["scene_entropy"] == pytest.approx(scene_entropy(scenes, 3), abs=1e-9)
    assert result["occupancy"] == pytest.approx(scene_occupancy(scenes, 3).tolist())
    assert result["max_scene_entropy"] == pytest.approx(math.log(3))
    truth = pq.read_table(shard_paths(data_dir, "test"), columns=["scene"]).column("scene").to_numpy()
    assert result["metrics"]["scene_nmi"] == pytest.approx(normalized_mutual_info_score(truth, scenes))
    assert result["metrics"]["scene_agreement"] == 1.0  # frozen BatchNorm: the modes agree
    assert result["metrics"]["scene_stability_batch"] == 1.0  # ... and no image depends on its batch
    assert result["metrics"]["scene_stability_augment"] == 1.0  # data.augment=none, no dropout: the same views

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("salgl-eval-test").experiment_id])
    assert run.data.metrics["test_mAP"] == pytest.approx(expected["mAP"]) and run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {"evaluation/test_metrics.json", "evaluation/test_scene_occupancy.png"}


@pytest.mark.integration
@pytest.mark.timeout(600)  # tens of seconds alone, minutes when other jobs share the 2 cores
def test_released_checkpoint_evaluates(ray_local, released, data_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "released.json"
    args = ["evaluate", released[0], "--data", data_dir, "--out", str(out), "--released-steps", "2", "--no-released-outmess"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 32 and 0.0 < result["metrics"]["mAP"] <= 100.0
    assert len(result["occupancy"]) == RELEASED_DIMS["num_scenes"]
