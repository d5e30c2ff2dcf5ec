"""``jobs.training.resume``: a run folder resumed elsewhere (copied to another machine, its tracking
server moved) takes a moved copy of its dataset and refuses another one, and finds out whether its
MLflow run is still in the store. No Ray: the refusals come before it starts. The resume itself,
through Ray Train, is tests/test_train_integration.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.training.resume import held_run, moved_record, resumed_data_dir
from pipeline.shards import read_manifest, shards_digest
from salgl.config import SCHEMA_VERSION, from_stored, preset, to_flat, with_overrides
from salgl.errors import BadValue, NotFound


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A dataset other than ``mosaic_dir`` (fewer images)."""
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = tmp_path_factory.mktemp("other") / "mosaic"
    convert_mosaic(out, MosaicConfig(train=16, test=8, canvas=64), progress=False)
    return str(out)


def _record(data_dir: str, *, digest: bool = True) -> dict:
    """A run record as ``salgl train`` writes it (``digest=False``: as versions before the digest)."""
    record = {"run_name": "travels", "data_dir": data_dir, "config": to_flat(preset("tiny", {"data.path": data_dir})),
              "tracking_uri": "sqlite:////gone/mlflow.db", "mlflow_run_id": "0" * 32, "schema_version": SCHEMA_VERSION}
    return {**record, "data_digest": shards_digest(read_manifest(data_dir))} if digest else record


def _resume_with(record: dict, **overrides: str) -> str:
    stored = from_stored(record["config"], SCHEMA_VERSION)
    return resumed_data_dir(record, stored, with_overrides(stored, overrides))


def test_a_moved_copy_of_the_dataset_is_taken(mosaic_dir: str, tmp_path: Path) -> None:
    recorded = shutil.copytree(mosaic_dir, tmp_path / "data")
    record = _record(str(recorded))
    moved = recorded.rename(tmp_path / "moved")
    assert _resume_with(record, **{"data.path": str(moved)}) == str(moved)


def test_another_dataset_is_refused(mosaic_dir: str, other_dataset: str) -> None:
    with pytest.raises(BadValue, match="holds another dataset than the run's .*shard checksums differ"):
        _resume_with(_record(mosaic_dir), **{"data.path": other_dataset})


def test_without_the_dataset_a_resume_says_how_to_point_at_a_copy(mosaic_dir: str, tmp_path: Path) -> None:
    record = {**_record(mosaic_dir), "data_dir": str(tmp_path / "gone")}
    with pytest.raises(NotFound, match="the run's dataset .*gone: give data.path=FOLDER"):
        _resume_with(record)


def test_a_record_without_checksums_is_checked_against_its_folder_while_there(mosaic_dir: str, tmp_path: Path) -> None:
    copy = shutil.copytree(mosaic_dir, tmp_path / "copy")
    record = _record(mosaic_dir, digest=False)
    assert _resume_with(record, **{"data.path": str(copy)}) == str(copy)
    with pytest.raises(BadValue, match="holds no shard checksums and its dataset .* is gone"):
        _resume_with({**record, "data_dir": str(tmp_path / "gone")}, **{"data.path": str(copy)})


def test_the_record_names_where_the_run_was_found(mosaic_dir: str, tmp_path: Path) -> None:
    record = _record(str(tmp_path / "gone"), digest=False)
    from jobs.training.dataset import read_dataset

    digest = read_dataset(mosaic_dir).digest
    moved = moved_record(record, data_dir=mosaic_dir, data_digest=digest, tracking_uri="sqlite:///here.db", mlflow_run_id="1" * 32)
    assert moved["data_dir"] == moved["config"]["data.path"] == mosaic_dir
    assert moved["data_digest"] == shards_digest(read_manifest(mosaic_dir))
    assert (moved["tracking_uri"], moved["mlflow_run_id"]) == ("sqlite:///here.db", "1" * 32)


def test_an_mlflow_run_the_store_does_not_hold(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("salgl")).info.run_id
    assert held_run(tracking, run_id) and not held_run(tracking, "0" * 32)


def test_resuming_on_another_dataset_is_a_usage_error_in_one_line(
    mosaic_dir: str, other_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main
    from jobs.training.run_folder import RUN_FILE

    recorded = shutil.copytree(mosaic_dir, tmp_path / "data")
    run_dir = tmp_path / "runs" / "travels"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_FILE).write_text(json.dumps(_record(str(recorded))))
    shutil.rmtree(recorded)
    assert main(["train", "--resume", str(run_dir), f"data.path={other_dataset}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salgl train: error: data.path=") and "another dataset" in err
    assert err.count("\n") == 1 and "Traceback" not in err
