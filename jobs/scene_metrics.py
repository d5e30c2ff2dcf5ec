"""Scene metrics beside the label metrics, for training epochs and ``salgl evaluate`` alike.

- entropy and occupancy of the argmax scenes (SPEC section 5);
- where the data has a true ``scene`` column (the built-in mosaic), how well the predicted scenes
  recover it: normalised mutual information and adjusted Rand index (scikit-learn's);
- the agreement between train-mode and eval-mode scene assignments on a probe batch of training
  images: the alarm for scenes that ride on batch statistics and vanish at test time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from salgl.metrics import scene_entropy, scene_occupancy

PROBE_IMAGES = 64  # images of the train/eval agreement probe


def scene_metrics(
    scenes: np.ndarray,
    num_scenes: int,
    *,
    truth: np.ndarray | None = None,
    probe: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """scenes (N,) argmax scene ids; truth (N,) true scene ids; probe (train-mode, eval-mode) ids (P,)."""
    scenes = np.asarray(scenes)
    metrics: dict[str, Any] = {
        "scene_entropy": scene_entropy(scenes, num_scenes) + 0.0,  # -0.0 (one scene) prints as 0
        "occupancy": scene_occupancy(scenes, num_scenes).tolist(),
    }
    if truth is not None and len(truth) == len(scenes) and len(scenes):
        metrics["scene_nmi"] = float(normalized_mutual_info_score(truth, scenes))
        metrics["scene_ari"] = float(adjusted_rand_score(truth, scenes))
    if probe is not None and len(probe[0]):
        metrics["scene_agreement"] = float(np.mean(np.asarray(probe[0]) == np.asarray(probe[1])))
    return metrics
