"""``salgl tune``: ASHA over K, lambda and T (any config key can be searched), one MLflow child
run per trial under a parent run per sweep, the best trial's best checkpoint registered.

Each trial is a small function that runs the same ``jobs.training.driver.train`` code path as
``salgl train`` (its own TorchTrainer, reporting to Tune through ``TuneReportCallback``),
wrapped with a token CPU request so the trial's Train workers and data tasks get the CPUs
(STACK.md: the Tune + Train pattern that works with Ray 2.60).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from salgl.errors import AlreadyExists, BadValue, NotFound
from jobs.logs import run_log
from jobs.resources import plan_resources
from jobs.sweep.search import DEFAULT_SEARCH, build_searcher, check_search
from jobs.sweep.search_space import (
    METRIC, build_space, check_metric, check_space, describe_domain, expected_trials, trial_label, trial_values,
)
from jobs.tracking import MlflowLogger, end_run, resolve_tracking_uri, run_page, start_run
from jobs.storage import Folder, local_copy, resolve_storage
from jobs.stop_signals import forward_to_sigint_handler, handling
from jobs.training.dataset import resolve_data
from jobs.training.ray_setup import init_ray
from jobs.training.run_folder import new_run_name, storage_root
from salgl.config import Config, from_flat, short_key, to_flat, with_overrides

log = logging.getLogger(__name__)

SWEEP_FILE = "salgl_sweep.json"
SUMMARY_FOLDER = "summary"  # the sweep's table and pictures, in its folder
TRIAL_CPU = 0.01  # a trial's own process only waits on its TorchTrainer (0 is rejected by Tune)


# ---------------------------------------------------------------------------------------------
# The trial


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares. It reaches the trials through ``tune.with_parameters``
    (one copy in Ray's object store), so a trial's Tune config holds its sampled values alone."""

    base: dict[str, Any]  # the sweep's flat config; a trial's sampled values go on top
    parent_run_id: str  # the sweep's MLflow parent run
    resource_share: float  # the share of the cluster one trial plans its workers for (1 / trials at a time)


def trial_trainable(sweep: SweepContext) -> Any:
    """``run_trial`` as Tune runs it: with the sweep's context and a token CPU of its own."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": TRIAL_CPU})


def run_trial(config: dict[str, Any], sweep: SweepContext) -> None:
    """One Tune trial: ``salgl train``'s code path with the sampled values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.training.driver import train
    from jobs.training.run_folder import RUN_FILE

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(config, trial_id, sweep.base)
    flat = to_flat(cfg)
    run_dir = Folder(cfg.run.storage) / cfg.run.name  # a folder every node sees, or in an object store
    resume = cfg.run.name if run_dir.is_file(RUN_FILE) else None  # a restored sweep continues the trial
    if resume and _report_if_complete(run_dir, cfg.optim.epochs):
        return
    train(
        cfg,
        resume=resume,
        parent_run_id=sweep.parent_run_id,
        mlflow_run_name=trial_label(flat, trial_id),
        extra_params={"trial_id": trial_id},  # K, lambda, T and preset come with every run's params
        callbacks=[TuneReportCallback()],
        log_model=False,
        resource_share=sweep.resource_share,
        quiet=True,
        weights_only=True,
    )


def trial_config(config: Mapping[str, Any], trial_id: str, base: Mapping[str, Any]) -> Config:
    """The sweep's ``base`` (flat) config with the trial's sampled values.

    Train never restarts a trial's workers (``run.max_failures=0``); Tune retries the whole trial
    instead (``tune.FailureConfig``), and the retry continues from the trial's last checkpoint.
    When ASHA stops a trial, Tune ends the trial's process and with it the trial's workers, while
    its Train controller can still be alive for a moment: allowed to retry, it would take the
    workers' end for a failure and ask for a new placement group, which outlives the controller and
    holds a CPU until the sweep ends (on 2 CPUs the next trial's workers would never start).
    """
    return with_overrides(from_flat(base), {**config, "run.name": f"trial-{trial_id}", "run.max_failures": 0})


def _report_if_complete(run_dir: Folder, epochs: int) -> bool:
    """A trial whose run ended but that Tune had not marked ended when the sweep was interrupted:
    report its last epoch's metrics again (Tune needs the metric) instead of training nothing."""
    import ray.tune

    from jobs.training.checkpoints import newest_checkpoint, read_meta

    newest = newest_checkpoint(run_dir)
    if newest is None or newest[1] < epochs:
        return False
    ray.tune.report(read_meta(newest[0])["metrics"])
    return True


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    summary: list[dict[str, Any]]
    best: dict[str, Any]
    registered_model: str | None
    interrupted: bool = False  # Ctrl-C: continue with --resume


def trial_concurrency(cfg: Config, cluster: Mapping[str, float]) -> int:
    """How many trials fit at once, each with its workers and a data share that does not starve."""
    one = plan_resources(cfg.run.workers, cluster, device=cfg.run.device)
    per_trial = one.cpus_per_worker * one.num_workers * 2  # workers plus as much again for data
    if one.use_gpu:  # one GPU per worker; fewer GPUs than run.workers: fewer workers (jobs.resources)
        return max(1, int(cluster.get("GPU", 0) // one.num_workers))
    return max(1, min(int(cluster.get("CPU", 1) // max(per_trial, 1.0)), 64))


def tune_sweep(
    cfg: Config,
    *,
    samples: int,
    max_epochs: int,
    space_overrides: Mapping[str, str] | None = None,
    grace_period: int = 1,
    reduction_factor: int = 2,
    register_as: str = "salgl",
    address: str | None = None,
    resume: str | None = None,
    metric: str = METRIC,
    search: str = DEFAULT_SEARCH,
) -> SweepOutcome:
    """Run (or continue) a sweep; returns the summary and where everything went.

    ``metric`` is what ASHA stops trials by and the best trial is chosen by (its best epoch).
    ``search`` draws the trials (``jobs.sweep.search``: seeded random, or Optuna's TPE); a resumed
    sweep continues with the searcher Tune saved.

    What the user gave is checked before Ray starts (``salgl.errors``: one line from `salgl tune`).
    """
    from ray import tune

    from jobs.sweep.progress import SweepProgress

    if resume:
        sweep_dir = sweep_folder(resume)
        init_ray(address)
        return _resume(sweep_dir, register_as)
    check_schedule(samples, max_epochs, grace_period, reduction_factor)
    check_metric(metric)
    storage = storage_root(cfg)
    name = cfg.run.name or new_run_name("sweep")
    # Everything of the sweep goes here, a shared folder or an object store (jobs.storage): Tune's
    # experiment state (scheduler and searcher included), the trials' runs and checkpoints, the summary.
    sweep_dir = Folder(storage) / name
    if sweep_dir.exists():
        raise AlreadyExists(f"sweep {name!r} exists in {storage}: continue it with `salgl tune --resume {sweep_dir}`")
    space = build_space(space_overrides or {})
    check_space(cfg, space)
    check_search(search, space)
    data_dir = resolve_data(cfg)
    tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
    base = with_overrides(cfg, {
        "optim.epochs": max_epochs, "data.path": data_dir, "run.storage": str(sweep_dir / "trials"),
        "run.tracking_uri": tracking_uri, "run.name": "",
    })
    init_ray(address)
    import ray

    concurrency = trial_concurrency(base, ray.cluster_resources())
    parent = start_run(tracking_uri, cfg.run.experiment, run_name=name, params={
        "sweep.samples": samples, "sweep.max_epochs": max_epochs, "sweep.grace_period": grace_period,
        "sweep.reduction_factor": reduction_factor, "sweep.concurrency": concurrency, "sweep.metric": metric,
        "sweep.search": search,
        "preset": cfg.run.preset,
        **{f"space.{short_key(k)}": describe_domain(v) for k, v in space.items()},
    }, tags={"salgl.sweep_dir": str(sweep_dir)})
    record = {"name": name, "tracking_uri": tracking_uri, "parent_run_id": parent, "max_epochs": max_epochs,
              "samples": samples, "expected_trials": expected_trials(space, samples), "base": to_flat(base),
              "resource_share": 1.0 / concurrency, "metric": metric, "search": search}
    sweep_dir.write_text(SWEEP_FILE, json.dumps(record, indent=1))
    headline = (f"sweep {name}: {record['expected_trials']} trials ({search} search), ASHA on {metric} over "
                f"{max_epochs} epochs, {concurrency} at a time; MLflow parent {parent}")
    tuner = tune.Tuner(
        trial_trainable(sweep_context(record)),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=samples,
            # Seeded by run.seed; saved with Tune's state, so --resume continues the same search.
            search_alg=build_searcher(search, seed=cfg.run.seed, concurrency=concurrency, samples=samples,
                                      max_epochs=max_epochs),
            scheduler=asha_scheduler(max_epochs, grace_period, reduction_factor),
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sweep_dir), verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),  # see trial_config
            # restored with the sweep by --resume
            callbacks=[SweepProgress(record["expected_trials"], max_epochs, record["base"], metric=metric)],
        ),
    )
    return _run(tuner, sweep_dir, record, register_as, headline)


def asha_scheduler(max_epochs: int, grace_period: int, reduction_factor: int) -> Any:
    """ASHA over epochs; it ranks trials by the ``TuneConfig``'s metric (``salgl tune --metric``)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace_period, reduction_factor=reduction_factor)


def _run(tuner: Any, sweep_dir: Folder, record: Mapping[str, Any], register_as: str, headline: str) -> SweepOutcome:
    """Fit and finish the sweep; from ``headline`` on, its log goes into its folder too (salgl.log;
    for a sweep in an object store, written in the local cache and copied there as the sweep ends)."""
    from jobs.training.run_folder import local_folder, upload_log

    local_dir = local_folder(sweep_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as on_exit, run_log(local_dir):
        on_exit.callback(upload_log, sweep_dir, local_dir)
        log.info(headline)
        return _finish(_fit(tuner, sweep_dir, record), sweep_dir, record, register_as)


def _fit(tuner: Any, sweep_dir: Folder, record: Mapping[str, Any]) -> Any:
    """Tune's results. When the sweep itself breaks, its MLflow parent is marked FAILED instead of
    staying RUNNING for good (Ctrl-C or SIGTERM is not a break: Tune returns, and the parent stays
    open for ``--resume``), and the message says how to continue from Tune's saved state."""
    try:
        # Tune takes SIGINT as "save state and return", SIGTERM as a hard stop: both stop signals
        # go to its SIGINT handler, so a sweep stopped by `kill` or a scheduler ends as after Ctrl-C.
        with handling(forward_to_sigint_handler):
            return tuner.fit()
    except BaseException:
        end_run(record["tracking_uri"], record["parent_run_id"], "FAILED")
        log.warning(f"sweep failed; `salgl tune --resume {sweep_dir}` continues it from its saved state")
        raise


def check_schedule(samples: int, max_epochs: int, grace_period: int, reduction_factor: int) -> None:
    """The sweep's size and ASHA's settings (Ray accepts some nonsense silently: a grace period
    past the last epoch stops nothing)."""
    if samples < 1:
        raise BadValue(f"samples must be >= 1, got {samples}")
    if max_epochs < 1:
        raise BadValue(f"max epochs must be >= 1, got {max_epochs}")
    if not 1 <= grace_period <= max_epochs:
        raise BadValue(f"the grace period must lie in 1..{max_epochs} (the max epochs), got {grace_period}")
    if reduction_factor < 2:
        raise BadValue(f"the reduction factor must be >= 2, got {reduction_factor}")


def sweep_folder(path: str) -> Folder:
    """``--resume DIR``: a sweep's folder, a path or an object-store URI (it holds the sweep record)."""
    folder = Folder(resolve_storage(path))
    if not folder.is_file(SWEEP_FILE):
        raise NotFound(f"{path} is not a sweep folder (no {SWEEP_FILE}); a sweep's folder is run.storage/<sweep name>, "
                       "printed when the sweep started")
    return folder


def sweep_context(record: Mapping[str, Any]) -> SweepContext:
    """The trials' shared context from the sweep record (``salgl_sweep.json``)."""
    return SweepContext(dict(record["base"]), record["parent_run_id"], float(record.get("resource_share", 1.0)))


def _resume(sweep_dir: Folder, register_as: str) -> SweepOutcome:
    from ray import tune

    record = json.loads(sweep_dir.read_text(SWEEP_FILE))
    tuner = tune.Tuner.restore(
        str(sweep_dir / "tune"), trainable=trial_trainable(sweep_context(record)),
        resume_unfinished=True, resume_errored=True,
    )
    headline = f"resuming sweep {record['name']} ({sweep_search(record)} search) from {sweep_dir}"
    return _run(tuner, sweep_dir, record, register_as, headline)


def _finish(results: Any, sweep_dir: Folder, record: Mapping[str, Any], register_as: str) -> SweepOutcome:
    tracking_uri, parent = record["tracking_uri"], record["parent_run_id"]
    # Tune creates trials lazily, so an early Ctrl-C leaves fewer trials than the sweep has.
    total = max(len(results), record.get("expected_trials", 0))
    metric = sweep_metric(record)
    summary = summarize(results, record["max_epochs"], record["base"], metric)
    if trials_ended(results) < total:
        # Interrupted (Ctrl-C): Tune saved its scheduler and searcher state; nothing is final yet.
        log.warning(f"sweep interrupted with {results.num_terminated} of {total} trials done; "
                    f"continue with: salgl tune --resume {sweep_dir}")
        return SweepOutcome(str(sweep_dir), parent, tracking_uri, summary, {}, None, interrupted=True)
    close_trial_runs(tracking_uri, parent, summary)
    logger = MlflowLogger(tracking_uri, parent)
    write_sweep_artifacts(summary, logger, sweep_dir)
    rank = f"best_{metric}"
    finished = [row for row in summary if row.get(rank) is not None]
    best = max(finished, key=lambda r: r[rank]) if finished else {}
    registered = None
    if best.get("best_checkpoint"):
        logger.log_metrics({key: best[key] for key in ("best_ema_mAP", rank)}, step=0)
        registered = register_checkpoint(best["best_checkpoint"], tracking_uri, parent, register_as)
    end_run(tracking_uri, parent, "FINISHED")
    log_sweep(summary, best, registered, tracking_uri, parent)
    return SweepOutcome(str(sweep_dir), parent, tracking_uri, summary, best, registered)


def trials_ended(results: Any) -> int:
    """Trials that ended (terminated or errored), less those that never reported without an error.

    On an interrupt, Tune's clean-up (after it saved the state ``--resume`` restores) also marks
    TERMINATED a trial it had only begun to start, one that never reported; counted as ended, it
    made an interrupted sweep whose last trial was starting look finished.
    """
    from ray.tune.result import TRAINING_ITERATION

    # A trial's metrics before its first report hold its id alone (Trial.last_result).
    never_reported = sum(1 for result in results if result.error is None and TRAINING_ITERATION not in result.metrics)
    return results.num_terminated + results.num_errors - never_reported


def sweep_metric(record: Mapping[str, Any]) -> str:
    """What the sweep ranks by (a sweep recorded before ``--metric`` existed ranked by EMA mAP)."""
    return str(record.get("metric", METRIC))


def sweep_search(record: Mapping[str, Any]) -> str:
    """How the sweep draws its trials (a sweep recorded before ``--search`` existed drew at random)."""
    return str(record.get("search", "random"))


def summarize(results: Any, max_epochs: int, base: Mapping[str, Any], metric: str = METRIC) -> list[dict[str, Any]]:
    """One row per trial: its values, best and last EMA mAP, its best ``metric`` (what the sweep
    ranks by), epochs run, and whether ASHA stopped it; best first."""
    from jobs.training.checkpoints import best_checkpoint_in

    rows = []
    for result in results:
        if result.config is None:  # a trial an interrupt caught before it wrote anything
            continue
        config = result.config
        flat = trial_values(base, config)
        history = result.metrics_dataframe
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        best = {key: float(history[key].max()) if history is not None and key in history else None for key in ("ema_mAP", metric)}
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        run_dir = Folder(flat["run.storage"]) / f"trial-{result.metrics.get('trial_id', '')}"
        best_ckpt = best_checkpoint_in(run_dir, metric)  # None where the trial left no checkpoint
        rows.append({
            "trial": trial_id,
            "K": int(flat["model.head.num_scenes"]),
            "lambda": float(flat["loss.entropy_weight"]),
            "T": int(flat["model.head.steps"]),
            **{k: v for k, v in config.items() if k not in ("model.head.num_scenes", "loss.entropy_weight", "model.head.steps")},
            "epochs": epochs,
            "stopped_early": bool(result.error is None and 0 < epochs < max_epochs),
            "error": str(result.error)[:200] if result.error else None,
            "best_ema_mAP": best["ema_mAP"],
            f"best_{metric}": best[metric],
            "last_ema_mAP": result.metrics.get("ema_mAP"),
            "scene_entropy": result.metrics.get("ema_scene_entropy"),
            "best_checkpoint": best_ckpt,
        })
    rank = f"best_{metric}"
    return sorted(rows, key=lambda r: (r[rank] is None, -(r[rank] or 0)))


def close_trial_runs(tracking_uri: str, parent: str, summary: list[dict[str, Any]]) -> None:
    """Every trial Tune ended without an error ends FINISHED in MLflow, with its artifacts.

    A trial that completes records its artifacts itself (``jobs.training.driver.train``). One that
    Tune ends (ASHA stopping it early, or stopping it on its last report because it reached
    ``max_t``) has its process ended mid-way: its run is left RUNNING, or marked KILLED or FAILED
    by ``train`` depending on where the stop landed, and without its scene pictures. Here its
    artifacts are recorded from its run folder's best checkpoint (as for a completed run), an
    early stop is tagged ``salgl.stopped_by=asha`` with ``salgl.stopped_at_epoch`` (the rung), and
    the run is FINISHED. Trials Tune records with an error stay FAILED.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_trial = {row["trial"]: row for row in summary}
    for child in children:
        row = by_trial.get(child.data.params.get("trial_id", ""))
        if row is None or row.get("error"):
            continue
        run_id = child.info.run_id
        client.set_tag(run_id, "asha.stopped_early", str(row["stopped_early"]).lower())
        client.set_tag(run_id, "asha.epochs", str(row["epochs"]))
        if row["stopped_early"]:
            client.set_tag(run_id, "salgl.stopped_by", "asha")
            client.set_tag(run_id, "salgl.stopped_at_epoch", str(row["epochs"]))
        if child.info.status != "FINISHED":
            try:
                record_stopped_trial(child.data.tags.get("salgl.run_dir"))
            except Exception as err:  # pictures missing must not leave the sweep's parent RUNNING
                log.warning(f"trial {row['trial']}: its artifacts could not be recorded: {err}")
            end_run(tracking_uri, run_id, "FINISHED")


def record_stopped_trial(run_dir: str | None) -> None:
    """A trial Tune ended: its artifacts from its run folder's best checkpoint, as ``train``
    records them for a trial that completes (weights only; no MLflow model). Nothing where no run
    folder is left."""
    from jobs.storage import Folder
    from jobs.training.final_artifacts import record_final_artifacts
    from jobs.training.outcome import recorded_outcome

    found = recorded_outcome(Folder(run_dir)) if run_dir else None
    if found is None:
        return
    outcome, cfg = found
    record_final_artifacts(outcome, cfg, log_model=False, weights_only=True)


def write_sweep_artifacts(summary: list[dict[str, Any]], logger: MlflowLogger, sweep_dir: Folder) -> None:
    """Summary table (CSV, JSON) and plots of best mAP and scene entropy against K: on the parent
    run in MLflow, and in the sweep's folder (``summary/``) beside Tune's state."""
    import csv

    from jobs.artifacts import write_metric_by_k

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        keys = sorted({k for row in summary for k in row}, key=lambda k: (k not in _COLUMNS, _COLUMNS.index(k) if k in _COLUMNS else 0, k))
        with open(folder / "summary.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(summary)
        write_metric_by_k(summary, "best_ema_mAP", folder / "best_map_vs_K.png", ylabel="best EMA mAP (%)")
        write_metric_by_k(summary, "scene_entropy", folder / "scene_entropy_vs_K.png", ylabel="scene entropy (nats)", reference=math.log)
        stopped = [{"trial": r["trial"], "stopped_after_epoch": r["epochs"]} for r in summary if r["stopped_early"]]
        (folder / "asha_stopped.json").write_text(json.dumps(stopped, indent=1))
        logger.log_artifacts(str(folder), "sweep")
        for path in sorted(folder.iterdir()):
            sweep_dir.upload(f"{SUMMARY_FOLDER}/{path.name}", path)


_COLUMNS = ["trial", "K", "lambda", "T", "epochs", "stopped_early", "best_ema_mAP", "last_ema_mAP", "scene_entropy"]


def register_checkpoint(checkpoint: str, tracking_uri: str, run_id: str, name: str) -> str:
    """Log a checkpoint's EMA model on ``run_id`` and register it; returns ``models:/name/version``."""
    import mlflow

    from jobs.inference.pyfunc import log_checkpoint_model

    with local_copy(checkpoint) as folder:  # a checkpoint in an object store is read from a local copy
        model_uri = log_checkpoint_model(str(folder), tracking_uri, run_id, artifact_name="best_model")
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name)
    return f"models:/{name}/{version.version}"


def log_sweep(summary: list[dict[str, Any]], best: Mapping[str, Any], registered: str | None, tracking_uri: str, parent: str) -> None:
    log.info("trial                 K   lambda     T  epochs  stopped  best EMA mAP  scene entropy")
    for row in summary:
        best_map = f"{row['best_ema_mAP']:.2f}" if row["best_ema_mAP"] is not None else "-"
        entropy = f"{row['scene_entropy']:.3f}" if row.get("scene_entropy") is not None else "-"
        log.info(f"{row['trial']:<20} {row['K']:>2} {row['lambda']:>8.3g} {row['T']:>5} {row['epochs']:>7} "
                 f"{'yes' if row['stopped_early'] else 'no':>8} {best_map:>13} {entropy:>14}")
    if best:
        log.info(f"best: trial {best['trial']} (K={best['K']}, lambda={best['lambda']:.3g}, T={best['T']}), "
                 f"checkpoint {best.get('best_checkpoint')}")
    if registered:
        log.info(f"registered: {registered}")
    log.info("MLflow: " + run_page(tracking_uri, parent))
