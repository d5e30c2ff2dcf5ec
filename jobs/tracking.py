"""MLflow tracking behind one small interface, chosen once per process.

The driver creates the run (so a restarted worker group and ``--resume`` log into the same run);
per-epoch metrics are logged from Ray Train's controller, which sees rank 0's report, so no
worker ever decides whether it should log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

DEFAULT_DB = "mlflow.db"
# MLflow 3's experiment "kind" tag (read by its UI): opens the experiment in the model-training view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class MlflowLogger:
    """Logs into an existing run by id through the client API (safe from any process)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        for start in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 900])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params the run does not hold yet. MLflow params never change, so one the run holds with
        another value (a run resumed on other hardware) is kept as the tag ``resumed.<key>``."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in held]
        if new:
            self.client.log_batch(self.run_id, params=new)
        for key, value in params.items():
            if key in held and held[key] != str(value):
                self.client.set_tag(self.run_id, f"resumed.{key}", str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, folder, artifact_path)


class BestSoFar:
    """A run's best ``ema_mAP`` and the epoch it came at, logged beside every epoch's metrics so
    the runs table can sort by best rather than last (a sweep trial's last epoch is often not its
    best)."""

    METRIC = "ema_mAP"

    def __init__(self, value: float | None = None, epoch: int | None = None) -> None:
        self.value, self.epoch = value, epoch

    @classmethod
    def from_run_dir(cls, run_dir: str | None) -> "BestSoFar":
        """Seeded from a run folder's best checkpoint (a resumed run's epochs so far; checkpoints
        are kept by this score, so its best is never deleted)."""
        from jobs.training.checkpoints import best_checkpoint_in, read_meta

        folder = best_checkpoint_in(run_dir, cls.METRIC) if run_dir else None
        if folder is None:
            return cls()
        meta = read_meta(folder)
        return cls(float(meta["metrics"][cls.METRIC]), int(meta["epoch"]))

    def update(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Take one epoch's metrics; returns ``best_ema_mAP`` and ``best_epoch`` so far ({} before any)."""
        value = metrics.get(self.METRIC)
        if _is_number(value) and (self.value is None or value > self.value):
            self.value, self.epoch = float(value), int(metrics.get("epoch", 0))
        return {} if self.value is None else {"best_ema_mAP": self.value, "best_epoch": self.epoch}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def resolve_tracking_uri(uri: str) -> str:
    """``""`` -> an absolute sqlite store in the working directory (workers run elsewhere)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """The experiment's id, created with an absolute artifact location when it is new."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(
        name, artifact_location=default_artifact_location(tracking_uri, name, artifact_root), tags=EXPERIMENT_KIND,
    )


def default_artifact_location(tracking_uri: str, name: str, artifact_root: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (``mlruns/`` next to the
    .db file, so a job that runs in a temporary copy of the project loses nothing), under a file
    store, or the server's own default (None) for a tracking server."""
    if artifact_root:
        return (Path(artifact_root).resolve() / name).as_uri()
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlruns" / name).as_uri()
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return (Path(tracking_uri.removeprefix("file://")).resolve() / "artifacts" / name).as_uri()
    return None


def start_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    artifact_root: str | None = None,
) -> str:
    """Create a run (nested under ``parent_run_id`` if given), log params, return its id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment, artifact_root)
    all_tags = {**git_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 90):
        client.log_batch(run.info.run_id, params=items[start : start + 90])
    return run.info.run_id


def git_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The project's commit (``mlflow.source.git.commit``, as MLflow's own runs tag it) and whether
    the tree had uncommitted changes (``salgl.git_dirty``); {} outside a git checkout (an installed
    package, a job's uploaded copy)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "salgl.git_dirty": str(dirty).lower()}


def log_dataset(tracking_uri: str, run_id: str, data_dir: str, *, manifest: Mapping[str, Any] | None = None) -> None:
    """The dataset as the run's input (``mlflow.log_input``'s record, logged by run id): named
    after its folder, its digest a hash of the manifest's shard sha256s (a re-prepared dataset
    with other bytes gets another), its source the folder, and its split sizes as the profile.
    ``manifest``: the folder's manifest where the caller has read it, else read here."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = manifest_dataset(data_dir, manifest=manifest)
    # _to_mlflow_entity: what mlflow.log_input sends; the fluent call needs an active run, and
    # leaving one made active here would end the run FINISHED mid-training.
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=[entry])


def manifest_dataset(data_dir: str, *, manifest: Mapping[str, Any] | None = None) -> Any:
    """An ``mlflow.data`` dataset describing a prepared dataset folder by its ``manifest.json``."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from pipeline.shards import dataset_location, read_manifest, shards_digest

    manifest = read_manifest(data_dir) if manifest is None else manifest
    profile = {
        "splits": {name: int(split["rows"]) for name, split in manifest["splits"].items()},
        "labels": len(manifest["vocabulary"]),
        "converter": manifest.get("source", {}).get("converter"),
    }

    class ManifestDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():  # a local path matches MLflow's local artifact source twice: same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset_location(data_dir))
    return ManifestDataset(source, name=dataset_location(data_dir).rsplit("/", 1)[-1], digest=shards_digest(manifest)[:16])


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status)


TRAINING_VIEW = "workflowType=machine_learning"  # the UI's model-training view (URL parameter, MLflow 3.17)


def run_page(tracking_uri: str, run_id: str) -> str:
    """Where to look: the UI command for a local store, or the run's address on a server."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    if tracking_uri.startswith(("http://", "https://")):
        # MLflow 3.17's UI picks its GenAI or model-training view per browser, not per experiment
        # (the experiment-kind tag is not consulted once its view switch is on): the link says which.
        return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}?{TRAINING_VIEW}"
    return f"run {run_id} in {tracking_uri} (view: mlflow ui --backend-store-uri {tracking_uri})"
