"""The label mixture as a run uses it: the ignore mask, images without labels, restarts, the
K-too-large warning, one fit per run kept through --resume, and what reaches MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.storage import Folder
from jobs.training import scene_mixture as run_scene_mixture
from jobs.training.scene_mixture import MIXTURE_FILE, fit_run_mixture, run_mixture, too_many_scenes
from salgl.config import preset
from salgl.losses import scene_target_loss
from salgl.scenes import LabelMixture, _e_step, fit_label_mixture


def _planted(num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels of 2 planted scenes over 6 labels: (labels, scenes)."""
    rng = np.random.default_rng(seed)
    theta = np.full((2, 6), 0.05)
    theta[0, :3], theta[1, 3:] = 0.8, 0.8
    scenes = rng.choice(2, size=num_images)
    return rng.random((num_images, 6)) < theta[scenes], scenes


def test_ignored_entries_take_no_part_in_the_fit_and_the_fit_agrees_with_the_target() -> None:
    labels, _ = _planted(600)
    rng = np.random.default_rng(1)
    ignore = rng.random(labels.shape) < 0.2
    flipped = np.where(ignore, ~labels, labels)  # what an ignored entry says must not matter
    a = fit_label_mixture(labels, 2, ignore=ignore, seed=0)
    b = fit_label_mixture(flipped, 2, ignore=ignore, seed=0)
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-9)
    assert a.log_likelihood == pytest.approx(b.log_likelihood)
    # Treating the ignored entries as negatives (as before) fits another mixture.
    assert np.abs(fit_label_mixture(labels & ~ignore, 2, seed=0).theta - a.theta).max() > 0.01

    # The fit's own responsibilities are the posterior the scene classifier is trained towards.
    mixture = LabelMixture(2, 6)
    mixture.load_fit(a.prior, a.theta)
    resp, _ = _e_step(labels.astype(float), 1.0 - ignore, a.prior, a.theta)
    target = mixture(torch.from_numpy(labels).float(), torch.from_numpy(ignore))
    labelled = (labels & ~ignore).any(1)
    np.testing.assert_allclose(target.double().numpy()[labelled], resp[labelled], rtol=1e-5, atol=1e-6)


def test_images_without_labels_are_not_fitted_and_get_no_target() -> None:
    labels, _ = _planted(400)
    with_empty = np.concatenate([labels, np.zeros((300, 6), bool)])
    fit, fit_with_empty = fit_label_mixture(labels, 2, seed=0), fit_label_mixture(with_empty, 2, seed=0)
    np.testing.assert_allclose(fit.theta, fit_with_empty.theta)
    assert fit_with_empty.images == labels.any(1).sum()
    with pytest.raises(ValueError, match="no image has a label"):
        fit_label_mixture(np.zeros((5, 6), bool), 2)

    mixture = LabelMixture(2, 6)
    mixture.load_fit(fit.prior, fit.theta)
    y = torch.tensor([[1.0, 1, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0]])
    target = mixture(y)
    assert target[1].sum() == 0 and target[0].sum() == pytest.approx(1.0)
    assert mixture.posterior(y)[1].sum() == pytest.approx(1.0)  # the posterior itself stays defined
    # The empty image's row takes no part in L_q: the loss equals the labelled image's alone.
    pi = torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    assert scene_target_loss(pi, target) == pytest.approx(scene_target_loss(pi[:1], target[:1]).item())


def test_restarts_are_a_config_key_and_each_restart_is_recorded() -> None:
    labels, _ = _planted(300)
    fit = fit_label_mixture(labels, 3, seed=0, restarts=5)
    assert len(fit.restart_log_likelihoods) == 5
    assert fit.log_likelihood == max(fit.restart_log_likelihoods) == fit.restart_log_likelihoods[fit.chosen_restart]
    assert preset("salgl", {"model.head.mixture_restarts": 3}).model.head.mixture_restarts == 3


def _mosaic_like(tmp_path, labels: np.ndarray, ignore: np.ndarray | None = None) -> str:
    """A dataset folder whose train split holds ``labels`` (images are not read by the fit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [np.flatnonzero(r).tolist() for r in labels]
    skip = [np.flatnonzero(r).tolist() for r in (ignore if ignore is not None else np.zeros_like(labels))]
    root = tmp_path / "data"
    root.mkdir()
    pq.write_table(pa.table({"labels": pa.array(rows, pa.list_(pa.int32())), "ignore": pa.array(skip, pa.list_(pa.int32()))}),
                   root / "train.parquet")
    manifest = {"schema_version": _dataset_schema(), "vocabulary": [f"l{i}" for i in range(labels.shape[1])],
                "splits": {"train": {"rows": len(labels), "shards": [{"file": "train.parquet", "rows": len(labels)}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def _dataset_schema() -> int:
    from pipeline.shards import SCHEMA_VERSION

    return SCHEMA_VERSION


def test_k_larger_than_the_labels_support_warns_and_says_what_it_does(tmp_path) -> None:
    labels, _ = _planted(800)
    data = _mosaic_like(tmp_path, labels)
    mixture = fit_run_mixture(data, preset("tiny", {"K": 6}))
    assert mixture["supported_scenes"] == 2 and sorted(mixture["bic"], key=int) == [str(k) for k in range(1, 7)]
    warning = too_many_scenes(mixture, 6)
    assert warning is not None and "support about 2 scenes" in warning and "consider K = 2" in warning
    assert too_many_scenes(fit_run_mixture(data, preset("tiny", {"K": 2})), 2) is None


class _Recorder:
    def __init__(self) -> None:
        self.params: dict = {}
        self.metrics: list[tuple[dict, int]] = []

    def log_params(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.append((dict(metrics), step))


def test_one_fit_per_run_kept_through_resume(tmp_path, monkeypatch) -> None:
    labels, _ = _planted(300)
    data, run_dir = _mosaic_like(tmp_path, labels), Folder(str(tmp_path / "run"))
    cfg = preset("tiny", {"K": 2, "model.head.mixture_restarts": 3})
    logger = _Recorder()
    first = run_mixture(run_dir, data, cfg, logger)
    assert run_dir.is_file(MIXTURE_FILE)
    assert logger.params["scene_mixture.chosen_restart"] == first["chosen_restart"]
    restarts = [m["scene_mixture.restart_log_likelihood"] for m, _ in logger.metrics if "scene_mixture.restart_log_likelihood" in m]
    assert restarts == first["restart_log_likelihoods"] and len(restarts) == 3
    assert any("scene_mixture.effective_scenes" in m for m, _ in logger.metrics)

    def refit(*args, **kwargs):
        raise AssertionError("a resumed run fitted its mixture again")

    monkeypatch.setattr(run_scene_mixture, "fit_run_mixture", refit)
    again = run_mixture(run_dir, data, cfg, _Recorder())
    assert again["theta"] == first["theta"]
    assert run_mixture(Folder(str(tmp_path / "other")), data, preset("tiny", {"K": 1}), _Recorder()) is None


def test_the_fit_reads_the_datasets_ignore_column(tmp_path) -> None:
    labels, _ = _planted(400)
    ignore = np.random.default_rng(3).random(labels.shape) < 0.2
    data = _mosaic_like(tmp_path, np.where(ignore, True, labels), ignore)  # ignored entries all say "present"
    expected = fit_label_mixture(labels, 2, ignore=ignore, seed=0)
    got = fit_run_mixture(data, preset("tiny", {"K": 2}))
    np.testing.assert_allclose(np.array(got["theta"]), expected.theta, rtol=1e-9)
