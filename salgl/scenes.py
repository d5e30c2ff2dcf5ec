"""Scene targets from the labels: what lets the scene classifier find scenes that drive co-occurrence.

Notation: N training images, B batch, n labels, K scenes.

The paper trains the scene classifier pi = softmax(W vbar) (eq. 4-6) with the entropy loss alone
(eq. 9-11). That asks for sharp, balanced assignments but says nothing about *which* images share
a scene, so on data whose scenes are latent the partition it finds is balanced yet unrelated to
what makes labels co-occur (and, riding on BatchNorm's batch statistics, may not survive eval mode).

Here a scene is what the co-occurrence structure says it is: the latent class of a mixture of
independent Bernoullis over the label sets,

    p(y) = sum_k rho_k prod_i theta_ki^y_i (1 - theta_ki)^(1 - y_i),

fitted once per run to the training labels by EM (the best of a few seeded restarts). Entries
an image marks ignored (VOC "difficult") are left out of the fit exactly as the posterior leaves
them out, and images with no label carry no co-occurrence: they are not fitted and get no target. Within a scene the
labels are independent, so every co-occurrence the data holds is explained by the scene mixture:
the same structure SALGL's per-scene count matrices model. During training, each image's
posterior q(k | y) is the target of a cross-entropy on pi (``salgl.losses.scene_target_loss``),
so the image-only classifier learns to predict the scene its labels imply; at test time pi needs
no labels. The posterior is log-linear in y, so a linear classifier on pooled features can
represent it. This is a departure from the paper, documented in docs/scenes.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

THETA_FLOOR = 1e-4  # keeps log theta and log(1 - theta) finite for labels never (or always) seen


class MixtureFit(NamedTuple):
    prior: np.ndarray  # (K,) rho
    theta: np.ndarray  # (K, n) P(label i | scene k)
    log_likelihood: float  # of the fitted training labels, per image
    restart_log_likelihoods: tuple[float, ...]  # each restart's, in order
    chosen_restart: int  # the best one's index
    images: int  # rows fitted: those with at least one label

    @property
    def effective_scenes(self) -> float:
        """exp(H(rho)): K for equal scenes, less where the labels fill fewer or unequal ones."""
        rho = self.prior[self.prior > 0]
        return float(np.exp(-(rho * np.log(rho)).sum()))

    @property
    def bic(self) -> float:
        """Bayesian information criterion of the fit: -2 log L + (K n + K - 1) log N (lower is better)."""
        num_scenes, num_labels = self.theta.shape
        free = num_scenes * num_labels + num_scenes - 1
        return float(-2.0 * self.log_likelihood * self.images + free * np.log(self.images))


# Kass and Raftery's "very strong" evidence: a BIC this much lower is what a larger K must earn.
BIC_MARGIN = 10.0


def supported_scenes(bics: dict[int, float]) -> int:
    """The number of scenes the labels support: the smallest K whose BIC is within ``BIC_MARGIN``
    of the best (extra components of a larger K split scenes to fit noise rather than empty out)."""
    best = min(bics.values())
    return min(k for k, value in bics.items() if value <= best + BIC_MARGIN)


def _posterior_logits(y: np.ndarray, observed: np.ndarray, prior: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """log rho_k + sum over observed labels of log p(y_i | k), (N, K); y, observed (N, n) float."""
    log_on, log_off = np.log(theta), np.log1p(-theta)  # (K, n)
    return (y * observed) @ log_on.T + ((1.0 - y) * observed) @ log_off.T + np.log(prior)


def _e_step(y: np.ndarray, observed: np.ndarray, prior: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, float]:
    logits = _posterior_logits(y, observed, prior, theta)  # (N, K)
    top = logits.max(1, keepdims=True)
    weights = np.exp(logits - top)
    total = weights.sum(1, keepdims=True)
    return weights / total, float((np.log(total) + top).mean())


def _m_step(y: np.ndarray, observed: np.ndarray, resp: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    mass = resp.sum(0)  # (K,)
    seen = resp.T @ observed  # (K, n): each scene's weight of images where label i is observed
    theta = (resp.T @ (y * observed) + smoothing) / (seen + 2 * smoothing)  # (K, n), a Beta prior
    prior = (mass + smoothing) / (len(y) + smoothing * len(mass))
    return prior, np.clip(theta, THETA_FLOOR, 1 - THETA_FLOOR)


def fit_label_mixture(
    labels: np.ndarray,
    num_scenes: int,
    *,
    ignore: np.ndarray | None = None,
    seed: int = 0,
    restarts: int = 8,
    max_iters: int = 200,
    tol: float = 1e-6,
    smoothing: float = 1.0,
) -> MixtureFit:
    """EM for a K-component Bernoulli mixture over multi-hot label rows (N, n).

    ``ignore`` (N, n) True leaves an entry out of the likelihood, as ``LabelMixture`` leaves it out
    of the posterior. Rows without a (kept) label are not fitted. Each restart begins from seeded
    Dirichlet responsibilities and runs until the per-image log-likelihood gains less than ``tol``;
    the best restart wins. ``smoothing`` is an add-one (Beta(1, 1)) prior on theta and rho, so a
    component that empties out keeps finite parameters (and a prior of about 1 / N).
    """
    y = np.asarray(labels, dtype=np.float64)  # (N, n)
    if y.ndim != 2 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty (N, n) array, got shape {y.shape}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    observed = np.ones_like(y) if ignore is None else 1.0 - np.asarray(ignore, dtype=np.float64)
    labelled = (y * observed).sum(1) > 0
    if not labelled.any():
        raise ValueError("no image has a label: there is nothing to fit a scene mixture to")
    y, observed = y[labelled], observed[labelled]
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    scores: list[float] = []
    for restart in range(max(1, restarts)):
        rng = np.random.default_rng([seed, restart])
        prior, theta = _m_step(y, observed, rng.dirichlet(np.ones(num_scenes), size=len(y)), smoothing)
        previous = -np.inf
        for _ in range(max_iters):
            resp, log_likelihood = _e_step(y, observed, prior, theta)
            prior, theta = _m_step(y, observed, resp, smoothing)
            if log_likelihood - previous < tol:
                break
            previous = log_likelihood
        scores.append(log_likelihood)
        if best is None or log_likelihood > best[2]:
            best = (prior, theta, log_likelihood)
    assert best is not None
    return MixtureFit(*best, tuple(scores), int(np.argmax(scores)), int(labelled.sum()))


class LabelMixture(nn.Module):
    """The fitted mixture as buffers (saved with the model), giving q(k | y) for a batch.

    Starts uniform (rho = 1/K, theta = 1/2: every posterior uniform) until ``load_fit`` fills it.
    """

    def __init__(self, num_scenes: int, num_labels: int) -> None:
        super().__init__()
        self.register_buffer("prior", torch.full((num_scenes,), 1.0 / num_scenes, dtype=torch.float64))  # (K,)
        self.register_buffer("theta", torch.full((num_scenes, num_labels), 0.5, dtype=torch.float64))  # (K, n)

    @torch.no_grad()
    def load_fit(self, prior: np.ndarray | Tensor, theta: np.ndarray | Tensor) -> None:
        prior_t = torch.as_tensor(np.asarray(prior), dtype=torch.float64)
        theta_t = torch.as_tensor(np.asarray(theta), dtype=torch.float64)
        if prior_t.shape != self.prior.shape or theta_t.shape != self.theta.shape:
            raise ValueError(
                f"mixture of shapes {tuple(prior_t.shape)}, {tuple(theta_t.shape)}; "
                f"the head expects {tuple(self.prior.shape)}, {tuple(self.theta.shape)}"
            )
        self.prior.copy_(prior_t)
        self.theta.copy_(theta_t.clamp(THETA_FLOOR, 1 - THETA_FLOOR))

    @torch.no_grad()
    def posterior(self, targets: Tensor, ignore: Tensor | None = None) -> Tensor:
        """targets (B, n) multi-hot -> q(k | y) (B, K) float64; ``ignore`` (B, n) True drops an entry."""
        y = targets.to(torch.float64)  # (B, n)
        observed = self._observed(y, ignore)  # (B, n)
        log_on, log_off = self.theta.log(), torch.log1p(-self.theta)  # (K, n)
        logits = (y * observed) @ log_on.T + ((1.0 - y) * observed) @ log_off.T + self.prior.log()  # (B, K)
        return logits.softmax(-1)

    @torch.no_grad()
    def forward(self, targets: Tensor, ignore: Tensor | None = None) -> Tensor:
        """The scene targets (B, K) float32: q(k | y), and a row of zeros (no target) for an image
        without a kept label, which the fit left out too."""
        y = targets.to(torch.float64)  # (B, n)
        labelled = (y * self._observed(y, ignore)).sum(-1, keepdim=True) > 0  # (B, 1)
        return (self.posterior(targets, ignore) * labelled).float()

    @staticmethod
    def _observed(y: Tensor, ignore: Tensor | None) -> Tensor:
        return torch.ones_like(y) if ignore is None else (~ignore.bool()).to(y.dtype)
