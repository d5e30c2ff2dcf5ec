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


def test_object_store_storage_is_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="run.storage=s3://bucket/runs: use a filesystem path"):
        storage_root(preset("tiny", {"run.storage": "s3://bucket/runs"}))
