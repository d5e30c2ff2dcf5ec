"""Ray Job Submission for ``salgl submit`` and ``salgl jobs``: address, token, runtime env, follow.

A submitted job runs ``python -m jobs.cli COMMAND ARGS`` on the cluster inside an uploaded copy
of the project (Ray's ``working_dir``), so the cluster runs the code of this checkout without a
reinstall. Packages come from the cluster's Python unless ``pip`` requirements are asked for:
installing torch per job is minutes and gigabytes, so it is opt-in.

Token authentication is on by default in Ray 2.60. The token is looked up the way Ray itself does
(``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``, where a local
``ray start`` writes it), after an explicit ``--token-file``; it is sent as a bearer header, which
a cluster without authentication ignores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

from jobs.resources import WORKER_ALLOCATOR_ENV
from salgl.errors import UsageError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DASHBOARD_PORT = 8265
SUBMITTABLE = ("train", "tune", "evaluate", "prepare")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# gitignore-style, relative to the working directory (Ray applies the folder's .gitignore and
# .rayignore on top): data, runs and tracking stores never travel, and neither do secrets.
EXCLUDES = [".git", ".venv", "/data/", "/runs/", "/mlruns/", "*.db", "__pycache__", "*.egg-info", ".pytest_cache"]
SECRET_EXCLUDES = [
    ".env", ".env.*", "*.env", ".ray/", ".ssh/", ".aws/", ".azure/", ".kube/", ".docker/", ".config/gcloud/",
    ".netrc", ".git-credentials", ".pypirc", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key",
    "*.p12", "*.pfx", "credentials", "credentials.json", "*.credentials", "auth_token", "*.token",
]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)  # passed on to the job when set here and not given by --env
PATH_KEYS = ("data.path", "run.storage")  # overrides that must name a place every node sees


class SubmitError(UsageError):
    """A failure the user can fix (address, token, arguments): ``salgl`` prints it and exits 2."""


# ---------------------------------------------------------------------------------------------
# Where the cluster is and how to authenticate


def dashboard_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, else the local default.

    A GCS (``HOST:6379``) or Ray Client (``ray://HOST:10001``) address becomes the dashboard's
    ``http://HOST:8265``, where the Job Submission API lives.
    """
    chosen = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not chosen or chosen in ("auto", "local"):
        return DEFAULT_ADDRESS
    chosen = chosen.rstrip("/")
    if chosen.startswith(("http://", "https://")):
        return chosen
    if address and not chosen.startswith("ray://"):  # --address names the dashboard: keep its port
        return "http://" + chosen
    host = chosen.removeprefix("ray://").rsplit(":", 1)[0]
    return f"http://{host}:{DASHBOARD_PORT}"


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it was found, for error messages


def _read_token(path: Path, source: str) -> Token | None:
    if not path.is_file():
        return None
    value = path.read_text().strip()
    return Token(value, source) if value else None


def find_token(token_file: str | None = None, environ: Mapping[str, str] = os.environ) -> Token | None:
    """The cluster token: ``--token-file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    if token_file:
        token = _read_token(Path(token_file).expanduser(), f"--token-file {token_file}")
        if token is None:
            raise SubmitError(f"--token-file {token_file}: no such file, or it is empty")
        return token
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = environ["RAY_AUTH_TOKEN_PATH"]
        return _read_token(Path(path).expanduser(), f"RAY_AUTH_TOKEN_PATH={path}")
    home = Path(environ.get("HOME") or Path.home())
    return _read_token(home / ".ray" / "auth_token", "~/.ray/auth_token")


def auth_headers(token: Token | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def auth_failure_message(address: str, token: Token | None) -> str:
    how = (
        "Copy the cluster's token (on the head node: `ray get-auth-token`; on KubeRay: the cluster's "
        "auth secret) into a file and pass --token-file FILE, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH."
    )
    if token is None:
        return (
            f"the Ray cluster at {address} requires an authentication token and none was found "
            f"(looked at --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). {how}"
        )
    return f"the Ray cluster at {address} rejected the token from {token.source}. {how}"


@dataclass(frozen=True)
class Cluster:
    """A connected Job Submission client and what is needed to explain its failures."""

    client: Any  # ray.job_submission.JobSubmissionClient
    address: str
    token: Token | None

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Turn auth, connection and unknown-job failures into one-line ``SubmitError`` s."""
        with explain_failures(self.address, self.token):
            yield


@contextlib.contextmanager
def explain_failures(address: str, token: Token | None) -> Iterator[None]:
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise SubmitError(auth_failure_message(address, token)) from None
    except aiohttp.WSServerHandshakeError as err:
        if err.status in (401, 403):
            raise SubmitError(auth_failure_message(address, token)) from None
        raise
    except (ConnectionError, requests.ConnectionError, aiohttp.ClientConnectionError):
        raise SubmitError(
            f"no Ray dashboard answers at {address}. Start a cluster (`ray start --head`, or "
            "`cluster/local_two_node.sh start`), or pass --address http://HEAD:8265 / set RAY_ADDRESS."
        ) from None
    except RuntimeError as err:
        if "status code 404" in str(err) or "does not exist" in str(err):
            raise SubmitError(f"no such job at {address}: {err}") from None
        raise


def connect(address: str | None = None, token_file: str | None = None, environ: Mapping[str, str] = os.environ) -> Cluster:
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address, environ)
    token = find_token(token_file, environ)
    with explain_failures(url, token):
        client = JobSubmissionClient(url, headers=auth_headers(token))
    return Cluster(client, url, token)


# ---------------------------------------------------------------------------------------------
# What the job runs, and with what


def project_root() -> Path | None:
    """The source checkout holding ``jobs/`` (an editable install), or None for a wheel install."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "jobs" / "cli" / "__init__.py").is_file() else None


PACKAGES = ("salgl", "pipeline", "jobs")  # what a job needs of this project's code


def stage_installed_packages(folder: Path, config: str | None = None) -> Path:
    """For an installed (non-editable) salgl: copy its packages, as installed, into ``folder`` to
    upload as the job's working directory, never the current directory (which may be a home
    folder). A local ``config`` file travels beside them; returns ``folder``."""
    import importlib
    import shutil

    for name in PACKAGES:
        source = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if config:
        shutil.copy(config, folder / Path(config).name)
    return folder


def pinned_requirements(pyproject: Path) -> list[str]:
    """The project's dependencies exactly as ``pyproject.toml`` pins them."""
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def read_requirements(file: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in file.read_text().splitlines())
    return [line for line in lines if line]


def parse_env(items: Sequence[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``--env K=V`` items plus forwarded variables; the job's own Ray address is Ray's to set."""
    env = {"PYTHONUNBUFFERED": "1"}  # log lines reach `salgl submit` as they are printed
    env.update({k: environ[k] for k in FORWARDED_ENV if environ.get(k)})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
        if key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            raise SubmitError(f"--env {key}: a job connects to the cluster it runs on; pass --address to salgl submit instead")
        env[key] = value
    return env


def runtime_env(working_dir: Path, env_vars: Mapping[str, str], pip: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime env: every worker process of the job starts with its ``env_vars``, the
    allocator settings of ``jobs.resources.WORKER_ALLOCATOR_ENV`` under the user's ``--env``."""
    env_vars = {**WORKER_ALLOCATOR_ENV, **env_vars}
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": [*EXCLUDES, *SECRET_EXCLUDES], "env_vars": env_vars}
    if pip:
        env["pip"] = {"packages": list(pip), "pip_check": False}
    return env


def check_upload_size(working_dir: Path, excludes: Sequence[str], limit_mib: float) -> None:
    """Refuse a working directory whose upload (what Ray's packaging takes, after the excludes and
    ignore files) is over ``limit_mib``, naming its largest files: a dataset or a run folder left
    in it would otherwise be zipped into every job (Ray itself stops at 512 MiB)."""
    from pipeline.ray_compat import files_ray_would_upload

    files = files_ray_would_upload(working_dir, list(excludes))
    total = sum(size for _, size in files)
    if total <= limit_mib * 2**20:
        return
    largest = ", ".join(f"{path.relative_to(working_dir)} ({size / 2**20:.0f} MiB)"
                        for path, size in sorted(files, key=lambda item: -item[1])[:3])
    raise SubmitError(
        f"the job would upload {total / 2**20:.0f} MiB from {working_dir} (largest: {largest}), over "
        f"--max-upload-mib {limit_mib:g}: list what the job does not need in .rayignore or .gitignore, "
        "or pass --force"
    )


def localize_config(args: Sequence[str], working_dir: Path) -> list[str]:
    """A local YAML config given first travels with the working directory: name it relative to it."""
    if not args or "=" in args[0] or not args[0].endswith((".yaml", ".yml")) or not Path(args[0]).is_file():
        return list(args)
    path = Path(args[0]).resolve()
    if not path.is_relative_to(working_dir.resolve()):
        raise SubmitError(
            f"config {args[0]} is outside the uploaded folder {working_dir}: move it there, or pass --working-dir"
        )
    return [path.relative_to(working_dir.resolve()).as_posix(), *args[1:]]


def local_path_warnings(args: Sequence[str]) -> list[str]:
    """Relative data / storage paths would land in the job's throwaway copy of the working directory."""
    warnings = []
    for item in args:
        key, sep, value = item.partition("=")
        if sep and key in PATH_KEYS and value and "://" not in value and not Path(value).is_absolute():
            warnings.append(
                f"{key}={value} is relative: on the cluster it resolves inside the job's temporary copy of the "
                "working directory. Use an absolute path on storage every node sees (a shared mount)."
            )
    return warnings


def entrypoint(command: str, args: Sequence[str]) -> str:
    """The shell command the job runs: the CLI of the uploaded checkout, with the cluster's Python."""
    from jobs.cli import COMMANDS

    if command not in SUBMITTABLE:
        raise SubmitError(f"cannot submit {command!r}: expected one of {', '.join(SUBMITTABLE)}")
    if command not in COMMANDS:
        raise SubmitError(f"`salgl {command}` does not exist in this checkout (available: {', '.join(COMMANDS)})")
    return shlex.join(["python", "-m", "jobs.cli", command, *args])


def new_submission_id(command: str) -> str:
    return f"salgl-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------------------------------------
# Submit, follow, wait


def submit(cluster: Cluster, command: str, args: Sequence[str], env: Mapping[str, Any]) -> str:
    """Submit ``salgl COMMAND ARGS`` with runtime env ``env``; returns the submission id."""
    with cluster.explained():
        return cluster.client.submit_job(
            entrypoint=entrypoint(command, args),
            runtime_env=dict(env),
            submission_id=new_submission_id(command),
            metadata={"salgl_command": command},
        )


async def _tail(cluster: Cluster, job_id: str, out: TextIO) -> None:
    async for chunk in cluster.client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def stream_logs(cluster: Cluster, job_id: str, out: TextIO = sys.stdout) -> None:
    """Print the job's output as it comes, until the job ends."""
    with cluster.explained():
        try:
            asyncio.run(_tail(cluster, job_id, out))
        except RuntimeError as err:  # the log socket dropped: fall back to waiting on the status
            if "WebSocket" not in str(err):
                raise
            print(f"[salgl] log stream interrupted ({err}); waiting for the job to end", file=sys.stderr)


def wait_for_end(cluster: Cluster, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> Any:
    """The job's details once it reaches SUCCEEDED, FAILED or STOPPED (polls the dashboard)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with cluster.explained():
        while True:
            info = cluster.client.get_job_info(job_id)
            if str(info.status) in TERMINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise SubmitError(f"job {job_id} still {info.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)  # polling a remote service, not synchronising threads


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1
