"""The local 2-node Ray cluster of cluster/local_two_node.sh, for the integration modules that need
one: free ports, the environment it starts with, start / stop / kill-worker, `salgl submit` to it.

The cluster is always stopped by its own marker, never with `ray stop` (other Ray instances may be
running on the machine).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_two_node.sh"
SALGL = str(Path(sys.executable).parent / "salgl")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports() -> tuple[int, int]:
    """A GCS port with the next three free (client server, two agents), and a dashboard port.

    Drawn between 21000 and 29000: above Ray's worker ports (10002-19999), below ephemeral ones.
    """
    rng = random.Random()
    for _ in range(200):
        base, dashboard = rng.randrange(21000, 29000, 8), rng.randrange(21004, 29000, 8)
        if all(_free(p) for p in (base, base + 1, base + 2, base + 3, dashboard)):
            return base, dashboard
    raise RuntimeError("no free ports")


def clean_env(*also: str) -> dict[str, str]:
    """This process's environment without the Ray variables that would point salgl elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", *also))}


def cluster_script(action: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def local_cluster(**settings: str) -> Iterator[dict[str, str]]:
    """A started 2-node cluster (``settings``: the script's environment, e.g. CPUS_PER_NODE) with
    this process's environment; yields its address, GCS address, folder and environment."""
    # Ray's socket paths must stay under 108 characters: a short folder, not pytest's tmp_path.
    state = tempfile.mkdtemp(prefix="salgl-it-", dir="/tmp")
    port, dashboard = free_ports()
    env = {**clean_env(), "SALGL_CLUSTER_DIR": state, "RAY_PORT": str(port), "DASHBOARD_PORT": str(dashboard),
           "VENV": sys.prefix, **settings}
    try:
        started = cluster_script("start", env, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "dir": state, "env": env}
    finally:
        stopped = cluster_script("stop", env, timeout=180)
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr


def cluster_state(cluster: dict[str, str]) -> str:
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


def submit_command(cluster: dict[str, str], *job: str) -> list[str]:
    return [SALGL, "submit", "--address", cluster["address"], "--", *job]


def submit(cluster: dict[str, str], *job: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`salgl submit` of ``job`` (a salgl command line), waiting for it; a job past ``timeout``
    fails the test with its output and the cluster's state."""
    try:
        return subprocess.run(submit_command(cluster, *job), env=clean_env(), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # show what the job was doing, not just that it hung
        tail = lambda b: (b or b"").decode(errors="replace")[-6000:]  # noqa: E731
        pytest.fail(f"salgl submit ran past {timeout} s\n--- stdout\n{tail(e.stdout)}\n--- stderr\n{tail(e.stderr)}\n--- cluster\n{cluster_state(cluster)}")
