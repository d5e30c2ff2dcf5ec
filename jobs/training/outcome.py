"""What a run came to: its newest and best checkpoints and their metrics, read from its folder,
a diverged run said as such, and the summary lines a finished or stopped run ends with."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from jobs.storage import Folder
from jobs.tracking import BestSoFar, MlflowLogger, end_run, run_page
from jobs.training.run_folder import RUN_FILE, read_run_file
from salgl.config import Config, from_stored
from salgl.errors import Failed

# The run's own lines keep the logger name they had in salgl.log before the driver was split.
log = logging.getLogger("jobs.training.driver")


@dataclass(frozen=True)
class TrainOutcome:
    run_name: str
    run_dir: str
    metrics: dict[str, Any]  # the last epoch's metrics
    best_checkpoint: str | None  # folder of the best checkpoint by EMA mAP
    best_metrics: dict[str, Any]
    last_checkpoint: str | None  # folder of the newest checkpoint (what a resume continues from)
    mlflow_run_id: str
    tracking_uri: str


def check_not_diverged(run_dir: Folder, tracking_uri: str, run_id: str) -> None:
    """A run whose weights stopped being finite ends FAILED, never "finished": exit 1 with the
    epoch, step and loss terms of the first non-finite loss (rank 0's)."""
    from jobs.training.checkpoints import DIVERGED_FILE

    if not run_dir.is_file(DIVERGED_FILE):
        return
    found = json.loads(run_dir.read_text(DIVERGED_FILE))
    end_run(tracking_uri, run_id, "FAILED")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in found.items() if k.startswith("loss"))
    what = "a non-finite loss" if found.get("non_finite_loss") else "non-finite weights after a finite loss"
    raise Failed(
        f"training diverged: {what} at epoch {found.get('epoch')}, step {found.get('step')} ({terms}); no checkpoint "
        f"of it was written. Lower optim.lr or set optim.clip_grad_norm; `salgl train --resume {run_dir} optim.lr=...` "
        "continues from the last good checkpoint"
    )


def fitted_outcome(result: Any, run_name: str, run_dir: Folder, run_id: str, tracking_uri: str) -> TrainOutcome:
    """The run's newest and best checkpoints, read from its folder (their meta.json), as a resumed
    run starts from them: Ray's ``Result`` misses a report that a stop cut off after its checkpoint
    was written (a run stopped just after its last epoch would otherwise count as unfinished).
    That cut-off epoch's metrics go to MLflow here."""
    outcome = outcome_in(run_dir, run_name, run_id, tracking_uri, fallback=dict(result.metrics or {}))
    if outcome.metrics.get("epoch") != (result.metrics or {}).get("epoch"):
        # The newest epoch's report was cut off (a stop right after its checkpoint): log it now.
        best = BestSoFar.from_run_dir(str(run_dir)).update({})
        MlflowLogger(tracking_uri, run_id).log_metrics({**outcome.metrics, **best}, step=int(outcome.metrics.get("epoch", 0)))
    return outcome


def outcome_in(
    run_dir: Folder, run_name: str, run_id: str, tracking_uri: str, *, fallback: Mapping[str, Any] | None = None,
) -> TrainOutcome:
    """A run's outcome from its folder alone: also what a sweep records for a trial whose process
    Tune ended (an ASHA stop) before ``train`` could."""
    from jobs.training.checkpoints import best_checkpoint_in, newest_checkpoint, read_meta

    def metrics_of(folder: str | None) -> dict[str, Any]:
        return read_meta(folder)["metrics"] if folder else {}

    newest = newest_checkpoint(run_dir)
    last_path = newest[0] if newest else None
    best_path = best_checkpoint_in(run_dir, "ema_mAP")
    last = metrics_of(last_path) or dict(fallback or {})
    return TrainOutcome(run_name, str(run_dir), last, best_path, metrics_of(best_path), last_path, run_id, tracking_uri)


def recorded_outcome(run_dir: Folder) -> tuple[TrainOutcome, Config] | None:
    """(outcome, config) of a run folder from its run record; None where it has none."""
    if not run_dir.is_file(RUN_FILE):
        return None
    record = read_run_file(run_dir)
    outcome = outcome_in(run_dir, record["run_name"], record["mlflow_run_id"], record["tracking_uri"])
    return outcome, from_stored(record["config"], record.get("schema_version"))


def log_summary(outcome: TrainOutcome, finished: bool) -> None:
    m = outcome.best_metrics or outcome.metrics
    keys = ["ema_mAP", "mAP", "ema_CF1", "ema_OF1", "ema_scene_entropy"]
    log.info(("finished" if finished else f"stopped after epoch {outcome.metrics.get('epoch')}") + f": run {outcome.run_name}")
    log.info("best checkpoint: " + (outcome.best_checkpoint or "none"))
    log.info("  ".join(f"{k} {m[k]:.2f}" for k in keys if isinstance(m.get(k), (int, float))))
    log.info("MLflow: " + run_page(outcome.tracking_uri, outcome.mlflow_run_id))
    if not finished:
        log.info(f"continue with: salgl train --resume {outcome.run_name}")
