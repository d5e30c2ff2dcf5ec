"""Which checkpoint a (re)started run continues from: the newest complete one in its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.training.checkpoints import META_FILE, STATE_FILE, latest_epoch, newest_checkpoint
from jobs.training.run_folder import storage_root
from salgl.config import preset
from tests._tiny_checkpoint import write_tiny_checkpoint


def _set_epoch(folder: Path, epoch: int) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "epoch": epoch, "step": 3 * epoch}))


def test_newest_complete_checkpoint_wins(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path) is None and latest_epoch(tmp_path) == 0
    for name, epoch in [("checkpoint_b", 1), ("checkpoint_a", 2)]:  # names do not order them
        _set_epoch(write_tiny_checkpoint(tmp_path / name, ["a", "b"]), epoch)
    assert newest_checkpoint(tmp_path) == (str(tmp_path / "checkpoint_a"), 2)
    assert latest_epoch(tmp_path) == 2


def test_a_half_copied_checkpoint_is_skipped(tmp_path: Path) -> None:
    _set_epoch(write_tiny_checkpoint(tmp_path / "checkpoint_1", ["a", "b"]), 1)
    broken = write_tiny_checkpoint(tmp_path / "checkpoint_2", ["a", "b"])
    _set_epoch(broken, 2)
    state = (broken / STATE_FILE).read_bytes()
    (broken / STATE_FILE).write_bytes(state[: len(state) // 2])  # a copy cut short
    assert newest_checkpoint(tmp_path) == (str(tmp_path / "checkpoint_1"), 1)
    (broken / STATE_FILE).unlink()
    assert latest_epoch(tmp_path) == 1


def _flip_bytes(path: Path, at: int, count: int = 4096) -> None:
    """Alter ``count`` bytes in place: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    data[at : at + count] = bytes(255 - b for b in data[at : at + count])
    path.write_bytes(bytes(data))


def test_an_altered_checkpoint_is_refused_on_load_and_passed_over_on_resume(tmp_path: Path) -> None:
    from jobs.training.checkpoints import read_checkpoint
    from salgl.errors import CorruptFile

    _set_epoch(write_tiny_checkpoint(tmp_path / "checkpoint_1", ["a", "b"]), 1)
    altered = write_tiny_checkpoint(tmp_path / "checkpoint_2", ["a", "b"])
    _set_epoch(altered, 2)
    size = (altered / STATE_FILE).stat().st_size
    _flip_bytes(altered / STATE_FILE, size // 2)
    assert (altered / STATE_FILE).stat().st_size == size
    with pytest.raises(CorruptFile, match=f"{altered / STATE_FILE} differs from the sha256"):
        read_checkpoint(altered)
    assert newest_checkpoint(tmp_path) == (str(tmp_path / "checkpoint_1"), 1)
    read_checkpoint(tmp_path / "checkpoint_1")  # the good one still loads


def _ray_snapshot(run_dir: Path, names: list[str]) -> Path:
    """Ray Train's record of a run holding ``names`` (oldest first), written by Ray's own model."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState, _TrainingResultState)

    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"ema_mAP": 50.0 + i}) for i, n in enumerate(names)]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    )
    path = run_dir / "checkpoint_manager_snapshot.json"
    path.write_text(state.model_dump_json())
    return path


def test_a_damaged_checkpoint_is_set_aside_before_a_resume_and_leaves_rays_record(tmp_path: Path) -> None:
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from jobs.training.checkpoints import DAMAGED_DIR, set_aside_damaged

    for name, epoch in [("checkpoint_1", 1), ("checkpoint_2", 2)]:
        _set_epoch(write_tiny_checkpoint(tmp_path / name, ["a", "b"]), epoch)
    snapshot = _ray_snapshot(tmp_path, ["checkpoint_1", "checkpoint_2"])
    assert set_aside_damaged(tmp_path) == []  # all intact: nothing moves
    _flip_bytes(tmp_path / "checkpoint_2" / STATE_FILE, 100)

    lines = set_aside_damaged(tmp_path)
    assert "checkpoint checkpoint_2 set aside" in lines[0] and "differs from the sha256" in lines[0]
    assert lines[-1] == "continuing from checkpoint_1 (epoch 1)"
    assert (tmp_path / DAMAGED_DIR / "checkpoint_2" / STATE_FILE).is_file() and not (tmp_path / "checkpoint_2").exists()
    record = _CheckpointManagerState.model_validate_json(snapshot.read_text())  # still what Ray reads
    assert [r.checkpoint_dir_name for r in record.checkpoint_results] == ["checkpoint_1"]
    assert record.checkpoint_report_indices == [0]
    assert record.latest_checkpoint_result.checkpoint_dir_name == "checkpoint_1"
    assert newest_checkpoint(tmp_path) == (str(tmp_path / "checkpoint_1"), 1)


def test_a_resume_with_every_checkpoint_damaged_is_refused_not_restarted(tmp_path: Path) -> None:
    from jobs.training.checkpoints import set_aside_damaged
    from salgl.errors import CorruptFile

    only = write_tiny_checkpoint(tmp_path / "checkpoint_1", ["a", "b"])
    _flip_bytes(only / STATE_FILE, 100)
    with pytest.raises(CorruptFile, match="every checkpoint of .* is damaged .*differs from the sha256"):
        set_aside_damaged(tmp_path)
    assert (only / STATE_FILE).is_file()  # nothing moved


@pytest.mark.parametrize(("given", "expected"), [
    ("s3://bucket/runs/", "s3://bucket/runs"), ("gs://b/r", "gs://b/r"), ("abfs://c@acct.dfs.core.windows.net/r", None)])
def test_object_store_storage_is_kept_as_a_uri(given: str, expected: str | None) -> None:
    assert storage_root(preset("tiny", {"run.storage": given})) == (expected or given)


def test_an_unknown_scheme_is_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="run.storage=ftp://host/runs: a folder every node sees, or an object-store URI"):
        storage_root(preset("tiny", {"run.storage": "ftp://host/runs"}))


def test_a_checkpoint_holding_a_data_seed_still_restores(tmp_path: Path) -> None:
    """Older checkpoints also hold a ``data_seed`` (in state.pt and meta.json); it is ignored."""
    import types

    import torch

    from jobs.training.acceleration import StepPrecision
    from jobs.training.checkpoints import read_checkpoint
    from jobs.training.recipe import Recipe
    from tests._tiny_checkpoint import tiny_config, tiny_trained_model

    folder = write_tiny_checkpoint(tmp_path / "checkpoint_1", ["a", "b"])
    state, meta = torch.load(folder / STATE_FILE, weights_only=True), json.loads((folder / META_FILE).read_text())
    assert "data_seed" not in state and "data_seed" not in meta
    torch.save({**state, "data_seed": 7}, folder / STATE_FILE)
    meta["files"][STATE_FILE] = (folder / STATE_FILE).stat().st_size
    (folder / META_FILE).write_text(json.dumps({**meta, "data_seed": 7}))
    assert newest_checkpoint(tmp_path) == (str(folder), 1)

    model, _ = tiny_trained_model(tiny_config(), 2)
    optimizer = torch.optim.AdamW(model.parameters())
    recipe = types.SimpleNamespace(ema=None, optimizer=optimizer,
                                   scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                                   precision=StepPrecision("fp32", torch.device("cpu")))  # no grad_scaler key: older
    Recipe._restore(recipe, read_checkpoint(folder))  # type: ignore[arg-type]
    assert (recipe.state.epoch, recipe.state.step) == (1, 3)
