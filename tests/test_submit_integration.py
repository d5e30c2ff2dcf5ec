"""Integration: a real 2-node Ray cluster on this machine, a tiny training job sent with `salgl submit`.

cluster/local_two_node.sh starts a head and a worker node (one CPU each, their own temp dirs, token
auth on); `salgl submit` uploads the project and runs `salgl train` as a Ray job with
run.placement_strategy=SPREAD; the test checks the exit code, that the two Train workers ran on
the two nodes (Ray's state API), the MLflow run, its artifacts and the checkpoint. The cluster is
always stopped, by its own marker, never with `ray stop` (other Ray instances may be running).
On 2 loaded cores: about 1.5 min to start the cluster, 3-5 min for the job.

Last in the module (they kill the worker node): an elastic run (run.min_workers=1) with S3 (the
moto server on 127.0.0.1) as its only shared store loses the worker node mid-run and finishes on
the head node with one worker; a sweep's trial that loses it is retried from its checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests._cluster import ROOT, SALGL, clean_env, cluster_script, cluster_state, local_cluster, submit, submit_command
from tests.conftest import S3_BUCKET

pytestmark = pytest.mark.integration
RUN_NAME = "submitted"


@pytest.fixture(scope="module")
def cluster(s3_endpoint) -> Iterator[dict[str, str]]:
    # Started after the S3 server: the nodes, and so the jobs, get its environment (the node-loss test).
    with local_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """A tiny mosaic dataset, a checkpoint folder and an MLflow store, all absolute."""
    from jobs.tracking import ensure_experiment
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    root = tmp_path_factory.mktemp("submit")
    convert_mosaic(root / "mosaic", MosaicConfig(train=128, test=32, canvas=64), progress=False)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    # With a SQLite store the experiment's artifact root would default to ./mlruns of the process
    # that creates it: inside a job, a temporary copy of the project. Create it here, on storage
    # every node sees, as one does on a cluster (or use an MLflow server with --artifacts-destination).
    ensure_experiment(tracking_uri, "salgl", str(root / "mlruns"))
    return {"data": root / "mosaic", "storage": root / "runs", "tracking_uri": tracking_uri}


@pytest.fixture(scope="module")
def submitted(cluster, workdir) -> subprocess.CompletedProcess[str]:
    return submit(
        cluster, "train", str(ROOT / "jobs" / "configs" / "tiny.yaml"),
        f"data.path={workdir['data']}", f"run.storage={workdir['storage']}",
        f"run.tracking_uri={workdir['tracking_uri']}", "run.placement_strategy=SPREAD", f"run.name={RUN_NAME}",
        timeout=700,
    )


def _job_id(out: str) -> str:
    return next(line.split()[2] for line in out.splitlines() if line.startswith("[salgl] submitted "))


def _train_workers(address: str, ray_job_id: str) -> list[Any]:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from jobs.submission.client import auth_headers, find_token

    client = StateApiClient(address, headers={**auth_headers(find_token()), "Content-Type": "application/json"})
    options = ListApiOptions(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id)], detail=True)
    return client.list(StateResource.ACTORS, options=options, raise_on_missing_output=False)


def _nodes(address: str) -> dict[str, str]:
    """node id -> "node_head" / "node_worker" (the custom resource each node of the script offers)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from jobs.submission.client import auth_headers, find_token

    client = StateApiClient(address, headers={**auth_headers(find_token()), "Content-Type": "application/json"})
    nodes = client.list(StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False)
    return {n.node_id: next(k for k in n.resources_total if k in ("node_head", "node_worker")) for n in nodes}


@pytest.mark.timeout(900)
def test_submitted_training_succeeds_on_both_nodes(submitted, cluster) -> None:
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out[-6000:]
    assert "[salgl] epoch 1/1" in out, "the job's log is streamed back"
    assert "SUCCEEDED" in submitted.stdout.splitlines()[-1]
    from jobs.submission.client import connect

    info = connect(cluster["address"]).client.get_job_info(_job_id(submitted.stdout))
    assert str(info.status) == "SUCCEEDED"
    workers = _train_workers(cluster["address"], info.job_id)
    nodes = _nodes(cluster["address"])
    assert len(workers) == 2, workers
    assert sorted(nodes[w.node_id] for w in workers) == ["node_head", "node_worker"]


@pytest.mark.timeout(900)
def test_submitted_run_left_a_checkpoint_and_an_mlflow_run(submitted, workdir) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.training.checkpoints import read_checkpoint

    assert submitted.returncode == 0, submitted.stderr[-3000:]
    run_dir = Path(workdir["storage"]) / RUN_NAME
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and read_checkpoint(str(checkpoints[-1]))["epoch"] == 1
    client = MlflowClient(workdir["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("salgl").experiment_id], f"attributes.run_name = '{RUN_NAME}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["run.placement_strategy"] == "SPREAD" and run.data.params["run.workers"] == "2"
    assert "ema_mAP" in run.data.metrics
    assert run.info.artifact_uri.startswith(Path(workdir["data"]).parent.as_uri())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_checkpoint", "config", "metrics"} <= artifacts


@pytest.mark.timeout(900)
def test_jobs_commands_see_the_job(submitted, cluster, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    job_id = _job_id(submitted.stdout)
    assert main(["jobs", "list", "--address", cluster["address"]]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "status", job_id, "--address", cluster["address"]]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", cluster["address"]]) == 0
    assert "[salgl] epoch 1/1" in capsys.readouterr().out
    assert main(["jobs", "stop", job_id, "--address", cluster["address"]]) == 0
    assert "was not running" in capsys.readouterr().out


@pytest.mark.timeout(900)
def test_a_failing_job_exits_non_zero_with_its_status(cluster) -> None:
    failed = submit(cluster, "train", "tiny", "run.workers=0", timeout=600)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "run.workers: must be >= 1" in failed.stdout + failed.stderr
    assert " FAILED" in failed.stdout.splitlines()[-1]


@pytest.mark.timeout(900)
def test_a_missing_or_wrong_token_is_explained(cluster, tmp_path: Path) -> None:
    # Fresh processes, as a user runs them: a process that has called ray.init() keeps Ray's token
    # and sends it on every later request, whatever the environment then says.
    env = clean_env("RAY_AUTH_TOKEN")
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token")

    def jobs_list(*extra: str, **env_changes: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SALGL, "jobs", "list", "--address", cluster["address"], *extra],
                              env={**env, **env_changes}, capture_output=True, text=True, timeout=120)

    rejected = jobs_list("--token-file", str(wrong))
    assert rejected.returncode == 2, rejected.stdout + rejected.stderr
    assert f"rejected the token from --token-file {wrong}" in rejected.stderr
    missing = jobs_list(HOME=str(tmp_path))  # no ~/.ray/auth_token there
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "requires an authentication token and none was found" in missing.stderr


def _newest_epoch(s3, prefix: str) -> int:
    """The highest epoch of a checkpoint meta.json under ``prefix`` in the test bucket (0: none yet)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    metas = [obj["Key"] for page in pages for obj in page.get("Contents", []) if obj["Key"].endswith("/meta.json")]
    return max((json.loads(s3.get_object(Bucket=S3_BUCKET, Key=k)["Body"].read()).get("epoch", 0) for k in metas), default=0)


def _lose_the_worker_node_during(cluster, s3, job: list[str], prefix: str, output: Path) -> int:
    """Submit ``job``, SIGKILL the worker node once the bucket holds an epoch-1 checkpoint under
    ``prefix``, and return the job's exit code once it ends (each wait bounded)."""
    with open(output, "w") as out:
        proc = subprocess.Popen(submit_command(cluster, *job), stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                cwd=ROOT, text=True)
        try:
            deadline = time.monotonic() + 600
            while _newest_epoch(s3, prefix) < 1:
                assert proc.poll() is None, output.read_text()[-6000:]
                assert time.monotonic() < deadline, f"no epoch in time\n{output.read_text()[-6000:]}\n{cluster_state(cluster)}"
                time.sleep(1)  # polling the bucket the job writes to, not synchronising the test
            killed = cluster_script("kill-worker", cluster["env"], timeout=60)
            assert killed.returncode == 0, killed.stderr
            return proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                pytest.fail(f"the job did not end after the node loss\n{output.read_text()[-6000:]}\n{cluster_state(cluster)}")


@pytest.mark.timeout(1200)
def test_an_elastic_run_loses_the_worker_node_and_finishes_on_the_head(cluster, s3_endpoint, workdir, tmp_path) -> None:
    """Every process of the worker node SIGKILLed after epoch 1's checkpoint: the run continues from
    it with one worker on the head node and finishes all epochs; the log says what happened and how
    long the workers were down. The data and the run folder are in the bucket, nothing shared on disk."""
    from mlflow.tracking import MlflowClient

    from pipeline.mosaic import MosaicConfig, convert_mosaic

    s3 = s3_endpoint
    data = f"s3://{S3_BUCKET}/data/node-loss"
    convert_mosaic(data, MosaicConfig(train=256, test=32, canvas=64), progress=False)
    job = ["train", "tiny", f"data.path={data}", f"run.storage=s3://{S3_BUCKET}/runs",
           f"run.tracking_uri={workdir['tracking_uri']}", "run.workers=2", "run.min_workers=1",
           "run.placement_strategy=SPREAD", "run.max_failures=2", "optim.epochs=3", "run.name=node-loss"]
    output = tmp_path / "job.out"
    code = _lose_the_worker_node_during(cluster, s3, job, "runs/node-loss/", output)
    text = output.read_text()
    assert code == 0, text[-6000:]
    assert "lost worker" in text, text[-6000:]
    recovered = re.search(r"workers running again: 1 worker of 2, ([0-9.]+) s after the loss", text)
    assert recovered, text[-6000:]
    print(f"node loss -> workers running again: {recovered.group(1)} s")  # docs/benchmarks.md, node loss
    assert "[salgl] epoch 3/3" in text, text[-6000:]
    assert _newest_epoch(s3, "runs/node-loss/") == 3
    client = MlflowClient(workdir["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("salgl").experiment_id], "attributes.run_name = 'node-loss'")
    assert run.info.status == "FINISHED" and run.data.params["run.min_workers"] == "1"


@pytest.mark.timeout(1200)
def test_a_sweep_whose_trial_loses_its_node_retries_it_from_its_checkpoint(cluster, s3_endpoint, workdir, tmp_path) -> None:
    """After the run above the worker node is gone; started again, a sweep's only trial (2 workers,
    one on each node) loses it after epoch 1: Tune retries the trial, which continues from its
    checkpoint in the bucket on the head node, and the sweep completes."""
    s3 = s3_endpoint
    started = cluster_script("start-worker", cluster["env"], timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    data = f"s3://{S3_BUCKET}/data/node-loss"  # prepared by the test above
    job = ["tune", "tiny", f"data.path={data}", f"run.storage=s3://{S3_BUCKET}/sweeps", "run.name=sweep-node-loss",
           f"run.tracking_uri={workdir['tracking_uri']}", "run.workers=2", "run.min_workers=1",
           "run.placement_strategy=SPREAD", "run.max_failures=2", "K=2", "lambda=1.0", "T=1", "--samples", "1",
           "--max-epochs", "2"]
    output = tmp_path / "job.out"
    code = _lose_the_worker_node_during(cluster, s3, job, "sweeps/sweep-node-loss/trials/", output)
    text = output.read_text()
    assert code == 0, text[-6000:]
    assert "Tune retries it from its last checkpoint" in text and "[1/1 trials done]" in text, text[-6000:]
    assert _newest_epoch(s3, "sweeps/sweep-node-loss/trials/") == 2
    assert "registered: models:/salgl/" in text, text[-6000:]
