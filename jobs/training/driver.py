"""Driver side of ``salgl train``: data, Ray, resources, MLflow run, TorchTrainer, final artifacts.

Small functions, each one job; the per-worker loop is ``jobs.training.recipe``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from salgl.errors import AlreadyExists, Failed, Interrupted, NotFound
from jobs.logs import LOG_FILE, configure_worker_logging, console_level, run_log
from jobs.resources import WORKER_ALLOCATOR_ENV, ResourcePlan, check_precision, plan_resources
from jobs.training.progress import STATUS_FILE, ProgressBar
from jobs.tracking import BestSoFar, MlflowLogger, end_run, log_dataset, resolve_tracking_uri, run_page, start_run
from jobs.storage import Folder, local_copy, resolve_storage
from jobs.stop_signals import sigterm_handler_kept
from jobs.training.scene_mixture import run_mixture
from salgl.config import SCHEMA_VERSION, Config, from_stored, short_params, to_flat, with_overrides

log = logging.getLogger(__name__)

RUN_FILE = "salgl_run.json"
DEFAULT_DATA = "data/mosaic"


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


# ---------------------------------------------------------------------------------------------
# Data


def resolve_data(cfg: Config, *, prepare_default: bool = True) -> str:
    """The dataset folder, or object-store URI; the built-in mosaic data is prepared on first use."""
    from pipeline.shards import check_bucket, dataset_location, has_manifest, is_remote, verify_shards

    path = dataset_location(cfg.data.path or DEFAULT_DATA)
    if not has_manifest(path):
        if is_remote(path):
            check_bucket(path)  # a bucket that does not exist is said as such
        if cfg.data.path and cfg.data.path != DEFAULT_DATA:
            raise NotFound(
                f"data.path={cfg.data.path!r} holds no manifest.json: prepare it first, for example "
                f"`salgl prepare voc2007 VOCdevkit/VOC2007 --out {cfg.data.path}`"
            )
        if not prepare_default:
            raise NotFound(f"no dataset at {path}")
        from pipeline.mosaic import convert_mosaic

        log.info(f"preparing the built-in mosaic dataset at {path} (first use)")
        convert_mosaic(path)
    verify_shards(path)  # a truncated, missing or altered shard fails here, named, before Ray starts
    return path


def dataset_facts(data_dir: str) -> tuple[list[str], int]:
    from pipeline.shards import read_manifest

    manifest = read_manifest(data_dir)
    return list(manifest["vocabulary"]), int(manifest["splits"]["train"]["rows"])


# ---------------------------------------------------------------------------------------------
# Runs on disk


def new_run_name(prefix: str = "salgl") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def storage_root(cfg: Config) -> str:
    """``run.storage`` as Ray Train gets it: an absolute path (Ray workers run with another working
    directory) or an object-store URI (``jobs.storage``)."""
    return resolve_storage(cfg.run.storage)


def write_run_file(run_dir: Folder, record: Mapping[str, Any]) -> None:
    run_dir.write_text(RUN_FILE, json.dumps(record, indent=1))


def find_run(run: str, storage: str) -> Folder:
    """``--resume RUN``: a run name under the storage folder, or a run folder (a path or URI)."""
    for candidate in (Folder(resolve_storage(run)), Folder(storage) / run):
        if candidate.is_file(RUN_FILE):
            return candidate
    raise NotFound(f"no salgl run named {run!r} (looked for {RUN_FILE} in {run} and {Folder(storage) / run})")


def local_folder(run_dir: Folder) -> Path:
    """Where a run's log and progress file are written while it runs: its own folder, or for a run
    in an object store (which cannot append) a folder of the same name in the local cache; the log
    is copied to the run folder as the run ends (``upload_log``)."""
    if not run_dir.remote:
        return run_dir.local_path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    scheme, path = run_dir.location.split("://", 1)
    return cache / "salgl" / "runs" / scheme / path


def upload_log(run_dir: Folder, local_dir: Path) -> None:
    if run_dir.remote and (local_dir / LOG_FILE).is_file():
        try:
            run_dir.upload(LOG_FILE, local_dir / LOG_FILE)
        except OSError as err:  # the run's own outcome matters more than its log's copy
            log.warning(f"could not copy {local_dir / LOG_FILE} to {run_dir}: {err}")


# ---------------------------------------------------------------------------------------------
# Ray


def quiet_ray_data() -> None:
    """One line per epoch is the progress report; Ray Data's per-operator bars would bury it.

    A dataset keeps the ``DataContext`` of the process that builds it: call this there (the driver,
    and the Train controller, which calls the dataset factories of ``build_trainer``).
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def local_instance_env() -> None:
    """Defaults for a Ray instance this process starts (its raylet reads them once, at start; a
    value the user exported wins).

    Ray keeps at most ``num_workers_soft_limit`` worker processes (default: the CPU count) and kills
    idle ones beyond it after a second. One Train run alone has about ten actor processes
    (controller, workers, split coordinators, dataset manager, placement-group cleaner, ...), so on
    2 CPUs the data-task processes, which have imported torch and timm, would be killed between a
    sweep's trials, and each trial's first batch would wait seconds for a new one to import them
    again.

    Ray Train starts a preemption watcher actor with every run, to act on a cluster's node being
    drained (spot instances). A local instance has no nodes to drain, so it is switched off there:
    one process fewer to start per run and per sweep trial.

    The raylet started here, and so every worker, trial and controller process, inherits this
    environment, the allocator settings of ``WORKER_ALLOCATOR_ENV`` included (this process has read
    its own already). On a cluster, ``salgl submit`` passes them in the job's runtime env, and the
    project's image (cluster/Dockerfile) sets them for every process.
    """
    os.environ.setdefault("RAY_num_workers_soft_limit", str(4 * (os.cpu_count() or 1) + 16))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for key, value in WORKER_ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local instance."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        local_instance_env()
    with sigterm_handler_kept():
        ray.init(address=address, log_to_driver=True, configure_logging=False)


# Ray Train's controller polls each worker for its next report every this many seconds (Ray's
# default 2). A worker's report queue holds one report, so an epoch shorter than the interval waits
# for the poll, and the last report waits for it again after training ends: with 2 s, a short
# run would spend seconds between its last step and ``fit()`` returning. A poll is one
# small actor call per worker. Ray propagates the variable from the process that calls ``fit()``
# to the controller; a value the user exported wins.
CONTROLLER_POLL_S = "0.2"


def controller_env_defaults() -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)


def cluster_plan(workers: int, share: float = 1.0, *, device: str = "auto") -> ResourcePlan:
    import ray

    return plan_resources(workers, {k: v * share for k, v in ray.cluster_resources().items()}, device=device)


def run_plan(cfg: Config, share: float = 1.0) -> ResourcePlan:
    """Workers, CPUs and devices for this run, from the cluster (``jobs.resources``); a device or
    precision the cluster cannot give fails here, before the run starts (``salgl.errors``)."""
    plan = cluster_plan(cfg.run.workers, share, device=cfg.run.device)
    check_precision(cfg.optim.precision, use_gpu=plan.use_gpu)
    return plan


def plan_params(plan: ResourcePlan) -> dict[str, Any]:
    """What the run got, beside what it asked for (``run.device``, ``run.workers``): MLflow params."""
    return {"resources.device": plan.device, "resources.workers": plan.num_workers,
            "resources.gpus_per_worker": plan.gpus_per_worker, "resources.cpus_per_worker": plan.cpus_per_worker}


def start_line(run_name: str, cfg: Config, plan: ResourcePlan) -> str:
    """The run's first line: where it runs and in what precision (and where its data and checkpoints are)."""
    gpus = f" ({plan.gpus_per_worker} GPU each)" if plan.use_gpu else ""
    options = "".join(f", {name}" for name, on in (("channels_last", cfg.run.channels_last), ("compiled backbone", cfg.run.compile)) if on)
    workers = f"{plan.num_workers} worker{'s' if plan.num_workers != 1 else ''}"
    return f"run {run_name}: {workers} on {plan.device}{gpus}, precision {cfg.optim.precision}{options}"


# ---------------------------------------------------------------------------------------------
# Progress and tracking on the controller


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

    return EpochReporter()


# ---------------------------------------------------------------------------------------------
# The trainer


def train_worker(spec_dict: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker (``jobs.training.recipe.train_loop_per_worker``).

    Train pickles this function by reference and its controller unpickles it, so it lives in this
    light module: referring to ``jobs.training.recipe`` directly would make every run's controller
    import torch and timm (seconds of CPU on a small machine, in a process that never trains).
    """
    from jobs.training.recipe import train_loop_per_worker

    train_loop_per_worker(spec_dict)


def build_trainer(
    cfg: Config,
    *,
    data_dir: str,
    run_dir: Folder,
    run_name: str,
    storage: str,
    tracking_uri: str,
    mlflow_run_id: str,
    plan: ResourcePlan,
    callbacks: Sequence[Any] = (),
    quiet: bool = False,
    scene_mixture: Mapping[str, Any] | None = None,
):
    """Ray Train's trainer for a run; ``scene_mixture`` is the run's label mixture
    (``jobs.training.scene_mixture.run_mixture``), which new workers load."""
    import ray.train

    from jobs.training.interrupt import InterruptibleTorchTrainer
    from jobs.training.worker_spec import WorkerSpec
    from pipeline.ingest import data_config, eval_dataset, train_dataset
    from salgl.label_embeddings import label_embeddings

    vocabulary, train_rows = dataset_facts(data_dir)
    embeddings = label_embeddings(vocabulary, cfg.model.labels)
    spec = WorkerSpec(
        config=to_flat(cfg),
        vocabulary=vocabulary,
        label_embeddings=embeddings.tolist(),
        train_rows=train_rows,
        threads=plan.torch_threads,
        run_dir=str(run_dir),
        local_dir=str(local_folder(run_dir)),
        scene_mixture={"prior": scene_mixture["prior"], "theta": scene_mixture["theta"]} if scene_mixture else None,
        log_level=logging.WARNING if quiet else console_level(),
        progress_bar=wants_progress_bar(quiet),
    )

    def train_stream() -> Any:
        # Ray Train calls this each time it (re)starts the worker group: the stream continues from
        # the epoch of the checkpoint the workers restore (both: newest_checkpoint(run_dir)), with
        # that epoch's seeds.
        from jobs.training.checkpoints import latest_epoch

        quiet_ray_data()
        return train_dataset(
            data_dir, cfg.data, seed=cfg.run.seed, start_epoch=latest_epoch(run_dir), num_cpus=plan.data_task_cpus
        )

    def test_stream() -> Any:
        quiet_ray_data()
        return eval_dataset(data_dir, cfg.data, num_workers=plan.num_workers, num_cpus=plan.data_task_cpus)

    datasets = {"train": train_stream, "test": test_stream}
    return InterruptibleTorchTrainer(
        train_worker,
        train_loop_config=spec.__dict__,
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker={"CPU": plan.cpus_per_worker},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="ema_mAP",
                checkpoint_score_order="max",
            ),
            callbacks=[
                make_tracking_warmup(tracking_uri, mlflow_run_id),
                make_epoch_reporter(
                    tracking_uri, mlflow_run_id, cfg.optim.epochs, quiet=quiet, log_file=str(local_folder(run_dir) / LOG_FILE),
                    run_dir=str(run_dir),
                ),
                *callbacks,
            ],
            # Train's INFO lines repeat every report's metrics dict per rank; ours is one line an epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=data_config(cpu=plan.data_cpus),
    )


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
    from jobs.training.checkpoints import DIVERGED_FILE, set_aside_damaged
    from jobs.training.resume import RESUMED_FROM_TAG, held_run, moved_record, resumed_data_dir, resumed_tracking_uri
    from pipeline.shards import read_manifest, shards_digest, verify_shards

    storage = storage_root(cfg)
    notes: list[str] = []  # said once the run's log is open
    if resume:
        run_dir = find_run(resume, storage)
        record = json.loads(run_dir.read_text(RUN_FILE))
        base = from_stored(record["config"], record.get("schema_version"))  # as the version that wrote it
        # A resumed run goes to the end of its schedule unless told to stop again.
        cfg = with_overrides(base, {"run.stop_after_epoch": 0, **(overrides or {})})
        run_name = record["run_name"]
        data_dir = resumed_data_dir(record, base, cfg)  # or a moved copy of it (jobs.training.resume)
        cfg = with_overrides(cfg, {"data.path": data_dir})
        verify_shards(data_dir)  # pipeline.shards: the data may have changed since the run began
        init_ray(address)
        plan = run_plan(cfg, resource_share)
        run_dir.delete(DIVERGED_FILE)  # continuing from the last good checkpoint
        tracking_uri, run_id = resumed_tracking_uri(record, base, cfg), record["mlflow_run_id"]
        storage = run_dir.location.rsplit("/", 1)[0]
        if held_run(tracking_uri, run_id):
            # The hardware may differ now, and the data folder (a moved copy).
            MlflowLogger(tracking_uri, run_id).log_params({**plan_params(plan), "data.path": data_dir})
        else:  # the run folder was copied, or the tracking server moved
            run_id = open_mlflow_run(
                cfg, plan, run_dir, tracking_uri, data_dir, run_name=mlflow_run_name or run_name,
                parent_run_id=parent_run_id, extra_params=extra_params, tags={RESUMED_FROM_TAG: record["mlflow_run_id"]},
            )
            notes.append(f"MLflow run {record['mlflow_run_id']} is not in {tracking_uri}: continuing under a new "
                         f"MLflow run {run_id} (tag {RESUMED_FROM_TAG})")
        moved = moved_record(record, data_dir=data_dir, tracking_uri=tracking_uri, mlflow_run_id=run_id)
        if moved != record:
            write_run_file(run_dir, moved)
    else:
        run_name = cfg.run.name or new_run_name()
        run_dir = Folder(storage) / run_name
        if run_dir.exists():
            raise AlreadyExists(
                f"run {run_name!r} already exists in {storage}: Ray would silently resume it. "
                f"Use `salgl train --resume {run_name}` to continue it, or another run.name"
            )
        data_dir = resolve_data(cfg)
        tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
        cfg = with_overrides(cfg, {"run.name": run_name, "data.path": data_dir})
        init_ray(address)
        plan = run_plan(cfg, resource_share)  # a device the cluster lacks fails before the run exists
        run_id = open_mlflow_run(
            cfg, plan, run_dir, tracking_uri, data_dir, run_name=mlflow_run_name or run_name,
            parent_run_id=parent_run_id, extra_params=extra_params,
        )
        write_run_file(run_dir, {
            "run_name": run_name, "data_dir": data_dir, "data_digest": shards_digest(read_manifest(data_dir)),
            "config": to_flat(cfg), "tracking_uri": tracking_uri, "mlflow_run_id": run_id, "schema_version": SCHEMA_VERSION,
        })
    local_dir = local_folder(run_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    # salgl.log (the controller and workers append theirs), copied to an object-store run folder at the end
    with contextlib.ExitStack() as on_exit, run_log(local_dir):
        on_exit.callback(upload_log, run_dir, local_dir)
        for line in notes:
            log.warning(line)
        if resume:
            for line in set_aside_damaged(run_dir):
                log.warning(line)
        mixture = run_mixture(run_dir, data_dir, cfg, MlflowLogger(tracking_uri, run_id))  # once per run
        trainer = build_trainer(
            cfg, data_dir=data_dir, run_dir=run_dir, run_name=run_name, storage=storage,
            tracking_uri=tracking_uri, mlflow_run_id=run_id, plan=plan, callbacks=callbacks, quiet=quiet,
            scene_mixture=mixture,
        )
        log.info(f"{start_line(run_name, cfg, plan)}; data {data_dir}, checkpoints in {run_dir}")
        if plan.note:
            log.warning(plan.note)
        controller_env_defaults()
        try:
            with ProgressBar(local_dir / STATUS_FILE) if wants_progress_bar(quiet) else contextlib.nullcontext():
                result = trainer.fit()
        except KeyboardInterrupt:  # Ctrl-C (jobs.training.interrupt): the checkpoints so far are kept
            end_run(tracking_uri, run_id, "KILLED")
            raise Interrupted(f"interrupted; run {run_name} stopped. Continue it with: salgl train --resume {run_dir}") from None
        except SystemExit as stop:
            # Tune ending a trial that ASHA stops: sys.exit(0) from inside its report call.
            end_run(tracking_uri, run_id, "KILLED" if stop.code in (0, None) else "FAILED")
            raise
        except BaseException:
            end_run(tracking_uri, run_id, "FAILED")
            raise
        check_not_diverged(run_dir, tracking_uri, run_id)
        outcome = _outcome(result, cfg, run_name, run_dir, run_id, tracking_uri)
        if outcome.metrics.get("epoch") != (result.metrics or {}).get("epoch"):
            # The newest epoch's report was cut off (a stop right after its checkpoint): log it now.
            best = BestSoFar.from_run_dir(str(run_dir)).update({})
            MlflowLogger(tracking_uri, run_id).log_metrics({**outcome.metrics, **best}, step=int(outcome.metrics.get("epoch", 0)))
        finished = outcome.metrics.get("epoch") == cfg.optim.epochs
        record_final_artifacts(outcome, cfg, log_model=log_model and finished, weights_only=weights_only)
        end_run(tracking_uri, run_id, "FINISHED" if finished else "KILLED")
        if not quiet:
            log_summary(outcome, finished)
        return outcome


def open_mlflow_run(
    cfg: Config, plan: ResourcePlan, run_dir: Folder, tracking_uri: str, data_dir: str, *, run_name: str,
    parent_run_id: str | None = None, extra_params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
) -> str:
    """A new MLflow run for the run folder ``run_dir``: the resolved config and what the run got as
    params, its dataset as input; returns its id."""
    run_id = start_run(
        tracking_uri,
        cfg.run.experiment,
        run_name=run_name,
        params={
            **to_flat(cfg), **short_params(to_flat(cfg)), **plan_params(plan), "schema_version": SCHEMA_VERSION,
            **(extra_params or {}),
        },
        tags={"salgl.run_dir": str(run_dir), **(tags or {})},
        parent_run_id=parent_run_id,
    )
    log_dataset(tracking_uri, run_id, data_dir)
    return run_id


def wants_progress_bar(quiet: bool) -> bool:
    """A bar in place of the in-epoch lines: on a terminal, at the default verbosity or above."""
    return not quiet and sys.stderr.isatty() and console_level() <= logging.INFO


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


def _outcome(result: Any, cfg: Config, run_name: str, run_dir: Folder, run_id: str, tracking_uri: str) -> TrainOutcome:
    """The run's newest and best checkpoints, read from its folder (their meta.json), as a resumed
    run starts from them: Ray's ``Result`` misses a report that a stop cut off after its checkpoint
    was written (a run stopped just after its last epoch would otherwise count as unfinished)."""
    return outcome_in(run_dir, run_name, run_id, tracking_uri, fallback=dict(result.metrics or {}))


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
    record = json.loads(run_dir.read_text(RUN_FILE))
    outcome = outcome_in(run_dir, record["run_name"], record["mlflow_run_id"], record["tracking_uri"])
    return outcome, from_stored(record["config"], record.get("schema_version"))


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


def log_summary(outcome: TrainOutcome, finished: bool) -> None:
    m = outcome.best_metrics or outcome.metrics
    keys = ["ema_mAP", "mAP", "ema_CF1", "ema_OF1", "ema_scene_entropy"]
    log.info(("finished" if finished else f"stopped after epoch {outcome.metrics.get('epoch')}") + f": run {outcome.run_name}")
    log.info("best checkpoint: " + (outcome.best_checkpoint or "none"))
    log.info("  ".join(f"{k} {m[k]:.2f}" for k in keys if isinstance(m.get(k), (int, float))))
    log.info("MLflow: " + run_page(outcome.tracking_uri, outcome.mlflow_run_id))
    if not finished:
        log.info(f"continue with: salgl train --resume {outcome.run_name}")

