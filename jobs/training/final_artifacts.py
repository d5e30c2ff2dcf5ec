"""What a run leaves in MLflow as it ends: the resolved config, the final metrics, per-class AP,
the scene pictures of its best checkpoint, that checkpoint (or its weights) and the MLflow model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from jobs.storage import local_copy
from jobs.tracking import MlflowLogger
from jobs.training.outcome import TrainOutcome
from salgl.config import Config, to_flat


def record_final_artifacts(outcome: TrainOutcome, cfg: Config, *, log_model: bool, weights_only: bool = False) -> None:
    """Resolved config, metrics JSON, scene pictures, the best checkpoint and the MLflow model.

    ``weights_only`` (sweep trials): the best checkpoint's model weights go to MLflow instead of
    the whole checkpoint, whose optimiser state doubles its size and serves only a resume, which
    reads the run folder anyway.
    """
    logger = MlflowLogger(outcome.tracking_uri, outcome.mlflow_run_id)
    logger.log_text(json.dumps(to_flat(cfg), indent=1), "config/resolved_config.json")
    logger.log_text(json.dumps({"last": outcome.metrics, "best": outcome.best_metrics}, indent=1, default=str), "metrics/final_metrics.json")
    if not outcome.best_checkpoint:
        return
    with local_copy(outcome.best_checkpoint) as best:
        _record_checkpoint_artifacts(outcome, cfg, logger, best, log_model=log_model, weights_only=weights_only)


def _record_checkpoint_artifacts(
    outcome: TrainOutcome, cfg: Config, logger: MlflowLogger, best: Path, *, log_model: bool, weights_only: bool,
) -> None:
    from jobs.artifacts import write_occupancy_chart, write_scene_heatmaps, write_scene_rankings
    from jobs.training.checkpoints import export_weights, load_model_from_checkpoint

    model, _, vocabulary = load_model_from_checkpoint(best)
    log_per_class_ap(logger, outcome.best_metrics, vocabulary)
    counts = model.head.counts
    occupancy = [outcome.best_metrics.get(f"ema_occupancy_{k}", 0.0) for k in range(cfg.model.head.num_scenes)]
    with tempfile.TemporaryDirectory() as tmp:
        write_scene_heatmaps(counts, vocabulary, Path(tmp) / "scenes", self_loops=cfg.model.head.self_loops)
        write_scene_rankings(counts, vocabulary, Path(tmp) / "scenes")
        write_occupancy_chart(occupancy, Path(tmp) / "scenes" / "scene_occupancy.png")
        logger.log_artifacts(str(Path(tmp) / "scenes"), "scenes")
        if weights_only:
            logger.log_artifacts(str(export_weights(best, Path(tmp) / "weights")), "best_weights")
    if not weights_only:
        logger.log_artifacts(str(best), "best_checkpoint")
    if log_model:
        from jobs.inference.pyfunc import log_checkpoint_model

        log_checkpoint_model(str(best), outcome.tracking_uri, outcome.mlflow_run_id)


def log_per_class_ap(logger: MlflowLogger, metrics: Mapping[str, Any], vocabulary: Sequence[str]) -> None:
    """The best checkpoint's AP per class (EMA and live model, percent; empty for a class without
    positives) as ``metrics/per_class_ap.csv``: the classes a run gets wrong, which the mean hides.
    A CSV, not ``log_table``, whose JSON appends to itself when a stopped trial's artifacts are
    recorded again. Checkpoints written before per-class AP was kept log none."""
    import csv
    import io

    columns = {key: metrics[key] for key in ("ema_ap", "ap") if isinstance(metrics.get(key), list)}
    if not columns:
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["label", *columns])
    for i, label in enumerate(vocabulary):
        writer.writerow([label, *("" if values[i] is None else f"{values[i]:.4f}" for values in columns.values())])
    logger.log_text(text.getvalue(), "metrics/per_class_ap.csv")
