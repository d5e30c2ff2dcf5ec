"""Integration: a run whose folder is in an S3 bucket (``run.storage=s3://...``), on a real
S3-compatible server started here on 127.0.0.1 (moto's server mode), through real Ray Train.

A worker killed in the first epoch, a stop after it, a resume: the run ends in the same state as
the same run in a local folder, and every file of the run is in the bucket.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from salgl.config import preset
from tests.conftest import S3_BUCKET as BUCKET

pytestmark = pytest.mark.integration


def _config(mosaic_dir: str, storage: str, tmp: Path, **overrides):
    return preset("tiny", {
        "data.path": mosaic_dir, "data.img_size": 64, "optim.epochs": 2, "optim.batch_size": 16,
        "run.workers": 2, "run.storage": storage, "run.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "run.checksum_every": 4, "run.keep_checkpoints": 2, "ema.decay": 0.9, **overrides,
    })


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))


@pytest.mark.timeout(900)
def test_a_run_in_s3_survives_a_killed_worker_and_resumes_to_the_local_runs_state(
    ray_with_s3, mosaic_dir: str, tmp_path: Path
) -> None:
    from jobs.training.checkpoints import read_checkpoint
    from jobs.training.driver import train

    s3 = ray_with_s3
    storage = f"s3://{BUCKET}/runs"
    cfg = _config(mosaic_dir, storage, tmp_path, **{"run.name": "in-s3", "run.inject_failure": "0:1",
                                                    "run.stop_after_epoch": 1})
    first = train(cfg, log_model=False)
    assert first.metrics["epoch"] == 1 and first.run_dir == f"{storage}/in-s3"
    local_dir = Path(os.environ["XDG_CACHE_HOME"]) / "salgl" / "runs" / "s3" / BUCKET / "runs" / "in-s3"
    assert (local_dir / ".salgl_failure_injected").exists(), "the failure was not injected"
    keys = _keys(s3, "runs/in-s3/")
    assert "salgl_run.json" in keys and "salgl.log" in keys
    assert any(k.endswith("/state.pt") for k in keys) and any(k.endswith("/meta.json") for k in keys)

    resumed = train(cfg, resume=f"{storage}/in-s3", log_model=False)
    assert resumed.metrics["epoch"] == 2 and resumed.mlflow_run_id == first.mlflow_run_id
    assert resumed.last_checkpoint.startswith(f"{storage}/in-s3/")

    local = train(_config(mosaic_dir, str(tmp_path / "runs"), tmp_path, **{"run.name": "local"}), log_model=False)
    from jobs.storage import local_copy

    with local_copy(resumed.last_checkpoint) as folder:
        in_s3 = read_checkpoint(folder)
    here = read_checkpoint(local.last_checkpoint)
    assert (in_s3["epoch"], in_s3["step"]) == (here["epoch"], here["step"])
    torch.testing.assert_close(in_s3["model"]["head.counts"], here["model"]["head.counts"], rtol=0, atol=0)
    torch.testing.assert_close(in_s3["ema"]["module.head.counts"], here["ema"]["module.head.counts"], rtol=0, atol=0)

    from jobs.inference.loading import load_for_inference

    model, _, vocabulary = load_for_inference(f"{storage}/in-s3")  # a run folder in S3: its best checkpoint
    assert len(vocabulary) == model.head.counts.shape[-1]
