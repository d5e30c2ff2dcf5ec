"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
S3_BUCKET = "salgl-runs"  # the bucket ``s3_endpoint`` creates


@pytest.fixture(scope="module")
def mosaic_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny mosaic dataset (128 train and 32 test images of 64 px) for the modules that run real
    training: seconds to write, and a few steps per epoch."""
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = tmp_path_factory.mktemp("data") / "mosaic"
    convert_mosaic(out, MosaicConfig(train=128, test=32, canvas=64), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest):
    """A local Ray instance on 2 CPUs, started as ``salgl train`` and ``salgl tune`` start theirs.

    One per module, shut down after it: with two instances on the machine, Ray Train's
    placement-group cleaner cannot tell which one to query, and a module that starts its own (a
    ``salgl`` subprocess, a local cluster) must find none left over.

    ``local_instance_env`` sets what the raylet reads once, at start (and every worker inherits);
    the settings a user exported are dropped for the test instance, so the tests see the project's
    own. This process's environment is restored right after the start: later modules see theirs.
    The repository goes on the workers' path: Ray tasks import test modules' functions by reference.
    The dashboard process only comes up for a module that sets ``RAY_DASHBOARD = True``: the state
    API (``ray.util.state``) lives there; the other modules save its start-up and CPU on 2 cores.
    """
    import ray

    from jobs.training.ray_setup import local_instance_env, quiet_ray_data

    with mock.patch.dict(os.environ):
        for key in ("RAY_num_workers_soft_limit", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
            os.environ.pop(key, None)
        local_instance_env()
        ray.init(num_cpus=2, include_dashboard=getattr(request.module, "RAY_DASHBOARD", False), log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    quiet_ray_data()
    yield
    ray.shutdown()
@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on a local port with one bucket (``S3_BUCKET``), and the environment every
    S3 client here reads (pyarrow's, so Ray's and ours): set before Ray starts, so its workers
    inherit it. Yields a boto3 S3 client."""
    from tests._servers import free_port, start_server, stop_server

    pytest.importorskip("moto", reason="moto[server] is a dev dependency (pip install -e '.[dev]')")
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                        endpoint + "/moto-api/", timeout=60, name="moto server")
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    from jobs.storage import _filesystem

    _filesystem.cache_clear()  # a client opened for another module's server would call a closed port
    with mock.patch.dict(os.environ, env):
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield boto3.client("s3")
    stop_server(proc)
    _filesystem.cache_clear()


@pytest.fixture(scope="module")
def ray_with_s3(s3_endpoint, request: pytest.FixtureRequest):
    request.getfixturevalue("ray_local")  # started after the S3 environment is set
    return s3_endpoint
