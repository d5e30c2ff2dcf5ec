"""``salgl jobs list | status ID | logs ID [--follow] | stop ID`` on a Ray cluster's Job Submission API."""

from __future__ import annotations

import argparse
import time
from typing import Any

from jobs.cli.submit import add_cluster_options, explain


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every job the cluster knows, newest first")
    add_cluster_options(listing)
    for name, help_text in (("status", "a job's status and message"), ("logs", "a job's output"), ("stop", "stop a running job")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("job_id", metavar="ID", help="submission id (salgl-...) or Ray job id")
        add_cluster_options(action)
        if name == "logs":
            action.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=explain(run))


def run(args: argparse.Namespace) -> int:
    from jobs.submission.client import connect

    cluster = connect(args.address, args.token_file)
    return {"list": list_jobs, "status": show_status, "logs": show_logs, "stop": stop_job}[args.action](cluster, args)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def list_jobs(cluster: Any, args: argparse.Namespace) -> int:
    with cluster.explained():
        jobs = sorted(cluster.client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    print(f"{'ID':<40} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
    for job in jobs:
        print(f"{job.submission_id or job.job_id or '-':<40} {str(job.status):<10} {_when(job.start_time):<20} {job.entrypoint[:80]}")
    return 0


def show_status(cluster: Any, args: argparse.Namespace) -> int:
    with cluster.explained():
        info = cluster.client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    if info.message:
        print(f"  message: {info.message}")
    return 0


def show_logs(cluster: Any, args: argparse.Namespace) -> int:
    from jobs.submission.client import stream_logs

    if args.follow:
        stream_logs(cluster, args.job_id)
        return 0
    with cluster.explained():
        print(cluster.client.get_job_logs(args.job_id), end="")
    return 0


def stop_job(cluster: Any, args: argparse.Namespace) -> int:
    with cluster.explained():
        stopped = cluster.client.stop_job(args.job_id)
    print(f"{args.job_id}: " + ("stop requested" if stopped else "was not running"))
    return 0
