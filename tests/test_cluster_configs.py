"""The cluster configs in cluster/: valid for the tools that read them, and naming only what exists.

The launcher configs are checked against the JSON schema that ships inside the ray package (and
Ray's own `ray up` preparation); the KubeRay manifests are parsed and their required fields,
GPU limits, object-store sizing and shared volume checked; the image and the commands they name
are checked against the project (Dockerfile COPY sources, `salgl` subcommands, bundled configs).
Each comes in two forms: a shared volume at /mnt/shared, and S3 with no shared disk (``*-s3.yaml``:
no shared mount or claim, the bucket reached through an instance role / service account or a
secret, never keys written in the file).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from jobs.resources import WORKER_ALLOCATOR_ENV

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SHARED = "/mnt/shared"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"ghcr.io/your-org/salgl:{PYPROJECT['project']['version']}"
RAY_PIN = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(path: Path, kind: str) -> dict[str, Any]:
    docs = [d for d in _load(path) if d["kind"] == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}"
    return docs[0]


def _bytes(quantity: str | int) -> float:
    """A Kubernetes quantity ("10Gi", "8000000000") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert match, quantity
    return float(match.group(1)) * units.get(match.group(2), 1)


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS, GPU workers)


LAUNCHERS = ["aws-gpu.yaml", "aws-gpu-s3.yaml"]


@pytest.fixture(scope="module", params=LAUNCHERS)
def launcher(request) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / request.param).read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_matches_the_schema_shipped_with_ray(launcher, ray_schema) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(launcher, ray_schema)
    validate_config(prepare_config(copy.deepcopy(launcher)))  # what `ray up` runs before launching


def test_the_schema_check_rejects_a_broken_launcher_config(launcher, ray_schema) -> None:
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu_worker"]["instance_type"] = "g5.2xlarge"  # misplaced key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_launcher_has_gpu_workers_and_the_project(launcher) -> None:
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t.get("max_workers", 0) >= 1 for t in gpu_types)
    assert launcher["docker"]["image"] == IMAGE
    # The checkout is synced to the nodes and installed from there (pins come from pyproject).
    mounts = launcher["file_mounts"]
    src = next(remote for remote, local in mounts.items() if local == ".")
    assert (ROOT / "pyproject.toml").is_file()
    assert any(f"-e {src}" in cmd for cmd in launcher["setup_commands"])
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c and "--object-store-memory" in c for c in starts if "ray start" in c)
    # Jobs (and Tune trials on GPU nodes) reach the head's MLflow server by its private address.
    head_start = next(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I" in head_start and ":5000" in head_start
    server = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    assert "--port 5000" in server and "--host 0.0.0.0" in server


def test_shared_launcher_mounts_the_shared_filesystem_everywhere() -> None:
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert any(f"/mnt/shared:{SHARED}" in opt for opt in launcher["docker"]["run_options"])
    assert any(SHARED in cmd and "mount" in cmd for cmd in launcher["initialization_commands"])
    assert any("mlflow server" in c and SHARED in c for c in launcher["head_start_ray_commands"])


def test_s3_launcher_has_no_shared_disk_and_reaches_the_bucket_by_instance_roles() -> None:
    launcher = yaml.safe_load((CLUSTER / "aws-gpu-s3.yaml").read_text())
    values = json.dumps(launcher)  # what the launcher runs, comments left out
    assert SHARED not in values and "nfs" not in values.lower() and "efs" not in values.lower()
    for name, node in launcher["available_node_types"].items():
        if node["resources"].get("GPU", 0) >= 1:  # the head gets Ray's default role (EC2 and S3)
            assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # The MLflow database on the head's disk, in a host folder mounted into the container.
    server = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    db_dir = re.search(r"sqlite:///(/\S+)/mlflow\.db", server).group(1)
    assert any(opt.endswith(f":{db_dir}") for opt in launcher["docker"]["run_options"])
    assert re.search(r"--artifacts-destination s3://\S+", server)


# ---------------------------------------------------------------------------------------------
# KubeRay


def _cluster_specs(variant: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield f"RayCluster{variant}", _one(KUBERAY / f"raycluster{variant}.yaml", "RayCluster")["spec"]
    yield f"RayJob{variant}", _one(KUBERAY / f"rayjob{variant}.yaml", "RayJob")["spec"]["rayClusterSpec"]


def _groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


@pytest.mark.parametrize("path, kind", [
    ("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
    ("mlflow.yaml", "Deployment"), ("mlflow.yaml", "Service"), ("shared-storage.yaml", "PersistentVolumeClaim"),
    ("raycluster-s3.yaml", "RayCluster"), ("rayjob-s3.yaml", "RayJob"), ("mlflow-s3.yaml", "Deployment"),
    ("mlflow-s3.yaml", "Service"), ("mlflow-s3.yaml", "PersistentVolumeClaim"), ("s3-access.yaml", "ServiceAccount"),
])
def test_manifests_have_the_required_top_level_fields(path: str, kind: str) -> None:
    doc = _one(KUBERAY / path, kind)
    assert doc["apiVersion"] == {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "Deployment": "apps/v1"}.get(kind, "v1")
    assert doc["metadata"]["name"].startswith("salgl")
    if kind != "ServiceAccount":  # the one kind without a spec
        assert isinstance(doc["spec"], dict) and doc["spec"]


@pytest.mark.parametrize("kind, spec", [*_cluster_specs(), *_cluster_specs("-s3")], ids=lambda v: v if isinstance(v, str) else "")
def test_ray_pods_name_the_image_resources_gpus_and_object_store(kind: str, spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_PIN
    assert spec["authOptions"]["mode"] == "token"
    gpu_groups = 0
    for name, group in _groups(spec):
        params = group["rayStartParams"]
        store = int(params["object-store-memory"])
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == IMAGE, (kind, name)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["cpu"] and limits["memory"] and requests["cpu"] and requests["memory"]
        assert store < _bytes(limits["memory"]), (kind, name, "object store must fit in the pod's memory")
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and _bytes(shm["emptyDir"]["sizeLimit"]) >= store
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert int(params.get("num-gpus", gpus)) == gpus, (kind, name)
        if name == "head":
            assert gpus == 0 and params["dashboard-host"] == "0.0.0.0"
        else:
            assert gpus >= 1 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            gpu_groups += 1
    assert gpu_groups >= 1


def _pod_specs(variant: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for kind, spec in _cluster_specs(variant):
        for name, group in _groups(spec):
            yield f"{kind}/{name}", group["template"]["spec"]
    yield f"mlflow{variant}", _one(KUBERAY / f"mlflow{variant}.yaml", "Deployment")["spec"]["template"]["spec"]


def test_every_pod_mounts_the_shared_volume() -> None:
    claim = _one(KUBERAY / "shared-storage.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for where, pod in _pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = next(n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"])
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert mounts.get(shared) == SHARED, where
        assert all(c["image"] == IMAGE for c in pod["containers"]), where


def test_mlflow_server_keeps_its_store_and_artifacts_on_the_shared_volume() -> None:
    (container,) = _one(KUBERAY / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert f"sqlite:///{SHARED}/" in command and f"--artifacts-destination {SHARED}/" in command
    service = _one(KUBERAY / "mlflow.yaml", "Service")
    assert service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"] == 5000


def test_s3_pods_mount_no_shared_volume_and_take_the_bucket_from_a_role_or_a_secret() -> None:
    names = {d["metadata"]["name"] for path in KUBERAY.glob("*-s3.yaml") for d in _load(path)}
    assert "salgl-shared" not in names
    account = _one(KUBERAY / "s3-access.yaml", "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for where, pod in _pod_specs("-s3"):
        assert pod["serviceAccountName"] == account["metadata"]["name"], where
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ([] if where.startswith("Ray") else ["salgl-mlflow-db"]), where
        for container in pod["containers"]:
            assert all(m["mountPath"] != SHARED for m in container.get("volumeMounts", [])), where
            (source,) = container["envFrom"]
            assert source["secretRef"]["optional"] is True, where
            assert not any(e["name"].startswith("AWS_") and "value" in e for e in container.get("env", [])), where
    # The MLflow database's disk belongs to that one pod: not a shared filesystem.
    assert _one(KUBERAY / "mlflow-s3.yaml", "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    for path in sorted(CLUSTER.rglob("*-s3.yaml")):
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", path.read_text(), re.I), path


def test_s3_mlflow_server_keeps_its_database_on_its_disk_and_artifacts_in_s3() -> None:
    pod = _one(KUBERAY / "mlflow-s3.yaml", "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = " ".join(container["args"])
    db_dir = re.search(r"sqlite:///(/\S+)/mlflow\.db", command).group(1)
    assert {"name": "db", "mountPath": db_dir} in container["volumeMounts"]
    assert re.search(r"--artifacts-destination s3://\S+", command)


@pytest.mark.parametrize("path", ["mlflow.yaml", "mlflow-s3.yaml"])
def test_mlflow_server_answers_jobs_that_name_its_service(path: str) -> None:
    # MLflow 3 refuses Host headers outside localhost and private IPs unless --allowed-hosts names them.
    from mlflow.server.security_utils import is_allowed_host_header

    (container,) = _one(KUBERAY / path, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = shlex.split(" ".join(container["args"]))
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    service = _one(KUBERAY / path, "Service")["metadata"]["name"]
    for host in (f"{service}:5000", f"{service}.default.svc.cluster.local:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


@pytest.mark.parametrize("variant, storage", [("", SHARED + "/"), ("-s3", "s3://")])
def test_rayjob_entrypoint_is_a_salgl_command_with_a_bundled_config_and_valid_overrides(variant: str, storage: str) -> None:
    from jobs.cli import COMMANDS
    from jobs.cli.train import load_config_file
    from salgl.config import load, parse_overrides

    job = _one(KUBERAY / f"rayjob{variant}.yaml", "RayJob")["spec"]
    program, command, config, *overrides = shlex.split(job["entrypoint"])
    assert program in PYPROJECT["project"]["scripts"]
    assert command in COMMANDS
    assert (ROOT / "jobs" / "configs" / f"{config}.yaml").is_file()
    cfg = load(load_config_file(config), parse_overrides(overrides))  # raises on an unknown key or bad value
    for path in (cfg.data.path, cfg.run.storage):
        assert path.startswith(storage), path
    service = _one(KUBERAY / f"mlflow{variant}.yaml", "Service")
    assert cfg.run.tracking_uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    workers = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["minReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in workers)
    assert gpus >= cfg.run.workers, "every Train worker gets a GPU"
    assert job["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]


# ---------------------------------------------------------------------------------------------
# The image and the local cluster script


def test_dockerfile_copies_files_that_exist_onto_the_pinned_ray_image() -> None:
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines()]
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{RAY_PIN}-py311"), base
    copies = [shlex.split(line)[1:] for line in lines if line.startswith("COPY ")]
    sources = [arg for args in copies for arg in args[:-1] if not arg.startswith("--")]
    assert {"pyproject.toml", "salgl/", "pipeline/", "jobs/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the project"
    assert any("pip install" in line and "-e ." in line for line in lines)


def test_image_gives_every_process_the_projects_allocator_settings() -> None:
    # The launcher and KubeRay run every Ray process in this image; the values there follow the project's.
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines()]
    env = dict(item.split("=", 1) for line in lines if line.startswith("ENV ") for item in shlex.split(line)[1:])
    assert env.items() >= WORKER_ALLOCATOR_ENV.items()


def test_local_cluster_script_parses_and_offers_start_stop_status() -> None:
    script = CLUSTER / "local_two_node.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop|status" in usage.stderr
    text = script.read_text()
    assert '"node_head": 1' in text and '"node_worker": 1' in text


def test_commands_the_configs_show_are_salgl_subcommands() -> None:
    from jobs.cli import COMMANDS

    shown = []
    for path in sorted([*CLUSTER.glob("*.yaml"), *KUBERAY.glob("*.yaml")]):
        for line in path.read_text().splitlines():
            if match := re.match(r"#\s{2,}salgl (?:submit .*?-- )?(\w+)", line):  # a command line, not prose
                shown.append((path.name, match.group(1)))
    assert len({name for name, _ in shown}) >= 4
    for name, command in shown:
        assert command in COMMANDS, (name, command)
