"""``salgl inspect``: what a checkpoint's scenes learned, as pictures (paper figures 4 and 5).

The pictures come from the model's count matrices alone (no data needed): per scene, the
co-occurrence probabilities P(j | i) of chosen labels as a heatmap, and the labels ranked by how
often they were counted. ``jobs.artifacts`` draws them, as it does for a training run's MLflow
artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jobs.artifacts import top_labels_per_scene, write_scene_heatmaps, write_scene_rankings
from salgl.model import SALGL


def inspect_scenes(
    model: SALGL,
    vocabulary: Sequence[str],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    top_k: int = 10,
) -> list[Path]:
    """Heatmaps and rankings for every scene under ``out_dir``; the files written."""
    counts = model.head.counts.detach().cpu()  # (K, n, n)
    heatmaps = write_scene_heatmaps(counts, vocabulary, out_dir, labels=labels, self_loops=model.head.cfg.self_loops)
    return heatmaps + write_scene_rankings(counts, vocabulary, out_dir, k=top_k)


def format_rankings(model: SALGL, vocabulary: Sequence[str], top_k: int = 5) -> str:
    """One line per scene: its most counted labels, for the console."""
    counts = model.head.counts.detach().cpu()
    lines = []
    for scene, items in enumerate(top_labels_per_scene(counts, vocabulary, top_k)):
        total = int(counts[scene].diagonal().sum())
        ranked = ", ".join(f"{name} ({count})" for name, count in items) or "(never counted)"
        lines.append(f"scene {scene}: {total} label counts; top: {ranked}")
    return "\n".join(lines)
