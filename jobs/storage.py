"""Where runs live: a local (or shared) folder, or an object store (``s3://``, ``gs://``, ``abfs://``).

Ray Train writes checkpoints to either through pyarrow filesystems (``RunConfig(storage_path=)``).
salgl reads and writes a run's own files through the same filesystems (its record, the checkpoint
metadata a resume chooses from, ``diverged.json``), so ``--resume``, a restarted worker group and
the newest-complete-checkpoint scan behave the same on both. Credentials and endpoints come from
the usual environment of each store (``AWS_*`` with ``AWS_ENDPOINT_URL`` for an S3-compatible
server, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``), as for Ray itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from salgl.atomic_file import write_text_atomic
from salgl.errors import BadValue

if TYPE_CHECKING:
    import pyarrow.fs

OBJECT_STORE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://")


def is_object_store(location: str) -> bool:
    return str(location).startswith(OBJECT_STORE_SCHEMES)


def resolve_storage(location: str) -> str:
    """An object-store URI as given (without a trailing slash), any other location as an absolute
    path (Ray workers run with another working directory)."""
    location = str(location)
    if is_object_store(location):
        return location.rstrip("/")
    if "://" in location:
        raise BadValue(f"run.storage={location}: a folder every node sees, or an object-store URI "
                       f"({', '.join(s.rstrip(':/') for s in OBJECT_STORE_SCHEMES)})")
    return str(Path(location).expanduser().resolve())


@functools.lru_cache(maxsize=8)
def _filesystem(root: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """pyarrow's filesystem for a store's root URI (``scheme://bucket``) and the path it gives the
    root: the bucket, or for abfs the container (``abfs://container@account.dfs.core.windows.net``
    is ``container``). Opened once per root: an S3 client asks the store for the bucket's region."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(root)
    except (OSError, ValueError) as err:
        raise BadValue(f"cannot open {root}: {err}") from None
    return fs, path.rstrip("/")


def object_key(location: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """An object-store URI's filesystem and its path there, as ``pyarrow.fs.FileSystem.from_uri``
    (and so Ray Train) resolves it: the root's path, then the URI's path."""
    scheme, rest = location.split("://", 1)
    bucket, _, path = rest.partition("/")
    fs, root = _filesystem(f"{scheme}://{bucket}")
    return fs, f"{root}/{path}" if path else root


@dataclass(frozen=True)
class Folder:
    """A folder in run storage, local or in an object store; plain data, so Ray can ship it.

    ``location`` is an absolute local path or a URI. Object stores have no folders, only keys, so
    "exists" means "holds a file"; writes are whole objects, which an object store makes atomic.
    """

    location: str

    @property
    def remote(self) -> bool:
        return is_object_store(self.location)

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "Folder":
        return Folder(f"{self.location.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.location

    @property
    def local_path(self) -> Path:
        if self.remote:
            raise BadValue(f"{self.location} is in an object store, not a local folder")
        return Path(self.location)

    def _fs(self) -> tuple["pyarrow.fs.FileSystem", str]:
        if not self.remote:
            import pyarrow.fs

            return pyarrow.fs.LocalFileSystem(), self.location
        return object_key(self.location)

    def _key(self, name: str) -> tuple["pyarrow.fs.FileSystem", str]:
        fs, path = self._fs()
        return fs, f"{path.rstrip('/')}/{name}" if name else path

    # ------------------------------------------------------------------ files

    def size(self, name: str) -> int | None:
        """The size of a file in this folder; None when there is no such file."""
        import pyarrow.fs

        fs, key = self._key(name)
        info = fs.get_file_info(key)
        return info.size if info.type == pyarrow.fs.FileType.File else None

    def is_file(self, name: str) -> bool:
        return self.size(name) is not None

    def exists(self) -> bool:
        """Whether the folder holds anything (an object store has no empty folders)."""
        if not self.remote:
            return Path(self.location).exists()
        return bool(self.files())

    def read_bytes(self, name: str) -> bytes:
        fs, key = self._key(name)
        try:
            with fs.open_input_stream(key) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self / name}: no such file") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        if not self.remote:
            Path(self.location).mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(self.location) / name, text)
            return
        fs, key = self._key(name)
        with fs.open_output_stream(key) as stream:
            stream.write(text.encode("utf-8"))

    def sha256(self, name: str) -> str:
        fs, key = self._key(name)
        digest = hashlib.sha256()
        with fs.open_input_stream(key) as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    def delete(self, name: str) -> None:
        fs, key = self._key(name)
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(key)

    # ------------------------------------------------------------------ folders

    def subfolders(self) -> list["Folder"]:
        """The folders directly inside this one, by name."""
        import pyarrow.fs

        fs, path = self._fs()
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        except NotADirectoryError:
            return []
        return sorted((self / info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory),
                      key=lambda f: f.name)

    def files(self) -> list[str]:
        """Every file under this folder, as paths relative to it."""
        import pyarrow.fs

        fs, path = self._fs()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        base = path.rstrip("/") + "/"
        return sorted(i.path[len(base):] for i in infos if i.type == pyarrow.fs.FileType.File)

    def download(self, dest: Path) -> Path:
        """Copy every file of this folder into the local folder ``dest``."""
        import pyarrow.fs

        fs, path = self._fs()
        dest.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        return dest

    def upload(self, name: str, source: Path) -> None:
        """Copy the local file ``source`` to ``name`` in this folder."""
        import pyarrow.fs

        fs, key = self._key(name)
        if not self.remote:
            Path(key).parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(str(source), key, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)

    def move_to(self, dest: "Folder") -> None:
        """Move this folder to ``dest`` (same store): a rename where there are folders, a copy of
        every object then its deletion in an object store."""
        fs, path = self._fs()
        _, target = dest._fs()
        if not self.remote:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            return
        for rel in self.files():
            fs.copy_file(f"{path}/{rel}", f"{target}/{rel}")
        fs.delete_dir(path)


@contextlib.contextmanager
def local_copy(folder: Folder | str | os.PathLike[str]) -> Iterator[Path]:
    """A local path for ``folder``: itself when local, else a temporary download removed afterwards."""
    folder = folder if isinstance(folder, Folder) else Folder(str(folder))
    if not folder.remote:
        yield Path(folder.location)
        return
    with tempfile.TemporaryDirectory(prefix="salgl-") as tmp:
        yield folder.download(Path(tmp) / folder.name)
