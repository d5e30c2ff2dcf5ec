"""Write a file so that a concurrent reader sees either no file or the whole of it."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A new empty file in ``path``'s folder for the block to fill by name (a compiler's ``-o``),
    renamed onto ``path`` when the block ends without an error, removed when it raises.

    Made with the permissions of a plain ``open`` (the umask's), not ``mkstemp``'s owner-only ones:
    run records and results on shared storage stay readable as before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` fills a temporary file in ``path``'s folder, which is then renamed onto ``path``
    (concurrent workers never read half a file). Errors propagate; no temporary file is left."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def write_text_atomic(path: Path, text: str, *, encoding: str = "utf-8") -> None:
    """``write_atomic`` for text."""
    write_atomic(path, lambda handle: handle.write(text.encode(encoding)))
