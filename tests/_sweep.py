"""What the sweep integration modules share: tiny mosaic data, overrides and a 4-trial grid."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def mosaic_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = tmp_path_factory.mktemp("data") / "mosaic"
    convert_mosaic(out, MosaicConfig(train=128, test=32, canvas=64), progress=False)
    return str(out)


def sweep_overrides(mosaic_dir: str, root: Path) -> dict:
    return {
        "data.path": mosaic_dir, "data.img_size": 64, "optim.batch_size": 16, "run.workers": 1,
        "run.storage": str(root / "runs"), "run.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "ema.decay": 0.5, "run.keep_checkpoints": 1,
    }


SPACE = {"K": "grid:1,2", "optim.lr": "grid:0.003,1e-9", "lambda": "1.0", "T": "1"}
