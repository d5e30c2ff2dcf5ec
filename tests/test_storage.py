"""``jobs.storage``: salgl's keys in an object store are the paths pyarrow, and so Ray Train, resolves
from the same URI. Opening an abfs or gs filesystem reads no credentials and makes no connection
until a file is touched, so these need no network. The run in a real (S3-compatible) store is
tests/test_object_storage.py."""

from __future__ import annotations

import pyarrow.fs
import pytest

from jobs.storage import Folder, object_key

URIS = pytest.mark.parametrize("uri", [
    "abfs://container@account.dfs.core.windows.net/runs/x",
    "abfss://container@account.dfs.core.windows.net/runs/x",
    "gs://bucket/runs/x",
], ids=["abfs", "abfss", "gs"])


@URIS
def test_a_folder_key_is_the_path_pyarrow_resolves(uri: str) -> None:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)  # what Ray Train's storage does with run.storage
    key_fs, key = object_key(uri)
    assert key == path and type(key_fs) is type(fs)
    assert object_key(str(Folder(uri) / "salgl_run.json"))[1] == f"{path}/salgl_run.json"


def test_an_abfs_key_starts_at_the_container_not_the_account() -> None:
    _, key = object_key("abfs://container@account.dfs.core.windows.net/runs/x/")
    assert key == "container/runs/x/"
    assert object_key("abfs://container@account.dfs.core.windows.net")[1] == "container"
