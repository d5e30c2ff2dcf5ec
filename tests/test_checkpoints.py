"""Which checkpoint a (re)started run continues from: the newest complete one in its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.training.checkpoints import META_FILE, STATE_FILE, latest_epoch, newest_checkpoint
from jobs.training.driver import storage_root
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


def test_object_store_storage_is_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="run.storage=s3://bucket/runs: use a filesystem path"):
        storage_root(preset("tiny", {"run.storage": "s3://bucket/runs"}))


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
