"""What the sweep integration modules share: overrides and a 4-trial grid (the tiny mosaic data
is the ``mosaic_dir`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path


def sweep_overrides(mosaic_dir: str, root: Path) -> dict:
    return {
        "data.path": mosaic_dir, "data.img_size": 64, "optim.batch_size": 16, "run.workers": 1,
        "run.storage": str(root / "runs"), "run.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "ema.decay": 0.5, "run.keep_checkpoints": 1,
    }


SPACE = {"K": "grid:1,2", "optim.lr": "grid:0.003,1e-9", "lambda": "1.0", "T": "1"}
