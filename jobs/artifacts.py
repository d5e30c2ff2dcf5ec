"""Pictures and tables of what the scenes learned: co-occurrence heatmaps (paper fig. 4), label
rankings per scene (fig. 5) and scene occupancy. Written as files, logged by the callers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from salgl.atomic_file import write_text_atomic
from salgl.graph import conditional_probabilities
from salgl.errors import BadValue


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def top_labels_per_scene(counts: torch.Tensor, vocabulary: Sequence[str], k: int = 10) -> list[list[tuple[str, int]]]:
    """Labels ranked by how often they were counted in each scene (the diagonal C^k_ii)."""
    diag = torch.diagonal(counts, dim1=-2, dim2=-1).cpu().numpy()  # (K, n)
    ranking = []
    for scene in diag:
        order = np.argsort(-scene, kind="stable")[:k]
        ranking.append([(vocabulary[i], int(scene[i])) for i in order if scene[i] > 0])
    return ranking


def choose_labels(counts: torch.Tensor, vocabulary: Sequence[str], names: Sequence[str] | None, limit: int = 20) -> list[int]:
    """Indices of the labels to draw: the given names, or the most frequent overall."""
    if names:
        unknown = [n for n in names if n not in vocabulary]
        if unknown:
            raise BadValue(f"unknown labels {unknown}; the vocabulary has {list(vocabulary)[:20]}...")
        return [list(vocabulary).index(n) for n in names]
    totals = torch.diagonal(counts, dim1=-2, dim2=-1).sum(0).cpu().numpy()
    return [int(i) for i in np.argsort(-totals, kind="stable")[: min(limit, len(vocabulary))]]


def write_scene_heatmaps(
    counts: torch.Tensor,
    vocabulary: Sequence[str],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    self_loops: bool = False,
) -> list[Path]:
    """One PNG per scene: P^k_ij = P(label j | label i, scene k) for the chosen labels."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = choose_labels(counts, vocabulary, labels)
    # Eq. 8 on the chosen labels' block only (the same entries, without P^k's K n^2 at large n).
    chosen = torch.tensor(index, dtype=torch.long, device=counts.device)
    block = counts.index_select(1, chosen).index_select(2, chosen).double().cpu()  # (K, c, c)
    probs = conditional_probabilities(block, self_loops=self_loops, row_normalize=False).numpy()
    names = [vocabulary[i] for i in index]
    paths = []
    for k, sub in enumerate(probs):
        size = 2.5 + 0.35 * len(index)
        fig, ax = plt.subplots(figsize=(size, size))
        image = ax.imshow(sub, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("label j")
        ax.set_ylabel("label i")
        ax.set_title(f"scene {k}: P(j | i), {int(counts[k].diagonal().sum())} label counts")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"scene_{k}_cooccurrence.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_occupancy_chart(occupancy: Sequence[float], path: str | Path, *, title: str = "scene occupancy (test set)") -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(occupancy), 3))
    ax.bar(range(len(occupancy)), occupancy, color="tab:blue")
    ax.set_xticks(range(len(occupancy)))
    ax.set_xlabel("scene")
    ax.set_ylabel("fraction of images")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_scene_rankings(counts: torch.Tensor, vocabulary: Sequence[str], out_dir: str | Path, k: int = 10) -> list[Path]:
    """Per-scene label rankings as JSON and as one bar-chart PNG per scene."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranking = top_labels_per_scene(counts, vocabulary, k)
    json_path = out_dir / "top_labels_per_scene.json"
    write_text_atomic(json_path, json.dumps({f"scene_{s}": r for s, r in enumerate(ranking)}, indent=1))
    paths = [json_path]
    for scene, items in enumerate(ranking):
        fig, ax = plt.subplots(figsize=(4, 0.4 * max(len(items), 1) + 1))
        names = [name for name, _ in items][::-1]
        ax.barh(range(len(items)), [c for _, c in items][::-1], color="tab:green")
        ax.set_yticks(range(len(items)), names, fontsize=8)
        ax.set_xlabel("times counted")
        ax.set_title(f"scene {scene}: top labels")
        fig.tight_layout()
        path = out_dir / f"scene_{scene}_top_labels.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_metric_by_k(rows: Sequence[dict], key: str, path: str | Path, *, ylabel: str, reference=None) -> Path:
    """Scatter of a per-trial value against K (one point per trial, the mean per K joined by a line);
    ``reference`` (e.g. ``math.log``) draws f(K) for comparison, such as the maximum entropy ln K."""
    plt = _pyplot()
    path = Path(path)
    points = [(row["K"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if points:
        ks, values = zip(*points)
        ax.scatter(ks, values, alpha=0.7, label="trials")
        means = {k: float(np.mean([v for kk, v in points if kk == k])) for k in sorted(set(ks))}
        ax.plot(list(means), list(means.values()), "-o", color="tab:red", label="mean per K")
        if reference is not None:
            grid = sorted(set(ks))
            ax.plot(grid, [reference(k) if k > 0 else 0.0 for k in grid], "--", color="gray", label="reference")
    ax.set_xlabel("number of scenes K")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
