"""``salgl serve`` as a process, stopped the ways users stop it: Ctrl-C (SIGINT) and SIGTERM.

Each stop must end the command the way Ctrl-C ends every salgl command: Serve shut down, the
local Ray instance gone with every process it started, ``salgl serve: interrupted`` and exit 130.
Ray's own SIGTERM handling (``sys.exit(15)``, then a stack dump and an abort from its failure
handler) must not take over, and Serve's INFO lines stay off the console at the default verbosity.
This module starts its own Ray instance in the child, so it has no ``ray_local`` fixture.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests._data_trees import noise_pngs
from tests._servers import free_port, start_server
from tests._tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = [f"label_{i}" for i in range(10)]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (the Ray daemons and workers a driver started), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def still_running_after(pids: set[int], timeout: float) -> set[int]:
    """The processes of ``pids`` that have not exited within ``timeout`` seconds (waited on with pidfds)."""
    left = set()
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], timeout)[0]:
                left.add(pid)
        finally:
            os.close(fd)
    return left


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_server_shuts_down_cleanly_and_exits_130(tmp_path: Path, stop: signal.Signals) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint_000001", VOCABULARY)
    image = noise_pngs(tmp_path)[0].read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}/salgl/"
    console = tmp_path / "console.txt"
    with console.open("w") as out:
        server = start_server(
            [sys.executable, "-m", "jobs.cli", "serve", str(checkpoint), "--port", str(port), "--route-prefix", "/salgl"],
            url, name="salgl serve", timeout=180, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            # Its own session, as in a terminal: a test runner in the background would hand the
            # child SIGINT ignored, and Python keeps an ignored SIGINT ignored.
            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            request = urllib.request.Request(url, data=image, headers={"Content-Type": "image/png"}, method="POST")
            with urllib.request.urlopen(request, timeout=60) as response:
                record = json.loads(response.read())
            assert set(VOCABULARY) >= set(record["labels"]) and "scene" in record
            ray_processes = descendants(server.pid)
            assert ray_processes, "a local Ray instance runs below the command"
            server.send_signal(stop)
            returncode = server.wait(timeout=120)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    text = console.read_text()
    assert returncode == 130, text
    assert text.rstrip().endswith("salgl serve: interrupted" + (" (SIGTERM)" if stop == signal.SIGTERM else "")), text
    assert "received at time" not in text and "graceful_shutdown" not in text, text  # no abort dump, no raylet retries
    assert not re.search(r"\bINFO \d{4}-\d\d-\d\d", text), text  # Serve's INFO lines only at -v
    assert still_running_after(ray_processes, timeout=60) == set()
