"""Scene targets from the labels: what lets the scene classifier find scenes that drive co-occurrence.

Notation: N training images, B batch, n labels, K scenes.

The paper trains the scene classifier pi = softmax(W vbar) (eq. 4-6) with the entropy loss alone
(eq. 9-11). That asks for sharp, balanced assignments but says nothing about *which* images share
a scene, so on data whose scenes are latent the partition it finds is balanced yet unrelated to
what makes labels co-occur (and, riding on BatchNorm's batch statistics, may not survive eval mode).

Here a scene is what the co-occurrence structure says it is: the latent class of a mixture of
independent Bernoullis over the label sets,

    p(y) = sum_k rho_k prod_i theta_ki^y_i (1 - theta_ki)^(1 - y_i),

fitted once per run to the training labels by EM (the best of a few seeded restarts), on dense
(N, n) labels or, at large vocabularies, on sparse rows (``salgl.sparse_labels``: the same steps in
O(nnz K) time and O(nnz + (N + n) K) memory, where the dense ones take O(N n K) and O(N n)). Entries
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

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from salgl.sparse_labels import SparseLabels

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
    return _responsibilities(_posterior_logits(y, observed, prior, theta))


def _responsibilities(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """q(k | y) (N, K) from the posterior logits, and the log-likelihood log p(y) per image."""
    top = logits.max(1, keepdims=True)
    weights = np.exp(logits - top)
    total = weights.sum(1, keepdims=True)
    return weights / total, float((np.log(total) + top).mean())


def _m_step(y: np.ndarray, observed: np.ndarray, resp: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    seen = resp.T @ observed  # (K, n): each scene's weight of images where label i is observed
    return _parameters(resp, resp.T @ (y * observed), seen, smoothing)


def _parameters(resp: np.ndarray, hits: np.ndarray, seen: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """rho and theta from each scene's weight of observed positives ``hits`` and observed entries
    ``seen`` (K, n), under a Beta(smoothing, smoothing) prior."""
    mass = resp.sum(0)  # (K,)
    theta = (hits + smoothing) / (seen + 2 * smoothing)  # (K, n)
    prior = (mass + smoothing) / (len(resp) + smoothing * len(mass))
    return prior, np.clip(theta, THETA_FLOOR, 1 - THETA_FLOOR)


# --------------------------------------------------------------------------- on sparse labels
#
# The same E and M steps in O(nnz K) per iteration. With P_b an image's observed positives and
# N_b its observed negatives, the posterior logit is
#     log rho_k + sum_{i in P_b} log theta_ki + sum_{i in N_b} log(1 - theta_ki),
# and where N_b is stored as its complement L_b (positives and ignored entries) the last sum is
#     sum_i log(1 - theta_ki) - sum_{i in L_b} log(1 - theta_ki),
# one (K,) sum per iteration. Likewise the M step's observed weight of label i in scene k is
# sum_b q_bk [i in P_b] + sum_b q_bk [i in N_b], the second sum over complement rows being
# sum_b q_bk - sum_b q_bk [i in L_b].


class _SparseRows(NamedTuple):
    """``SparseLabels`` with each entry's row spelled out, as the steps' bincounts take them."""

    positives: tuple[np.ndarray, np.ndarray]  # (rows, columns), (nnz_P,) each
    negatives: tuple[np.ndarray, np.ndarray]  # (rows, columns), (nnz_N,) each
    complement: np.ndarray  # (N,) float: 1 where the row's negatives are stored as their complement
    sign: np.ndarray  # (N,) float: +1 (negatives listed) or -1 (complement)
    num_labels: int

    @staticmethod
    def of(labels: SparseLabels) -> _SparseRows:
        complement = labels.complement.astype(np.float64)
        return _SparseRows(
            (labels.positives.row_ids(), labels.positives.indices),
            (labels.negatives.row_ids(), labels.negatives.indices),
            complement, 1.0 - 2.0 * complement, labels.num_labels,
        )


def _row_sums(entries: tuple[np.ndarray, np.ndarray], values: np.ndarray, num_rows: int) -> np.ndarray:
    """(N, K): for each row b and scene k, the sum of ``values`` (K, n) over the row's columns."""
    rows, cols = entries
    return np.stack([np.bincount(rows, weights=v[cols], minlength=num_rows) for v in values], 1)


def _column_sums(entries: tuple[np.ndarray, np.ndarray], weights: np.ndarray, num_cols: int) -> np.ndarray:
    """(K, n): for each scene k and column i, the sum of ``weights`` (N, K) over the rows holding i."""
    rows, cols = entries
    return np.stack([np.bincount(cols, weights=w[rows], minlength=num_cols) for w in weights.T])


def _sparse_posterior_logits(data: _SparseRows, prior: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``_posterior_logits`` on sparse labels, (N, K), in O(nnz K + N K + n K)."""
    log_on, log_off = np.log(theta), np.log1p(-theta)  # (K, n)
    num_images = len(data.complement)
    on = _row_sums(data.positives, log_on, num_images)  # (N, K)
    listed = _row_sums(data.negatives, log_off, num_images)  # (N, K)
    off = data.complement[:, None] * log_off.sum(1) + data.sign[:, None] * listed
    return on + off + np.log(prior)


def _sparse_e_step(data: _SparseRows, prior: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, float]:
    return _responsibilities(_sparse_posterior_logits(data, prior, theta))


def _sparse_m_step(data: _SparseRows, resp: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """``_m_step`` on sparse labels, in O(nnz K + N K + n K)."""
    hits = _column_sums(data.positives, resp, data.num_labels)  # (K, n)
    listed = _column_sums(data.negatives, resp * data.sign[:, None], data.num_labels)  # (K, n)
    seen = hits + (resp.T @ data.complement)[:, None] + listed
    return _parameters(resp, hits, seen, smoothing)


EStep = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, float]]  # (prior, theta) -> (resp, log-likelihood)
MStep = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]  # (resp, smoothing) -> (prior, theta)
Steps = tuple[EStep, MStep]


def _dense_steps(labels: np.ndarray, ignore: np.ndarray | None) -> tuple[Steps, np.ndarray]:
    """The E and M steps over the labelled rows of dense (N, n) labels, and which rows those are."""
    y = np.asarray(labels, dtype=np.float64)  # (N, n)
    if y.ndim != 2 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty (N, n) array, got shape {y.shape}")
    observed = np.ones_like(y) if ignore is None else 1.0 - np.asarray(ignore, dtype=np.float64)
    labelled = (y * observed).sum(1) > 0
    y, observed = y[labelled], observed[labelled]
    return (partial(_e_step, y, observed), partial(_m_step, y, observed)), labelled


def _sparse_steps(labels: SparseLabels) -> tuple[Steps, np.ndarray]:
    """``_dense_steps`` for sparse labels: O(nnz K) time a step, O(nnz + N K + n K) memory."""
    if labels.num_images == 0:
        raise ValueError("labels must hold at least one image, got none")
    labelled = labels.positives.lengths > 0  # (N,): positives are the observed ones already
    data = _SparseRows.of(labels.take(labelled))
    return (partial(_sparse_e_step, data), partial(_sparse_m_step, data)), labelled


def fit_label_mixture(
    labels: np.ndarray | SparseLabels,
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

    ``labels`` is a dense (N, n) array, or ``SparseLabels`` (which carry their own ignore mask):
    the same fit, to rounding, in O(nnz K) a step rather than O(N n K). ``ignore`` (N, n) True
    leaves an entry out of the likelihood, as ``LabelMixture`` leaves it out of the posterior.
    Rows without a (kept) label are not fitted. Each restart begins from seeded Dirichlet
    responsibilities and runs until the per-image log-likelihood gains less than ``tol``; the
    best restart wins. ``smoothing`` is an add-one (Beta(1, 1)) prior on theta and rho, so a
    component that empties out keeps finite parameters (and a prior of about 1 / N).
    """
    if isinstance(labels, SparseLabels):
        if ignore is not None:
            raise ValueError("SparseLabels carry their ignore mask: pass no separate ignore")
        (e_step, m_step), labelled = _sparse_steps(labels)
    else:
        (e_step, m_step), labelled = _dense_steps(labels, ignore)
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if not labelled.any():
        raise ValueError("no image has a label: there is nothing to fit a scene mixture to")
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    scores: list[float] = []
    for restart in range(max(1, restarts)):
        rng = np.random.default_rng([seed, restart])
        prior, theta = m_step(rng.dirichlet(np.ones(num_scenes), size=int(labelled.sum())), smoothing)
        previous = -np.inf
        for _ in range(max_iters):
            resp, log_likelihood = e_step(prior, theta)
            prior, theta = m_step(resp, smoothing)
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
