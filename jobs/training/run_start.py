"""A run's start: a new run folder, or a resumed one (``jobs.training.resume`` for a run that
moved), with its dataset read, Ray up, its resources planned and its MLflow run open.

Each step can fail in one clear line before the run exists (a missing dataset, a device the
cluster lacks), so the order here is part of the behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from jobs.resources import ResourcePlan
from jobs.storage import Folder
from jobs.tracking import MlflowLogger, resolve_tracking_uri
from jobs.training.dataset import DatasetFacts, read_dataset, resolve_data
from jobs.training.mlflow_run import open_mlflow_run
from jobs.training.ray_setup import init_ray, plan_params, run_plan
from jobs.training.run_folder import find_run, new_run_name, read_run_file, write_run_file
from salgl.config import SCHEMA_VERSION, Config, from_stored, to_flat, with_overrides
from salgl.errors import AlreadyExists


@dataclass(frozen=True)
class StartedRun:
    """The built parts of a run that ``train`` hands on."""

    cfg: Config  # resolved: run.name and data.path set
    run_name: str
    run_dir: Folder
    storage: str  # the folder Ray Train keeps the run in (the run folder's parent)
    dataset: DatasetFacts
    tracking_uri: str
    mlflow_run_id: str
    plan: ResourcePlan
    resumed: bool
    notes: tuple[str, ...] = ()  # warnings said once the run's log is open


@dataclass(frozen=True)
class MlflowNaming:
    """How a sweep nests a run's MLflow run (all None / empty for ``salgl train``)."""

    run_name: str | None = None
    parent_run_id: str | None = None
    extra_params: Mapping[str, Any] | None = None


def start_new_run(cfg: Config, storage: str, *, address: str | None, resource_share: float, naming: MlflowNaming) -> StartedRun:
    """A new run folder under ``storage`` with its record (``salgl_run.json``) and MLflow run."""
    run_name = cfg.run.name or new_run_name()
    run_dir = Folder(storage) / run_name
    if run_dir.exists():
        raise AlreadyExists(
            f"run {run_name!r} already exists in {storage}: Ray would silently resume it. "
            f"Use `salgl train --resume {run_name}` to continue it, or another run.name"
        )
    data_dir = resolve_data(cfg)
    dataset = read_dataset(data_dir)  # the one read of the manifest for this run
    tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
    cfg = with_overrides(cfg, {"run.name": run_name, "data.path": data_dir})
    init_ray(address)
    plan = run_plan(cfg, resource_share)  # a device the cluster lacks fails before the run exists
    run_id = open_mlflow_run(
        cfg, plan, run_dir, tracking_uri, dataset, run_name=naming.run_name or run_name,
        parent_run_id=naming.parent_run_id, extra_params=naming.extra_params,
    )
    write_run_file(run_dir, {
        "run_name": run_name, "data_dir": data_dir, "data_digest": dataset.digest,
        "config": to_flat(cfg), "tracking_uri": tracking_uri, "mlflow_run_id": run_id, "schema_version": SCHEMA_VERSION,
    })
    return StartedRun(cfg, run_name, run_dir, storage, dataset, tracking_uri, run_id, plan, resumed=False)


def resume_run(
    resume: str, storage: str, cfg: Config, *, overrides: Mapping[str, Any] | None, address: str | None,
    resource_share: float, naming: MlflowNaming,
) -> StartedRun:
    """``--resume``: the run folder, its config as the version that wrote it with ``overrides``
    applied, its dataset (or a moved copy) and its MLflow run (or a new one where the tracking
    store does not hold it); the record is rewritten where any of them moved."""
    from jobs.training.checkpoints import DIVERGED_FILE
    from jobs.training.resume import RESUMED_FROM_TAG, held_run, moved_record, resumed_data_dir, resumed_tracking_uri
    from pipeline.shards import verify_shards

    run_dir = find_run(resume, storage)
    record = read_run_file(run_dir)
    base = from_stored(record["config"], record.get("schema_version"))  # as the version that wrote it
    # A resumed run goes to the end of its schedule unless told to stop again.
    cfg = with_overrides(base, {"run.stop_after_epoch": 0, **(overrides or {})})
    run_name = record["run_name"]
    data_dir = resumed_data_dir(record, base, cfg)  # or a moved copy of it (jobs.training.resume)
    cfg = with_overrides(cfg, {"data.path": data_dir})
    verify_shards(data_dir)  # pipeline.shards: the data may have changed since the run began
    dataset = read_dataset(data_dir)  # the one read of the manifest for this run
    init_ray(address)
    plan = run_plan(cfg, resource_share)
    run_dir.delete(DIVERGED_FILE)  # continuing from the last good checkpoint
    tracking_uri, run_id = resumed_tracking_uri(record, base, cfg), record["mlflow_run_id"]
    notes = []
    if held_run(tracking_uri, run_id):
        # The hardware may differ now, and the data folder (a moved copy).
        MlflowLogger(tracking_uri, run_id).log_params({**plan_params(plan), "data.path": data_dir})
    else:  # the run folder was copied, or the tracking server moved
        run_id = open_mlflow_run(
            cfg, plan, run_dir, tracking_uri, dataset, run_name=naming.run_name or run_name,
            parent_run_id=naming.parent_run_id, extra_params=naming.extra_params, tags={RESUMED_FROM_TAG: record["mlflow_run_id"]},
        )
        notes.append(f"MLflow run {record['mlflow_run_id']} is not in {tracking_uri}: continuing under a new "
                     f"MLflow run {run_id} (tag {RESUMED_FROM_TAG})")
    moved = moved_record(record, data_dir=data_dir, data_digest=dataset.digest, tracking_uri=tracking_uri, mlflow_run_id=run_id)
    if moved != record:
        write_run_file(run_dir, moved)
    parent = run_dir.location.rsplit("/", 1)[0]
    return StartedRun(cfg, run_name, run_dir, parent, dataset, tracking_uri, run_id, plan, resumed=True, notes=tuple(notes))
