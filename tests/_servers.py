"""Servers the integration tests start on 127.0.0.1: a free port, and a child process that is
ready once a URL answers (polled with a deadline; a child that exits early fails the test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Sequence

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, proc: subprocess.Popen, *, timeout: float = 120.0) -> None:
    """Return once ``url`` answers 2xx; raise when ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)  # readiness polling of a child process, not test synchronisation


def start_server(cmd: Sequence[str], ready_url: str, *, timeout: float = 120, name: str = "server", **popen) -> subprocess.Popen:
    """Start ``cmd`` and return once ``ready_url`` answers; fail the test if it exits or the deadline passes."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(list(cmd), **popen)
    try:
        wait_until_answering(ready_url, proc, timeout=timeout)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        pytest.fail(f"{name} did not start ({' '.join(cmd)}): {err}")
    return proc


def stop_server(proc: subprocess.Popen, *, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after 30 s; ``group``: to its whole process group (a server started
    with ``start_new_session=True`` whose workers would outlive it, as ``mlflow models serve``'s uvicorn)."""
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    send(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
