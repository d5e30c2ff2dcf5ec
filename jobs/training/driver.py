"""Driver side of ``salgl train``: ``train`` puts a run together from its parts, each built in its
own module (torchtune's recipes take their built parts the same way):

- ``run_start``: a new or resumed run folder, its dataset facts (the manifest read once), Ray,
  the resources and the MLflow run (``run_folder``, ``dataset``, ``ray_setup``, ``mlflow_run``,
  ``resume``);
- ``scene_mixture``: the run's label mixture, fitted once;
- ``trainer``: Ray Train's trainer and its fit, with the epoch lines of ``epoch_report``;
- ``outcome`` and ``final_artifacts``: what the run came to, and what it leaves in MLflow.

The per-worker loop is ``jobs.training.recipe``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

from jobs.logs import run_log
from jobs.tracking import MlflowLogger, end_run
from jobs.training.final_artifacts import record_final_artifacts
from jobs.training.outcome import TrainOutcome, check_not_diverged, fitted_outcome, log_summary
from jobs.training.ray_setup import start_line
from jobs.training.run_folder import local_folder, storage_root, upload_log
from jobs.training.run_start import MlflowNaming, StartedRun, resume_run, start_new_run
from jobs.training.scene_mixture import run_mixture
from jobs.training.trainer import build_trainer, fit
from salgl.config import Config

log = logging.getLogger(__name__)


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    address: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    mlflow_run_name: str | None = None,
    callbacks: Sequence[Any] = (),
    log_model: bool = True,
    extra_params: Mapping[str, Any] | None = None,
    resource_share: float = 1.0,
    quiet: bool = False,
    weights_only: bool = False,
) -> TrainOutcome:
    """Train end to end (or continue ``resume``) and record the outcome in MLflow.

    ``parent_run_id`` / ``mlflow_run_name`` / ``extra_params`` nest the run under a sweep;
    ``resource_share`` is the fraction of the cluster this run may size itself from (several
    trials at once); ``quiet`` keeps the run's epoch and progress lines off the console (its salgl.log
    still has them; a sweep prints its own, ``jobs.sweep.progress``); ``weights_only`` logs the best
    checkpoint's weights to MLflow rather than the whole checkpoint (``record_final_artifacts``).
    """
    storage = storage_root(cfg)
    naming = MlflowNaming(run_name=mlflow_run_name, parent_run_id=parent_run_id, extra_params=extra_params)
    if resume:
        run = resume_run(resume, storage, cfg, overrides=overrides, address=address, resource_share=resource_share, naming=naming)
    else:
        run = start_new_run(cfg, storage, address=address, resource_share=resource_share, naming=naming)
    local_dir = local_folder(run.run_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    # salgl.log (the controller and workers append theirs), copied to an object-store run folder at the end
    with contextlib.ExitStack() as on_exit, run_log(local_dir):
        on_exit.callback(upload_log, run.run_dir, local_dir)
        say_notes(run)
        mixture = run_mixture(run.run_dir, run.dataset.location, run.cfg, MlflowLogger(run.tracking_uri, run.mlflow_run_id),
                              run.dataset.manifest)
        trainer = build_trainer(
            run.cfg, dataset=run.dataset, run_dir=run.run_dir, run_name=run.run_name, storage=run.storage,
            tracking_uri=run.tracking_uri, mlflow_run_id=run.mlflow_run_id, plan=run.plan, callbacks=callbacks, quiet=quiet,
            scene_mixture=mixture,
        )
        log.info(f"{start_line(run.run_name, run.cfg, run.plan)}; data {run.dataset.location}, checkpoints in {run.run_dir}")
        if run.plan.note:
            log.warning(run.plan.note)
        result = fit(trainer, run_name=run.run_name, run_dir=run.run_dir, local_dir=local_dir,
                     tracking_uri=run.tracking_uri, run_id=run.mlflow_run_id, quiet=quiet)
        check_not_diverged(run.run_dir, run.tracking_uri, run.mlflow_run_id)
        outcome = fitted_outcome(result, run.run_name, run.run_dir, run.mlflow_run_id, run.tracking_uri)
        finished = outcome.metrics.get("epoch") == run.cfg.optim.epochs
        record_final_artifacts(outcome, run.cfg, log_model=log_model and finished, weights_only=weights_only)
        end_run(run.tracking_uri, run.mlflow_run_id, "FINISHED" if finished else "KILLED")
        if not quiet:
            log_summary(outcome, finished)
        return outcome


def say_notes(run: StartedRun) -> None:
    """What the run's start found worth a warning, once its log is open; a resumed run's damaged
    checkpoints are set aside here (``jobs.training.checkpoints``)."""
    from jobs.training.checkpoints import set_aside_damaged

    for line in run.notes:
        log.warning(line)
    if run.resumed:
        for line in set_aside_damaged(run.run_dir):
            log.warning(line)
