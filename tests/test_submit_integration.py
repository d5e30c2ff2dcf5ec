"""Integration: a real 2-node Ray cluster on this machine, a tiny training job sent with `salgl submit`.

cluster/local_two_node.sh starts a head and a worker node (one CPU each, their own temp dirs, token
auth on); `salgl submit` uploads the project and runs `salgl train` as a Ray job with
run.placement_strategy=SPREAD; the test checks the exit code, that the two Train workers ran on
the two nodes (Ray's state API), the MLflow run, its artifacts and the checkpoint. The cluster is
always stopped, by its own marker, never with `ray stop` (other Ray instances may be running).
On 2 loaded cores: about 1.5 min to start the cluster, 3-5 min for the job.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_two_node.sh"
SALGL = str(Path(sys.executable).parent / "salgl")
RUN_NAME = "submitted"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ports() -> tuple[int, int]:
    """A GCS port with the next three free (client server, two agents), and a dashboard port.

    Drawn between 21000 and 29000: above Ray's worker ports (10002-19999), below ephemeral ones.
    """
    rng = random.Random()
    for _ in range(200):
        base, dashboard = rng.randrange(21000, 29000, 8), rng.randrange(21004, 29000, 8)
        if all(_free(p) for p in (base, base + 1, base + 2, base + 3, dashboard)):
            return base, dashboard
    raise RuntimeError("no free ports")


def _clean_env(*also: str) -> dict[str, str]:
    """This process's environment without the Ray variables that would point salgl elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", *also))}


def _script(action: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    # Ray's socket paths must stay under 108 characters: a short folder, not pytest's tmp_path.
    state = tempfile.mkdtemp(prefix="salgl-it-", dir="/tmp")
    port, dashboard = _ports()
    env = _clean_env()
    env.update(SALGL_CLUSTER_DIR=state, RAY_PORT=str(port), DASHBOARD_PORT=str(dashboard), VENV=sys.prefix)
    try:
        started = _script("start", env, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "dir": state}
    finally:
        stopped = _script("stop", env, timeout=180)
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr


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


def _submit(cluster: dict[str, str], *job: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = _clean_env()
    try:
        return subprocess.run(
            [SALGL, "submit", "--address", cluster["address"], "--", *job],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )
    except subprocess.TimeoutExpired as e:  # show what the job was doing, not just that it hung
        tail = lambda b: (b or b"").decode(errors="replace")[-6000:]  # noqa: E731
        pytest.fail(f"salgl submit ran past {timeout} s\n--- stdout\n{tail(e.stdout)}\n--- stderr\n{tail(e.stderr)}\n--- cluster\n{_cluster_state(cluster)}")


def _cluster_state(cluster: dict[str, str]) -> str:
    """`ray status` and the live actors/tasks of the cluster, for a hung job's report."""
    env = {**os.environ, "RAY_ADDRESS": cluster["address"], "RAY_AUTH_MODE": "token"}
    ray = str(Path(sys.executable).parent / "ray")
    out = []
    for cmd in (["status", "--address", cluster["gcs"]], ["list", "actors", "--filter", "state!=DEAD"], ["list", "tasks", "--filter", "state!=FINISHED", "--limit", "30"]):
        try:
            done = subprocess.run([ray, *cmd], env=env, capture_output=True, text=True, timeout=60)
            out.append(f"$ ray {' '.join(cmd)}\n{done.stdout[-3000:]}{done.stderr[-1500:]}")
        except subprocess.TimeoutExpired:
            out.append(f"$ ray {' '.join(cmd)}: no answer in 60 s")
    return "\n".join(out)


@pytest.fixture(scope="module")
def submitted(cluster, workdir) -> subprocess.CompletedProcess[str]:
    return _submit(
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
    failed = _submit(cluster, "train", "tiny", "run.workers=0", timeout=600)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "run.workers: must be >= 1" in failed.stdout + failed.stderr
    assert " FAILED" in failed.stdout.splitlines()[-1]


@pytest.mark.timeout(900)
def test_a_missing_or_wrong_token_is_explained(cluster, tmp_path: Path) -> None:
    # Fresh processes, as a user runs them: a process that has called ray.init() keeps Ray's token
    # and sends it on every later request, whatever the environment then says.
    env = _clean_env("RAY_AUTH_TOKEN")
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
