"""``salgl evaluate``: score a split with Ray Data batch inference, then the paper's metrics.

    parquet shards -> eval_dataset (decode, resize to uint8 pixels: the checkpoint's ``data`` config)
                   -> map_batches(ScoreBatches, fixed actor pool; each actor holds the model and
                                  normalises the pixels on its device)
                   -> driver: scores, targets, ignore masks, scene probabilities
                   -> multilabel_metrics, scene entropy, occupancy -> table, JSON, MLflow

The model travels to the actors once, through the object store; the metrics are computed on
the driver over the whole split (AP needs every image's score for a class at once).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from jobs.inference.loading import Loaded, score_images
from jobs.resources import ResourcePlan, plan_resources
from jobs.scene_metrics import PROBE_IMAGES, Pair, augmented_probe, probe_pairs, scene_metrics
from pipeline.transforms import normalize_tensor
from salgl.atomic_file import write_text_atomic
from salgl.config import Config
from salgl.errors import BadValue
from salgl.metrics import multilabel_metrics
from salgl.model import SALGL

THRESHOLD_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
TOPK = 3
SCENE_EXTRAS = (
    ("NMI vs true scenes", "scene_nmi"), ("ARI", "scene_ari"), ("train/eval agreement", "scene_agreement"),
    ("batch stability", "scene_stability_batch"), ("augmentation stability", "scene_stability_augment"),
)


@dataclass(frozen=True)
class Scored:
    """Everything the metrics need, one row per image of the split (padding rows dropped)."""

    ids: list[str]
    scores: np.ndarray  # (N, n) label probabilities
    scene_probs: np.ndarray  # (N, K)
    targets: np.ndarray  # (N, n) multi-hot
    ignore: np.ndarray  # (N, n) bool
    true_scenes: np.ndarray | None = None  # (N,) the data's `scene` column, where it has one


# ---------------------------------------------------------------------------------------------
# Ray Data batch inference


class ScoreBatches:
    """A Ray Data actor holding the model: image batches in, scores out (other columns kept)."""

    def __init__(self, model_ref: list[Any], threads: int, use_gpu: bool, normalize: str) -> None:
        import ray

        torch.set_num_threads(threads)
        # The reference comes wrapped in a list so that Ray hands it over unresolved.
        self.model: SALGL = ray.get(model_ref[0])
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model.to(self.device)
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (b, 3, S, S) uint8
        images = normalize_tensor(pixels.to(self.device), self.normalize)  # on the GPU, if any
        scores, scene_probs = score_images(self.model, images)
        keep = ("id", "target", "ignore", "valid", "scene")
        return {"scores": scores, "scene_probs": scene_probs, **{k: batch[k] for k in keep if k in batch}}


def default_actors(cluster: Mapping[str, float]) -> int:
    """One actor per GPU; on CPUs one per 4 cores (each runs several torch threads), 1 to 8."""
    gpus = int(cluster.get("GPU", 0))
    return gpus if gpus else max(1, min(8, int(cluster.get("CPU", 1)) // 4))


def inference_plan(workers: int | None) -> ResourcePlan:
    """Actors and data tasks sized to the cluster, as for training (``jobs.resources``)."""
    import ray

    cluster = ray.cluster_resources()
    return plan_resources(workers or default_actors(cluster), cluster)


def scoring_dataset(
    model: SALGL, data_dir: str, cfg: Config, *, split: str, batch_size: int, plan: ResourcePlan
) -> "ray.data.Dataset":  # noqa: F821
    """The lazy graph: read + test transform -> scoring actors, rows in the split's order."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.ingest import eval_dataset

    ds = eval_dataset(data_dir, cfg.data, num_workers=1, split=split, num_cpus=plan.data_task_cpus)
    ds = ds.map_batches(
        ScoreBatches,
        fn_constructor_kwargs={
            "model_ref": [ray.put(model)], "threads": plan.torch_threads, "use_gpu": plan.use_gpu, "normalize": cfg.data.normalize,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=plan.num_workers),
        num_cpus=plan.cpus_per_worker,
        num_gpus=1 if plan.use_gpu else 0,
    )
    ds.context.execution_options.preserve_order = True  # AP breaks score ties by image order
    return ds


def collect(ds: Any) -> Scored:
    """Stream the scored rows to the driver and stack them."""
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        keep = np.asarray(batch["valid"], dtype=bool) if "valid" in batch else slice(None)
        for key in ("id", "scores", "scene_probs", "target", "ignore", "scene"):
            if key in batch:
                parts[key].append(np.asarray(batch[key])[keep])
    if not parts:
        raise BadValue("the split has no rows: nothing to evaluate")
    stacked = {k: np.concatenate(v) for k, v in parts.items()}
    return Scored(
        ids=[str(i) for i in stacked["id"]],
        scores=stacked["scores"],
        scene_probs=stacked["scene_probs"],
        targets=stacked["target"],
        ignore=stacked["ignore"].astype(bool),
        true_scenes=stacked.get("scene"),
    )


def score_split(loaded: Loaded, data_dir: str, *, split: str = "test", batch_size: int = 32, workers: int | None = None) -> Scored:
    """Score every image of ``split`` on the Ray cluster (``ray.init`` done by the caller)."""
    plan = inference_plan(workers)
    return collect(scoring_dataset(loaded.model, data_dir, loaded.cfg, split=split, batch_size=batch_size, plan=plan))


def probe_scenes(model: SALGL, data_dir: str, cfg: Config, *, split: str, images: int = PROBE_IMAGES) -> dict[str, Pair]:
    """The scene-stability probes' pairs of argmax scenes (``jobs.scene_metrics.probe_pairs``):
    train against eval mode and inside the batch against alone on the split's first ``images``
    images as tested (resized), and two training augmentations of the training split's first
    images where the data has one (the checkpoint's ``data`` config and seed)."""
    from pipeline.ingest import TRAIN_SPLIT, eval_dataset, num_labels
    from pipeline.shards import read_manifest

    batch = eval_dataset(data_dir, cfg.data, num_workers=1, split=split).limit(images).take_batch(images, batch_format="numpy")
    pixels = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (b, 3, S, S) uint8
    views = None
    if TRAIN_SPLIT in read_manifest(data_dir)["splits"]:
        views = augmented_probe(data_dir, cfg.data, num_labels=num_labels(data_dir), seed=cfg.run.seed, split=TRAIN_SPLIT)
    return probe_pairs(model, normalize_tensor(pixels, cfg.data.normalize), views, normalize=cfg.data.normalize)


# ---------------------------------------------------------------------------------------------
# Metrics and reports


def summarize(
    scored: Scored, vocabulary: Sequence[str], num_scenes: int, *, probe: Mapping[str, Pair] | None = None
) -> dict[str, Any]:
    """The paper's metrics (percent), per-class AP by label name, and the scene metrics
    (``jobs.scene_metrics``: entropy, occupancy, NMI / ARI against true scenes, and the stability
    probes' shares from ``probe``, what ``probe_scenes`` returns)."""
    metrics = multilabel_metrics(scored.scores, scored.targets, scored.ignore, topk=TOPK)
    ap = metrics.pop("ap")
    scenes = scene_metrics(scored.scene_probs.argmax(axis=1), num_scenes, truth=scored.true_scenes, **(probe or {}))
    occupancy = scenes.pop("occupancy")
    metrics.update(scenes)
    return {
        "images": len(scored.ids),
        "metrics": metrics,
        "per_class_ap": dict(zip(vocabulary, ap)),
        "max_scene_entropy": math.log(num_scenes),
        "occupancy": occupancy,
    }


def _number(value: Any, fmt: str = "6.2f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-".rjust(6)


def format_report(result: Mapping[str, Any]) -> str:
    """The paper's table row (all labels, then top-3), per-class AP, scene entropy and occupancy."""
    m = result["metrics"]
    top = [f"{k}{TOPK}" for k in THRESHOLD_KEYS]
    header = "   ".join(k.rjust(6) for k in ("mAP", *THRESHOLD_KEYS, *top))
    row = "   ".join(_number(m.get(k)) for k in ("mAP", *THRESHOLD_KEYS, *(f"{k}_top{TOPK}" for k in THRESHOLD_KEYS)))
    width = max(len(name) for name in result["per_class_ap"]) if result["per_class_ap"] else 5
    lines = [header, row, "", "per-class AP:"]
    lines += [f"  {name.ljust(width)}  {_number(ap)}" for name, ap in result["per_class_ap"].items()]
    lines += [
        "",
        f"non-interpolated mAP {_number(m.get('mAP_noninterp'), '.2f')}; classes without positives: {m.get('classes_without_positives')}",
        f"scene entropy {m['scene_entropy']:.3f} (max ln K = {result['max_scene_entropy']:.3f})"
        + "".join(f"; {name} {m[key]:.3f}" for name, key in SCENE_EXTRAS if key in m),
        "scene occupancy: " + "  ".join(f"{k}: {p:.3f}" for k, p in enumerate(result["occupancy"])),
    ]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN -> null (strict JSON), recursively."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(_json_safe(dict(result)), indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_metrics(result: Mapping[str, Any], split: str) -> dict[str, float]:
    """Flat numeric metrics named ``<split>_<key>`` (so they sit beside a training run's own)."""
    out = {f"{split}_{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    out.update({f"{split}_occupancy_{k}": p for k, p in enumerate(result["occupancy"])})
    return out


def log_evaluation(
    result: Mapping[str, Any],
    *,
    split: str,
    tracking_uri: str,
    run_id: str | None = None,
    experiment: str = "salgl",
    params: Mapping[str, Any] | None = None,
) -> str:
    """Log metrics, the JSON and the occupancy chart into ``run_id``, or into a new run; its id."""
    from jobs.artifacts import write_occupancy_chart
    from jobs.tracking import MlflowLogger, end_run, start_run

    new_run = run_id is None
    if new_run:
        run_id = start_run(tracking_uri, experiment, run_name=f"evaluate-{split}", params=params or {}, tags={"salgl.job": "evaluate"})
    logger = MlflowLogger(tracking_uri, run_id)
    logger.log_metrics(mlflow_metrics(result, split), step=0)
    logger.log_text(json.dumps(_json_safe(dict(result)), indent=1), f"evaluation/{split}_metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        write_occupancy_chart(result["occupancy"], Path(tmp) / f"{split}_scene_occupancy.png", title=f"scene occupancy ({split})")
        logger.log_artifacts(tmp, "evaluation")
    if new_run:
        end_run(tracking_uri, run_id)
    return run_id
