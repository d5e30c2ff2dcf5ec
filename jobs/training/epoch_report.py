"""A run's progress on the Train controller: one line per epoch (the console and salgl.log) and
the epoch's metrics into MLflow, with the MLflow store opened as the controller starts."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from jobs.logs import configure_worker_logging, console_level
from jobs.storage import Folder, is_object_store
from jobs.tracking import BestSoFar, MlflowLogger
from jobs.training.run_folder import upload_log

# The run's own lines keep the logger name they had in salgl.log before the driver was split.
log = logging.getLogger("jobs.training.driver")


def wants_progress_bar(quiet: bool) -> bool:
    """A bar in place of the in-epoch lines: on a terminal, at the default verbosity or above."""
    return not quiet and sys.stderr.isatty() and console_level() <= logging.INFO


def format_epoch_line(m: Mapping[str, Any], epochs: int, *, label: str = "") -> str:
    """One epoch's progress line; ``label`` names the run when several share the output (a sweep)."""

    def f(key: str, fmt: str = ".2f") -> str:
        value = m.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    # Scene recovery (NMI) only where the data has true scenes; the stability probes where probed.
    shown = (("scene NMI", "ema_scene_nmi"), ("agreement", "ema_scene_agreement"), ("stability", "ema_scene_stability_augment"))
    extras = "".join(f"  {name} {f(key, '.2f')}" for name, key in shown if key in m)
    return (
        f"{label + '  ' if label else ''}epoch {m.get('epoch')}/{epochs}  loss {f('loss', '.4f')}  mAP {f('mAP')}  "
        f"EMA mAP {f('ema_mAP')}  scene entropy {f('ema_scene_entropy', '.3f')}{extras}  "
        f"{f('images_per_s', '.1f')} img/s"
    )


def make_tracking_warmup(tracking_uri: str, run_id: str):
    """A Train controller callback that opens the MLflow store on a thread as the controller starts.

    The controller is a fresh process per run, and its first ``log_metrics`` would import MLflow
    and open the store (seconds) on the loop that polls the workers, after the first epoch.
    Started at controller start, it overlaps with the worker group's start-up instead; the store
    is cached per URI, so the reporter's logger reuses it.
    """
    import threading

    from pipeline.ray_compat import controller_callback_class

    class TrackingWarmup(controller_callback_class()):  # type: ignore[misc]
        thread: threading.Thread | None = None

        def after_controller_start(self, train_run_context: Any) -> None:
            self.thread = threading.Thread(target=MlflowLogger, args=(tracking_uri, run_id), name="salgl-mlflow-warmup", daemon=True)
            self.thread.start()

    return TrackingWarmup()


def make_epoch_reporter(
    tracking_uri: str, run_id: str, epochs: int, *, quiet: bool = False, log_file: str | None = None, run_dir: str | None = None,
):
    """A Ray Train UserCallback: one line per epoch (the console, unless ``quiet``, and ``log_file``)
    and the metrics into MLflow (rank 0's report), with ``best_ema_mAP`` and ``best_epoch`` so far
    (a resumed run starts from its folder's best checkpoint, ``run_dir``)."""
    from ray.train import UserCallback

    level = logging.WARNING if quiet else console_level()  # chosen here: Train runs the callback in its controller

    class EpochReporter(UserCallback):
        logging_ready = False
        best: BestSoFar | None = None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics:
                return
            if not self.logging_ready:
                configure_worker_logging(level, log_file)
                self.logging_ready = True
            m = metrics[0]
            log.info(format_epoch_line(m, epochs))
            if self.best is None:
                self.best = BestSoFar.from_run_dir(run_dir)
            if run_id:
                MlflowLogger(tracking_uri, run_id).log_metrics({**m, **self.best.update(m)}, step=int(m.get("epoch", 0)))
            if log_file and run_dir and is_object_store(run_dir):
                # The log so far into the run folder each epoch: a run whose process is ended (a
                # trial Tune stops, a lost head) still leaves it in the store, not only on one node.
                upload_log(Folder(run_dir), Path(log_file).parent)

    return EpochReporter()
