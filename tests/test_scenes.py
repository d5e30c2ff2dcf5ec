"""Scene targets from the labels (salgl/scenes.py), scene metrics (the stability probes: test_scene_stability.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from jobs.scene_metrics import scene_metrics
from salgl.config import LossConfig
from salgl.losses import salgl_loss, scene_target_loss
from salgl.scenes import LabelMixture, fit_label_mixture


def _planted(num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels from a known 3-scene Bernoulli mixture over 8 labels: (labels, scenes, theta)."""
    rng = np.random.default_rng(seed)
    theta = np.full((3, 8), 0.05)
    theta[0, :3], theta[1, 3:6], theta[2, [0, 5, 6, 7]] = 0.8, 0.7, 0.75  # overlapping label sets
    scenes = rng.choice(3, size=num_images, p=[0.5, 0.3, 0.2])  # unbalanced on purpose
    return rng.random((num_images, 8)) < theta[scenes], scenes, theta


def test_mixture_fit_recovers_planted_unbalanced_scenes() -> None:
    labels, scenes, theta = _planted(3000)
    fit = fit_label_mixture(labels, 3, seed=0)
    mixture = LabelMixture(3, 8)
    mixture.load_fit(fit.prior, fit.theta)
    found = mixture(torch.from_numpy(labels).float()).argmax(-1).numpy()
    assert normalized_mutual_info_score(scenes, found) > 0.6
    assert sorted(np.round(fit.prior, 1).tolist()) == [0.2, 0.3, 0.5]  # the prior is learned, not forced equal
    # Each fitted component matches one planted one.
    distance = np.abs(fit.theta[:, None, :] - theta[None]).mean(-1)  # (K, K)
    assert sorted(distance.argmin(1).tolist()) == [0, 1, 2] and distance.min(1).max() < 0.05


def test_mixture_fit_is_seeded_and_rejects_empty_input() -> None:
    labels, _, _ = _planted(500)
    a, b = fit_label_mixture(labels, 3, seed=4), fit_label_mixture(labels, 3, seed=4)
    np.testing.assert_array_equal(a.theta, b.theta)
    with pytest.raises(ValueError, match="non-empty"):
        fit_label_mixture(np.zeros((0, 8), bool), 3)


def test_posterior_is_bayes_rule_and_honours_the_ignore_mask() -> None:
    prior, theta = np.array([0.6, 0.4]), np.array([[0.9, 0.2, 0.5], [0.1, 0.7, 0.5]])
    mixture = LabelMixture(2, 3)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(mixture(y), torch.full((2, 2), 0.5))  # uniform until fitted
    mixture.load_fit(prior, theta)
    likelihood = np.prod(np.where(y.numpy()[:, None] > 0, theta, 1 - theta), axis=-1) * prior  # (B, K)
    expected = likelihood / likelihood.sum(1, keepdims=True)
    np.testing.assert_allclose(mixture(y).numpy(), expected, rtol=1e-6)
    ignore = torch.tensor([[True, False, False], [False, False, False]])
    masked = mixture(y, ignore)
    np.testing.assert_allclose(masked[0].numpy(), _without_first(prior, theta), rtol=1e-6)
    np.testing.assert_allclose(masked[1].numpy(), expected[1], rtol=1e-6)
    with pytest.raises(ValueError, match="expects"):
        mixture.load_fit(prior, theta[:, :2])


def _without_first(prior: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """q(k | y) of the first test row, [?, 0, 1], with label 0 left out."""
    likelihood = (1 - theta[:, 1]) * theta[:, 2] * prior
    return likelihood / likelihood.sum()


def test_scene_target_loss_and_lambda_zero() -> None:
    pi = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = -(np.log(0.7) + 0.5 * np.log(0.2) + 0.5 * np.log(0.8)) / 2
    assert scene_target_loss(pi, q).item() == pytest.approx(expected, rel=1e-5)
    logits, y = torch.randn(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    terms = salgl_loss(logits, pi, y, LossConfig(entropy_weight=0.0), scene_targets=q)
    assert terms.total.item() == pytest.approx(terms.classification.item())  # lambda weighs every scene term
    with_q = salgl_loss(logits, pi, y, LossConfig(scene_target_weight=2.0, reduction="mean"), scene_targets=q)
    without = salgl_loss(logits, pi, y, LossConfig(reduction="mean"))
    assert (with_q.total - without.total).item() == pytest.approx(2.0 * with_q.scene_target.item(), rel=1e-5)
    assert without.scene_target.item() == 0.0


def test_scene_metrics_are_invariant_to_scene_names() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    renamed = np.array([2, 2, 0, 0, 1, 1])
    metrics = scene_metrics(renamed, 3, truth=truth, probe=(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])))
    assert metrics["scene_nmi"] == pytest.approx(1.0) and metrics["scene_ari"] == pytest.approx(1.0)
    assert metrics["scene_agreement"] == 0.75
    assert metrics["scene_entropy"] == pytest.approx(np.log(3))
    plain = scene_metrics(renamed, 3)
    assert "scene_nmi" not in plain and "scene_agreement" not in plain


def test_auto_batchnorm_freezes_pretrained_backbones_only() -> None:
    from salgl.config import BackboneConfig

    assert BackboneConfig(weights="timm").frozen_batchnorm  # the paper preset's default
    assert BackboneConfig(weights="efficientnet_lite0_offline", name="tf_efficientnet_lite0").frozen_batchnorm
    assert not BackboneConfig(weights="none").frozen_batchnorm  # from scratch: no statistics worth keeping
    assert BackboneConfig(weights="none", batchnorm="frozen").frozen_batchnorm
    assert not BackboneConfig(weights="timm", batchnorm="train").frozen_batchnorm
