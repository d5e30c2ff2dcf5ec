"""Scene metrics beside the label metrics, for training epochs and ``salgl evaluate`` alike.

- entropy and occupancy of the argmax scenes (SPEC section 5);
- where the data has a true ``scene`` column (the built-in mosaic), how well the predicted scenes
  recover it: normalised mutual information and adjusted Rand index (scikit-learn's);
- on a probe batch of training images (``salgl.stability``), the share of images that keep their
  scene when something that should not matter changes: train against eval mode
  (``scene_agreement``: scenes that ride on batch statistics and vanish at test time), the image
  alone against inside its batch (``scene_stability_batch``: BatchNorm coupling), and two
  training augmentations of the same image (``scene_stability_augment``: augmentation and
  dropout noise, the one of the three that frozen BatchNorm does not make 1 by construction).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from salgl.config import DataConfig
from salgl.metrics import scene_entropy, scene_occupancy
from salgl.stability import batch_scenes, train_eval_scenes, train_mode_scenes

log = logging.getLogger(__name__)

PROBE_IMAGES = 64  # images of the scene-stability probes
# Each probe's pair of argmax scenes (two (P,) arrays) by its ``scene_metrics`` keyword, and the
# metric that says how often the two agree.
PROBES = {"probe": "scene_agreement", "batch": "scene_stability_batch", "augment": "scene_stability_augment"}
Pair = tuple[np.ndarray, np.ndarray]


def scene_metrics(
    scenes: np.ndarray,
    num_scenes: int,
    *,
    truth: np.ndarray | None = None,
    probe: Pair | None = None,
    batch: Pair | None = None,
    augment: Pair | None = None,
) -> dict[str, Any]:
    """scenes (N,) argmax scene ids; truth (N,) true scene ids; each probe pair (P,) ids: probe
    (train mode, eval mode), batch (inside the batch, alone), augment (two augmentations)."""
    scenes = np.asarray(scenes)
    metrics: dict[str, Any] = {
        "scene_entropy": scene_entropy(scenes, num_scenes) + 0.0,  # -0.0 (one scene) prints as 0
        "occupancy": scene_occupancy(scenes, num_scenes).tolist(),
    }
    if truth is not None and len(truth) == len(scenes) and len(scenes):
        metrics["scene_nmi"] = float(normalized_mutual_info_score(truth, scenes))
        metrics["scene_ari"] = float(adjusted_rand_score(truth, scenes))
    for pair, key in zip((probe, batch, augment), PROBES.values()):
        if pair is not None and len(pair[0]):
            metrics[key] = float(np.mean(np.asarray(pair[0]) == np.asarray(pair[1])))
    return metrics


def probe_pairs(
    model: torch.nn.Module, images: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor] | None = None, *, normalize: str = "imagenet"
) -> dict[str, Pair]:
    """Every probe's pair of argmax scenes, by ``scene_metrics`` keyword: ``probe`` and ``batch``
    on ``images`` (B, 3, S, S, normalised), ``augment`` on ``views`` (two augmentations of the
    same images, uint8 pixels, normalised here as ``normalize`` says on the images' device)."""
    from pipeline.transforms import normalize_tensor

    pairs = {"probe": train_eval_scenes(model, images), "batch": batch_scenes(model, images)}
    if views is not None:
        first, second = (normalize_tensor(v.to(images.device), normalize) for v in views)
        pairs["augment"] = (train_mode_scenes(model, first), train_mode_scenes(model, second))
    return {name: (a.cpu().numpy(), b.cpu().numpy()) for name, (a, b) in pairs.items()}


def augmented_probe(
    data_dir: str, data: DataConfig, *, num_labels: int, seed: int, ids: Sequence[str] | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two independent training augmentations (``data``'s; uint8 pixels (P, 3, S, S) each) of the
    source images of ``split`` named by ``ids`` (None: its first ``PROBE_IMAGES``), read again from
    the shards in ``data_dir`` (``pipeline.probe``); None, with a warning, where they cannot be read.

    Seeds of their own (from ``seed``), fixed for a run: epoch after epoch the metric compares the
    same two views, so it follows the model, not the draw.
    """
    from pipeline.probe import augmented_views, first_rows, rows_by_id
    from pipeline.seeding import derive_seed

    if not data_dir:
        return None
    try:
        rows = first_rows(data_dir, split, PROBE_IMAGES) if ids is None else rows_by_id(data_dir, split, ids)
        seeds = (derive_seed(seed, "probe_augment", 0), derive_seed(seed, "probe_augment", 1))
        views = augmented_views(rows, data, num_labels=num_labels, seeds=seeds)
    except (OSError, LookupError, ValueError) as err:
        log.warning("scene_stability_augment left out: the probe's images could not be read again (%s)", err)
        return None
    return torch.from_numpy(views[0]), torch.from_numpy(views[1])

