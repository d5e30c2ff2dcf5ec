"""salgl.atomic_file: a file is replaced whole or not at all, and no temporary file is left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from salgl.atomic_file import atomic_path, write_atomic, write_text_atomic


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "new" / "run.json"
    write_text_atomic(path, '{"a": 1}')
    write_atomic(path, lambda handle: handle.write(b'{"a": 2}'))
    assert path.read_text() == '{"a": 2}'
    assert os.listdir(path.parent) == ["run.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    write_text_atomic(path, "old")

    def half_then_fail(handle) -> None:  # type: ignore[no-untyped-def]
        handle.write(b"ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    with pytest.raises(KeyboardInterrupt), atomic_path(path, suffix=".tmp.so") as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["run.json"]


def test_the_file_gets_the_umask_permissions_of_a_plain_open(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "atomic", "x")
    (tmp_path / "plain").write_text("x")
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("atomic") == mode("plain")
