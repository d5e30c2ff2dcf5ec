"""The run's label mixture (salgl/scenes.py): fitted once when a run starts, kept in its folder.

The fit is the scene classifier's target for the whole run, so a resumed run (``--resume``) reads
the one its folder holds rather than fitting again. What the fit found goes to the run log and to
MLflow: each restart's log-likelihood, the chosen restart, the prior and the effective number of
scenes, with a warning where K asks for more scenes than the training labels support.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from jobs.storage import Folder
from jobs.tracking import MlflowLogger
from salgl.config import Config

log = logging.getLogger("salgl")

MIXTURE_FILE = "scene_mixture.json"
# Restarts of each smaller K fitted to tell how many scenes the labels support.
SELECTION_RESTARTS = 2


def wants_mixture(cfg: Config) -> bool:
    return cfg.model.head.scene_targets == "labels" and cfg.model.head.num_scenes > 1


def fit_run_mixture(data_dir: str, cfg: Config, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fit the mixture to the training labels, their ignore mask honoured (as the posterior does);
    the labels are read as sparse rows, so memory stays O(nnz + K n) at any vocabulary
    (``manifest``: the dataset's, where the run has read it already)."""
    from pipeline.shards import read_sparse_labels
    from salgl.scenes import fit_label_mixture, supported_scenes

    head = cfg.model.head
    labels = read_sparse_labels(data_dir, "train", manifest)
    fit = fit_label_mixture(labels, head.num_scenes, seed=cfg.run.seed, restarts=head.mixture_restarts)
    restarts = min(SELECTION_RESTARTS, head.mixture_restarts)
    bics = {k: fit_label_mixture(labels, k, seed=cfg.run.seed, restarts=restarts).bic for k in range(1, head.num_scenes)}
    bics[head.num_scenes] = fit.bic
    return {
        "prior": fit.prior.tolist(), "theta": fit.theta.tolist(), "log_likelihood": fit.log_likelihood,
        "restart_log_likelihoods": list(fit.restart_log_likelihoods), "chosen_restart": fit.chosen_restart,
        "effective_scenes": fit.effective_scenes,
        "bic": {str(k): value for k, value in bics.items()}, "supported_scenes": supported_scenes(bics),
        "images": fit.images, "images_without_labels": int(labels.num_images - fit.images),
    }


def run_mixture(
    run_dir: Folder, data_dir: str, cfg: Config, logger: MlflowLogger, manifest: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's mixture: the one its folder holds (a resumed run), else a new fit, written there
    and reported; None where the recipe trains without scene targets."""
    if not wants_mixture(cfg):
        return None
    if run_dir.is_file(MIXTURE_FILE):
        mixture = json.loads(run_dir.read_text(MIXTURE_FILE))
        log.info(f"scene mixture: kept from the run folder ({describe(mixture)})")
        return mixture
    mixture = fit_run_mixture(data_dir, cfg, manifest)
    run_dir.write_text(MIXTURE_FILE, json.dumps(mixture))
    log.info(f"scene mixture: {describe(mixture)}")
    if (warning := too_many_scenes(mixture, cfg.model.head.num_scenes)) is not None:
        log.warning(warning)
    logger.log_params(mixture_params(mixture))
    logger.log_metrics(mixture_metrics(mixture), step=0)
    for restart, value in enumerate(mixture["restart_log_likelihoods"]):
        logger.log_metrics({"scene_mixture.restart_log_likelihood": value}, step=restart)
    for num_scenes, value in mixture["bic"].items():
        logger.log_metrics({"scene_mixture.bic": value}, step=int(num_scenes))
    return mixture


def describe(mixture: dict[str, Any]) -> str:
    others = [v for i, v in enumerate(mixture["restart_log_likelihoods"]) if i != mixture["chosen_restart"]]
    spread = f"; the other restarts {min(others):.4f} to {max(others):.4f}" if others else ""
    prior = " ".join(f"{p:.3f}" for p in mixture["prior"])
    unlabelled = f", {mixture['images_without_labels']} without a label left out" if mixture["images_without_labels"] else ""
    return (
        f"{len(mixture['prior'])} scenes fitted to {mixture['images']} training label sets{unlabelled}; "
        f"log-likelihood {mixture['log_likelihood']:.4f} per image (restart {mixture['chosen_restart']} of "
        f"{len(mixture['restart_log_likelihoods'])}{spread}); prior {prior}; "
        f"effective scenes exp(H(prior)) {mixture['effective_scenes']:.2f}; the labels support about "
        f"{mixture['supported_scenes']} (BIC)"
    )


def too_many_scenes(mixture: dict[str, Any], num_scenes: int) -> str | None:
    """A warning where the labels support fewer scenes than K (by BIC over 1..K), else None."""
    from salgl.scenes import BIC_MARGIN

    supported = int(mixture["supported_scenes"])
    if supported >= num_scenes:
        return None
    return (
        f"K = {num_scenes}, but the training labels support about {supported} scenes (the mixture's BIC is within "
        f"{BIC_MARGIN:.0f} of its best at K = {supported}; effective scenes exp(H(prior)) "
        f"{mixture['effective_scenes']:.2f}). The {num_scenes - supported} extra components split real scenes to fit "
        f"noise or hold almost no image: their count matrices learn from fewer images each, and the balance term L2 "
        f"pulls toward scene sizes the labels do not have. Runs with a larger K use the same scenes, cut finer; "
        f"consider K = {supported}"
    )


def mixture_params(mixture: dict[str, Any]) -> dict[str, Any]:
    return {
        "scene_mixture.chosen_restart": mixture["chosen_restart"],
        "scene_mixture.prior": " ".join(f"{p:.4f}" for p in mixture["prior"]),
        "scene_mixture.images": mixture["images"],
    }


def mixture_metrics(mixture: dict[str, Any]) -> dict[str, float]:
    return {
        "scene_mixture.log_likelihood": float(mixture["log_likelihood"]),
        "scene_mixture.effective_scenes": float(mixture["effective_scenes"]),
        "scene_mixture.supported_scenes": float(mixture["supported_scenes"]),
    }
