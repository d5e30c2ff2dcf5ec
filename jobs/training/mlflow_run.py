"""A run's MLflow run: opened with the resolved config, what the run got and its dataset as input."""

from __future__ import annotations

from typing import Any, Mapping

from jobs.resources import ResourcePlan
from jobs.storage import Folder
from jobs.tracking import log_dataset, start_run
from jobs.training.dataset import DatasetFacts
from jobs.training.ray_setup import plan_params
from salgl.config import SCHEMA_VERSION, Config, short_params, to_flat


def open_mlflow_run(
    cfg: Config, plan: ResourcePlan, run_dir: Folder, tracking_uri: str, dataset: DatasetFacts, *, run_name: str,
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
    log_dataset(tracking_uri, run_id, dataset.location, manifest=dataset.manifest)
    return run_id
