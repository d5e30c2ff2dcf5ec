"""``salgl train --resume`` of a run folder that moved (copied to another machine, its tracking
server moved): its record may name a data folder and an MLflow run that are not there any more.

- ``data.path=NEW`` is taken when NEW holds the run's dataset shard for shard (its manifest's
  sha256s give the digest the run recorded) and refused in one line otherwise;
- an MLflow run the tracking store does not hold is continued under a new one, tagged with the old
  id (``RESUMED_FROM_TAG``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

from salgl.config import Config
from salgl.errors import BadValue, NotFound

RESUMED_FROM_TAG = "salgl.resumed_from_mlflow_run"


def recorded_digest(record: Mapping[str, Any]) -> str | None:
    """The digest of the run's shard checksums (``pipeline.shards.shards_digest``): in its record,
    or for a record written before it held one, from the recorded folder while that is there."""
    from pipeline.shards import read_manifest, shards_digest

    if record.get("data_digest"):
        return str(record["data_digest"])
    with contextlib.suppress(FileNotFoundError):
        return shards_digest(read_manifest(record["data_dir"]))
    return None


def resumed_data_dir(record: Mapping[str, Any], stored: Config, cfg: Config) -> str:
    """The dataset folder a resumed run reads: the recorded one, or the folder ``data.path=`` names
    on this resume (``cfg``, beside the run's ``stored`` config) where it holds the same shards."""
    from pipeline.shards import dataset_location, has_manifest, read_manifest, shards_digest

    recorded = str(record["data_dir"])
    if cfg.data.path == stored.data.path:  # not given on this resume
        if not has_manifest(recorded):
            raise NotFound(f"the run's dataset {recorded} is gone: give data.path=FOLDER, a copy of it, to continue")
        return recorded
    path = dataset_location(cfg.data.path)
    if path == recorded:
        return path
    found = shards_digest(read_manifest(path))
    expected = recorded_digest(record)
    if expected is None:
        raise BadValue(f"data.path={cfg.data.path}: the run's record holds no shard checksums and its dataset "
                       f"{recorded} is gone, so nothing shows this is the same dataset")
    if found != expected:
        raise BadValue(f"data.path={cfg.data.path} holds another dataset than the run's ({recorded}): its shard "
                       "checksums differ; a resumed run continues on the data it started with")
    return path


def resumed_tracking_uri(record: Mapping[str, Any], stored: Config, cfg: Config) -> str:
    """The recorded tracking store, or the one ``run.tracking_uri=`` names on this resume."""
    from jobs.tracking import resolve_tracking_uri

    if cfg.run.tracking_uri != stored.run.tracking_uri:
        return resolve_tracking_uri(cfg.run.tracking_uri)
    return str(record["tracking_uri"])


def held_run(tracking_uri: str, run_id: str) -> bool:
    """Whether the tracking store holds the MLflow run ``run_id`` (a store it cannot reach raises)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def moved_record(
    record: Mapping[str, Any], *, data_dir: str, data_digest: str, tracking_uri: str, mlflow_run_id: str,
) -> dict[str, Any]:
    """The run record as this resume found the run: its dataset folder (and the digest of its
    shards, ``DatasetFacts.digest``, which a record written before held none of), tracking store
    and MLflow run, so the next resume reads them without being told again."""
    return {
        **record, "data_dir": data_dir, "data_digest": data_digest,
        "config": {**record["config"], "data.path": data_dir}, "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
    }
