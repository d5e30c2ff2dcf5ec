"""``salgl submit [--address URL] [--no-wait] [--env K=V ...] [--pip | --requirements FILE] -- COMMAND ARGS``.

Runs ``salgl COMMAND ARGS`` as a Ray job on a cluster, streams its output and exits with its
outcome: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 2 when it could not be
submitted (address, token, arguments).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import Callable

EPILOG = """examples:
  salgl submit -- train jobs/configs/tiny.yaml run.storage=/shared/runs
  salgl submit --address http://head:8265 --env MLFLOW_TRACKING_URI=http://mlflow:5000 -- train default
  salgl submit --no-wait -- tune ...     then: salgl jobs logs ID --follow

Checkpoints (run.storage), data (data.path) and the MLflow store (run.tracking_uri) must name places
every node sees: an absolute path on a shared filesystem, or an MLflow server for tracking."""


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS turned into its dashboard, else http://127.0.0.1:8265)")
    p.add_argument("--token-file", help="file holding the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def explain(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Ctrl-C while following a job leaves the job running: say how to reach it (exit 130).
    A ``SubmitError`` is a usage error: ``jobs.cli.main`` prints it as one line (exit 2)."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except KeyboardInterrupt:
            print("\n[salgl] detached; the job keeps running (salgl jobs status|logs|stop ID)", file=sys.stderr)
            return 130

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit", help="run train / tune / evaluate / prepare as a job on a Ray cluster",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the job")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for the job (repeatable); MLFLOW_TRACKING_URI is passed on when set")
    p.add_argument("--working-dir", help="folder uploaded as the job's working directory (default: this project's root)")
    p.add_argument("--force", action="store_true",
                   help="upload the working directory even if it is your home folder or over --max-upload-mib")
    p.add_argument("--max-upload-mib", type=float, default=100.0, metavar="MIB",
                   help="refuse (without --force) to upload a working directory larger than this (default 100)")
    deps = p.add_mutually_exclusive_group()
    deps.add_argument("--pip", action="store_true", help="install pyproject's pinned dependencies for the job (clusters without them)")
    deps.add_argument("--requirements", metavar="FILE", help="install these requirements for the job")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS", help="train | tune | evaluate | prepare and its arguments")
    p.set_defaults(func=explain(run))


def job_dependencies(args: argparse.Namespace, working_dir: Path) -> list[str]:
    from jobs.submission.client import SubmitError, pinned_requirements, read_requirements

    if args.requirements:
        if not Path(args.requirements).is_file():
            raise SubmitError(f"--requirements {args.requirements}: no such file")
        return read_requirements(Path(args.requirements))
    if args.pip:
        if not (working_dir / "pyproject.toml").is_file():
            raise SubmitError(f"--pip: no pyproject.toml in {working_dir}")
        return pinned_requirements(working_dir / "pyproject.toml")
    return []


def resolve_working_dir(args: argparse.Namespace, staging: Path, config: str | None = None) -> Path:
    """``--working-dir``, else this checkout (an editable install), else a copy of the installed
    packages made in ``staging`` (``stage_installed_packages``); a home folder only with --force."""
    from jobs.submission.client import SubmitError, project_root, stage_installed_packages

    if not args.working_dir and project_root() is None:
        return stage_installed_packages(staging, config)
    folder = Path(args.working_dir) if args.working_dir else project_root()
    if not folder.is_dir():
        raise SubmitError(f"--working-dir {folder}: not a folder")
    folder = folder.resolve()
    home = Path.home().resolve()
    if (folder == home or folder in home.parents) and not args.force:
        raise SubmitError(f"the job would upload {folder}, which holds your home folder: run from the project's folder, "
                          "or name it with --working-dir (--force uploads it anyway)")
    return folder


def run(args: argparse.Namespace) -> int:
    from jobs.submission import client as sj

    job = args.job[1:] if args.job[:1] == ["--"] else list(args.job)
    if not job:
        raise sj.SubmitError("name what to run after --, for example: salgl submit -- train jobs/configs/tiny.yaml")
    command, job_args = job[0], job[1:]
    with tempfile.TemporaryDirectory(prefix="salgl-job-") as staging:  # removed once the job is uploaded
        return submit_and_follow(args, command, job_args, Path(staging))


def submit_and_follow(args: argparse.Namespace, command: str, job_args: list[str], staging: Path) -> int:
    from jobs.submission import client as sj

    local_config = job_args[0] if job_args and job_args[0].endswith((".yaml", ".yml")) and Path(job_args[0]).is_file() else None
    working_dir = resolve_working_dir(args, staging, local_config if command != "prepare" else None)
    if command != "prepare":
        if working_dir != staging:
            job_args = sj.localize_config(job_args, working_dir)
        elif local_config:  # copied to the staged folder's top (stage_installed_packages)
            job_args = [Path(local_config).name, *job_args[1:]]
    sj.entrypoint(command, job_args)  # fail on an unknown command before connecting
    for warning in sj.local_path_warnings(job_args):
        print(f"[salgl] warning: {warning}", file=sys.stderr)
    env = sj.runtime_env(working_dir, sj.parse_env(args.env), job_dependencies(args, working_dir))
    if not args.force:
        sj.check_upload_size(working_dir, env["excludes"], args.max_upload_mib)
    cluster = sj.connect(args.address, args.token_file)
    job_id = sj.submit(cluster, command, job_args, env)
    print(f"[salgl] submitted {job_id} to {cluster.address}", flush=True)
    if args.no_wait:
        print(f"[salgl] follow with: salgl jobs logs {job_id} --follow   (status: salgl jobs status {job_id})")
        return 0
    sj.stream_logs(cluster, job_id)
    info = sj.wait_for_end(cluster, job_id, timeout_s=60)
    # Ray's message on failure repeats the log's tail, already streamed above: keep its first line.
    reason = (info.message or "").splitlines()[0] if str(info.status) != "SUCCEEDED" and info.message else ""
    print(f"[salgl] job {job_id} {info.status}" + (f": {reason}" if reason else ""), flush=True)
    return sj.exit_code(str(info.status))
