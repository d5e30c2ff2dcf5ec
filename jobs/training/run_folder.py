"""A run's folder: its name, where it lives (a path or an object-store URI, ``jobs.storage``), its
record (``salgl_run.json``) and the local folder its log is written in while it runs."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

from jobs.logs import LOG_FILE
from jobs.storage import Folder, resolve_storage
from salgl.config import Config
from salgl.errors import NotFound

# The run's own lines keep the logger name they had in salgl.log before the driver was split.
log = logging.getLogger("jobs.training.driver")

RUN_FILE = "salgl_run.json"


def new_run_name(prefix: str = "salgl") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def storage_root(cfg: Config) -> str:
    """``run.storage`` as Ray Train gets it: an absolute path (Ray workers run with another working
    directory) or an object-store URI (``jobs.storage``)."""
    return resolve_storage(cfg.run.storage)


def write_run_file(run_dir: Folder, record: Mapping[str, Any]) -> None:
    run_dir.write_text(RUN_FILE, json.dumps(record, indent=1))


def read_run_file(run_dir: Folder) -> dict[str, Any]:
    return json.loads(run_dir.read_text(RUN_FILE))


def find_run(run: str, storage: str) -> Folder:
    """``--resume RUN``: a run name under the storage folder, or a run folder (a path or URI)."""
    for candidate in (Folder(resolve_storage(run)), Folder(storage) / run):
        if candidate.is_file(RUN_FILE):
            return candidate
    raise NotFound(f"no salgl run named {run!r} (looked for {RUN_FILE} in {run} and {Folder(storage) / run})")


def local_folder(run_dir: Folder) -> Path:
    """Where a run's log and progress file are written while it runs: its own folder, or for a run
    in an object store (which cannot append) a folder of the same name in the local cache; the log
    is copied to the run folder as the run ends (``upload_log``)."""
    if not run_dir.remote:
        return run_dir.local_path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    scheme, path = run_dir.location.split("://", 1)
    return cache / "salgl" / "runs" / scheme / path


def upload_log(run_dir: Folder, local_dir: Path) -> None:
    if run_dir.remote and (local_dir / LOG_FILE).is_file():
        try:
            run_dir.upload(LOG_FILE, local_dir / LOG_FILE)
        except OSError as err:  # the run's own outcome matters more than its log's copy
            log.warning(f"could not copy {local_dir / LOG_FILE} to {run_dir}: {err}")
