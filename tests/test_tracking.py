"""What every run logs beside its epoch metrics (``jobs.tracking``)."""

from __future__ import annotations

import json

from jobs.tracking import BestSoFar


def test_best_ema_map_and_its_epoch_follow_the_best_epoch_not_the_last() -> None:
    best = BestSoFar()
    assert best.update({"epoch": 1, "loss": 0.3}) == {}
    seen = [best.update({"epoch": e, "ema_mAP": v}) for e, v in ((1, 40.0), (2, 55.0), (3, 50.0))]
    assert seen == [
        {"best_ema_mAP": 40.0, "best_epoch": 1}, {"best_ema_mAP": 55.0, "best_epoch": 2}, {"best_ema_mAP": 55.0, "best_epoch": 2},
    ]
    assert best.update({"epoch": 4, "ema_mAP": float("nan")}) == {"best_ema_mAP": 55.0, "best_epoch": 2}


def test_a_resumed_run_starts_from_its_folders_best_checkpoint(tmp_path) -> None:
    for epoch, value in ((1, 30.0), (2, 45.0), (3, 20.0)):
        folder = tmp_path / f"checkpoint_{epoch}"
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"ema_mAP": value}}))
    best = BestSoFar.from_run_dir(str(tmp_path))
    assert best.update({"epoch": 4, "ema_mAP": 44.0}) == {"best_ema_mAP": 45.0, "best_epoch": 2}
    assert BestSoFar.from_run_dir(str(tmp_path / "none")).update({}) == {}
