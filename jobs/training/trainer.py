"""Ray Train's trainer for a run, built from the run's parts (its config, dataset facts, folder,
MLflow run, resources and label mixture), and its ``fit`` with the MLflow run ended on the way out.

The per-worker loop is ``jobs.training.recipe``; what each worker is handed, ``WorkerSpec``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from jobs.logs import LOG_FILE, console_level
from jobs.resources import ResourcePlan, scaling_workers
from jobs.storage import Folder
from jobs.tracking import end_run
from jobs.training.dataset import DatasetFacts
from jobs.training.epoch_report import make_epoch_reporter, make_tracking_warmup, wants_progress_bar
from jobs.training.progress import STATUS_FILE, ProgressBar
from jobs.training.ray_setup import controller_env_defaults, quiet_ray_data
from jobs.training.worker_watch import make_worker_watch
from jobs.training.run_folder import local_folder
from salgl.config import Config, to_flat
from salgl.errors import Interrupted


def train_worker(spec_dict: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker (``jobs.training.recipe.train_loop_per_worker``).

    Train pickles this function by reference and its controller unpickles it, so it lives in this
    light module: referring to ``jobs.training.recipe`` directly would make every run's controller
    import torch and timm (seconds of CPU on a small machine, in a process that never trains).
    """
    from jobs.training.recipe import train_loop_per_worker

    train_loop_per_worker(spec_dict)


def data_task_request(plan: ResourcePlan, *, elastic: bool) -> tuple[float, int | None]:
    """(CPUs each decode task asks for, cap on concurrent tasks) of a run's data streams.

    An elastic run restarts with as many workers as the nodes left can hold by their CPUs, which
    on CPU nodes can be every CPU of them: decode tasks that asked for CPUs would then never be
    scheduled and the run would wait forever (Ray Data: "Cluster resources are not enough to run
    any task"). Its tasks ask for none, and as many run at once as the plan's data CPUs hold.
    """
    if not elastic:
        return plan.data_task_cpus, None
    return 0.0, max(1, int(plan.data_cpus / plan.data_task_cpus))


def build_trainer(
    cfg: Config,
    *,
    dataset: DatasetFacts,
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

    vocabulary = list(dataset.vocabulary)
    embeddings = label_embeddings(vocabulary, cfg.model.labels)
    spec = WorkerSpec(
        config=to_flat(cfg),
        vocabulary=vocabulary,
        label_embeddings=embeddings.tolist(),
        train_rows=dataset.train_rows,
        threads=plan.torch_threads,
        run_dir=str(run_dir),
        local_dir=str(local_folder(run_dir)),
        scene_mixture={"prior": scene_mixture["prior"], "theta": scene_mixture["theta"]} if scene_mixture else None,
        log_level=logging.WARNING if quiet else console_level(),
        progress_bar=wants_progress_bar(quiet),
    )
    data_dir, manifest = dataset.location, dict(dataset.manifest)  # the streams run in the controller: no re-read there
    workers = scaling_workers(cfg.run.min_workers, plan.num_workers, cfg.optim.batch_size)  # (min, max): elastic
    task_cpus, task_limit = data_task_request(plan, elastic=isinstance(workers, tuple))

    def train_stream() -> Any:
        # Ray Train calls this each time it (re)starts the worker group: the stream continues from
        # the epoch of the checkpoint the workers restore (both: newest_checkpoint(run_dir)), with
        # that epoch's seeds.
        from jobs.training.checkpoints import latest_epoch

        quiet_ray_data()
        return train_dataset(
            data_dir, cfg.data, seed=cfg.run.seed, start_epoch=latest_epoch(run_dir), num_cpus=task_cpus,
            concurrency=task_limit, manifest=manifest,
        )

    def test_stream() -> Any:
        quiet_ray_data()
        return eval_dataset(data_dir, cfg.data, num_workers=plan.num_workers, num_cpus=task_cpus, concurrency=task_limit,
                            manifest=manifest)

    datasets = {"train": train_stream, "test": test_stream}
    log_file = str(local_folder(run_dir) / LOG_FILE)
    return InterruptibleTorchTrainer(
        train_worker,
        train_loop_config=spec.__dict__,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=plan.use_gpu, resources_per_worker={"CPU": plan.cpus_per_worker},
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
                    tracking_uri, mlflow_run_id, cfg.optim.epochs, quiet=quiet, log_file=log_file, run_dir=str(run_dir),
                ),
                # A worker or node lost, and the size the group runs at again (said in the run's log).
                make_worker_watch(workers, max_failures=cfg.run.max_failures, level=logging.WARNING if quiet else console_level(),
                                  log_file=log_file),
                *callbacks,
            ],
            # Train's INFO lines repeat every report's metrics dict per rank; ours is one line an epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=data_config(cpu=plan.data_cpus),
    )


def fit(trainer: Any, *, run_name: str, run_dir: Folder, local_dir: Path, tracking_uri: str, run_id: str, quiet: bool) -> Any:
    """``trainer.fit()`` (behind a progress bar on a terminal); a run that stops early ends its
    MLflow run KILLED or FAILED before the exception goes on."""
    controller_env_defaults()
    try:
        with ProgressBar(local_dir / STATUS_FILE) if wants_progress_bar(quiet) else contextlib.nullcontext():
            return trainer.fit()
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
