"""The on-disk dataset format: parquet shards plus a JSON manifest (SPEC section 4).

A dataset is a folder::

    DIR/manifest.json
    DIR/rejects.jsonl                      # bad input rows, one JSON object a line (may be empty)
    DIR/<split>/part-00000.parquet ...     # one row per image

Row columns: ``image`` (binary, the encoded bytes as stored on disk), ``labels`` (list<int32>,
sorted label indices), ``id`` (string, unique per split), ``ignore`` (list<int32>, label indices
excluded from that image's AP; always present, empty when none) and any extra columns the manifest
lists in ``extra_columns`` (the mosaic's ``scene``, int32, and, in its context design,
``degraded``, an int32 bitmask over label indices).

Writing is deterministic: rows keep their input order, the parquet writer settings are fixed here
and nothing time-dependent goes into a file, so the same input gives byte-identical shards and
checksums (for a given pyarrow version, which parquet stamps into every file).

This module is plain pyarrow: no Ray, so converters and tests run anywhere.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from salgl.errors import AlreadyExists, BadValue, CorruptFile, NotFound

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
DEFAULT_SHARD_ROWS = 2048
# Rows per parquet row group: a reader decodes one row group at a time, so this bounds the memory
# of both writer and reader (256 JPEGs of ~100 KB is ~25 MB) independently of the shard size.
ROW_GROUP_ROWS = 256

BASE_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("labels", pa.list_(pa.int32())),
        ("id", pa.string()),
        ("ignore", pa.list_(pa.int32())),
    ]
)
# Types of the optional columns a converter may add; the manifest names the ones present.
EXTRA_COLUMN_TYPES: dict[str, pa.DataType] = {"scene": pa.int32(), "degraded": pa.int32()}


def dataset_schema(extra_columns: Sequence[str] = ()) -> pa.Schema:
    """The row schema: the four base columns, then ``extra_columns`` in the given order."""
    schema = BASE_SCHEMA
    for name in extra_columns:
        schema = schema.append(pa.field(name, EXTRA_COLUMN_TYPES[name]))
    return schema


def _writer_options(schema: pa.Schema) -> dict[str, Any]:
    """Fixed writer settings, so output bytes depend only on the rows.

    Images are already compressed (JPEG/PNG), so their column is stored as is; the small columns
    get zstd. Statistics are off: min/max of image bytes would only bloat the footer.
    """
    compression = {}
    for field in schema:
        path = f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name
        compression[path] = "none" if field.name == "image" else "zstd"
    return dict(
        compression=compression,
        use_dictionary=False,
        write_statistics=False,
        write_page_index=False,
        version="2.6",
        data_page_version="1.0",
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Streams rows of one split into ``root/<split>/part-NNNNN.parquet`` shards.

    At most ``shard_rows`` rows go in a shard and at most ``row_group_rows`` rows are held in
    memory at once. ``close()`` returns the shard entries for the manifest; a split with no rows
    still gets one empty shard so readers always find a file carrying the schema.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        schema: pa.Schema = BASE_SCHEMA,
        row_group_rows: int = ROW_GROUP_ROWS,
    ) -> None:
        if shard_rows < 1:
            raise BadValue(f"shard_rows must be >= 1, got {shard_rows}")
        self.root = Path(root)
        self.split = split
        self.shard_rows = shard_rows
        self.schema = schema
        self.row_group_rows = max(1, min(row_group_rows, shard_rows))
        self.rows = 0
        self._options = _writer_options(schema)
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows_written = 0
        self._shards: list[dict[str, Any]] = []
        (self.root / split).mkdir(parents=True, exist_ok=True)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (a mapping with every schema column)."""
        for name, column in self._buffer.items():
            column.append(row[name])
        self.rows += 1
        buffered = len(self._buffer["id"])
        if buffered >= self.row_group_rows or self._shard_rows_written + buffered >= self.shard_rows:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        """Flush what is buffered, close the last shard and return ``[{file, rows, sha256}]``."""
        self._flush()
        if not self._shards and self._writer is None:
            self._open_shard()  # empty split: one empty shard
        self._close_shard()
        return list(self._shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:  # on error: release the file, the caller discards the folder
            self._writer.close()
            self._writer = None

    def _flush(self) -> None:
        if not self._buffer["id"]:
            return
        if self._writer is None:
            self._open_shard()
        table = pa.table(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self._shard_rows_written += table.num_rows
        self._buffer = {name: [] for name in self.schema.names}
        if self._shard_rows_written >= self.shard_rows:
            self._close_shard()

    def _shard_file(self) -> str:
        return f"{self.split}/part-{len(self._shards):05d}.parquet"

    def _open_shard(self) -> None:
        self._writer = pq.ParquetWriter(self.root / self._shard_file(), self.schema, **self._options)
        self._shard_rows_written = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        file = self._shard_file()
        entry = {"file": file, "rows": self._shard_rows_written, "sha256": file_sha256(self.root / file)}
        self._shards.append(entry)


def write_manifest(root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write ``root/manifest.json`` (key order kept, no timestamps, so it is reproducible)."""
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and sanity-check ``root/manifest.json``."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise NotFound(f"{path} not found: not a prepared dataset (run `salgl prepare ...`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BadValue(f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
    return manifest


def shards_digest(manifest: Mapping[str, Any]) -> str:
    """One sha256 over every shard's sha256 (splits by name, shards in row order): a dataset's
    identity, the same for a moved or copied folder and another for other bytes."""
    splits = manifest["splits"]
    shas = [shard["sha256"] for name in sorted(splits) for shard in splits[name]["shards"]]
    return hashlib.sha256("".join(shas).encode()).hexdigest()


def shard_paths(root: str | os.PathLike[str], split: str) -> list[str]:
    """Absolute paths of the shards of ``split``, in row order."""
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise NotFound(f"split {split!r} not in {Path(root)}; it has {sorted(manifest['splits'])}")
    base = Path(root).resolve()
    return [str(base / shard["file"]) for shard in manifest["splits"][split]["shards"]]


def read_label_matrix(root: str | os.PathLike[str], split: str) -> np.ndarray:
    """The multi-hot labels of ``split``, (N, n) bool in row order; only the ``labels`` column is read."""
    return read_label_matrices(root, split, columns=("labels",))[0]


def read_label_matrices(
    root: str | os.PathLike[str], split: str, columns: tuple[str, ...] = ("labels", "ignore")
) -> tuple[np.ndarray, ...]:
    """Each of ``columns`` (lists of label indices) of ``split`` as an (N, n) bool matrix in row
    order: by default the labels and the ignore mask."""
    num_labels = len(read_manifest(root)["vocabulary"])
    table = pq.ParquetDataset(shard_paths(root, split)).read(columns=list(columns))
    return tuple(_multi_hot(table.column(name), num_labels) for name in columns)


def _multi_hot(rows: Any, num_labels: int) -> np.ndarray:
    lengths = pc.fill_null(pc.list_value_length(rows), 0).to_numpy(zero_copy_only=False)
    matrix = np.zeros((len(rows), num_labels), dtype=bool)
    matrix[np.repeat(np.arange(len(rows)), lengths), pc.list_flatten(rows).to_numpy(zero_copy_only=False)] = True
    return matrix


def check_shards(root: str | os.PathLike[str]) -> None:
    """Raise ``CorruptFile`` naming the first shard that is missing, not a readable parquet file
    (a truncated copy has no footer), or holds another number of rows than the manifest says.

    Reads only each shard's footer, so it costs milliseconds per shard: cheap enough to run before
    every training run, where the same fault would otherwise surface inside a Ray Data task as
    "Parquet magic bytes not found" without the file's name. ``verify_shards`` also reads every byte.
    """
    manifest = read_manifest(root)
    for name, split in manifest["splits"].items():
        for shard in split["shards"]:
            path = Path(root) / shard["file"]
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowInvalid) as err:
                raise CorruptFile(f"{path}: {'missing' if not path.exists() else 'not a readable parquet file'} "
                                  f"(split {name!r}; prepare the dataset again): {str(err)[:200]}") from None
            if rows != shard["rows"]:
                raise CorruptFile(f"{path}: {rows} rows, the manifest says {shard['rows']} (prepare the dataset again)")


def verified_cache_file() -> Path:
    """Where ``verify_shards`` remembers the shards it hashed (per user, outside the dataset,
    which may be read-only or shared)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "salgl" / "verified-shards.json"


def verify_shards(root: str | os.PathLike[str], cache: Path | None = None) -> int:
    """``check_shards``, then every shard's sha256 against the manifest; raise ``CorruptFile``
    naming the first that differs. A shard hashed before with the same size and modification time
    is not read again (``cache``, default ``verified_cache_file()``), so only the first run on a
    dataset pays for reading it. Returns the number of shards hashed now."""
    from salgl.atomic_file import write_text_atomic

    check_shards(root)
    cache = cache or verified_cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    hashed = 0
    for name, split in read_manifest(root)["splits"].items():
        for shard in split["shards"]:
            path = (Path(root) / shard["file"]).resolve()
            stat = path.stat()
            seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": shard["sha256"]}
            if known.get(str(path)) == seen:
                continue
            hashed += 1
            if file_sha256(path) != shard["sha256"]:
                raise CorruptFile(f"{path}: its sha256 differs from the manifest (split {name!r}): the file was "
                                  "altered or damaged after `salgl prepare` wrote it; prepare the dataset again")
            known[str(path)] = seen
    if hashed:
        with contextlib.suppress(OSError):  # a read-only home: verify again next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache, json.dumps(known))
    return hashed


def check_destination(
    out: str | os.PathLike[str], overwrite: bool, inputs: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Refuse a destination that holds one of the ``inputs`` (a list file, an image or source
    folder) or is one; refuse an existing, non-empty destination unless ``overwrite``; and even
    with ``overwrite``, replace only a dataset this project wrote (a folder with its manifest),
    never an arbitrary folder."""
    out = Path(out)
    target = out.resolve()
    for source in map(Path, inputs):
        source = source.resolve()
        if source == target or target in source.parents:
            raise BadValue(f"--out {out} holds the input {source}: write the dataset to a folder of its own")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise AlreadyExists(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if not is_dataset(out):
        raise BadValue(f"--overwrite replaces only a dataset that `salgl prepare` wrote (a folder with its "
                       f"{MANIFEST_NAME}); {out} is not one, and nothing in it was touched")


def is_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a manifest this project wrote."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "schema_version" in manifest and "splits" in manifest


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike[str], *, overwrite: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success move it to ``out``, on error delete it.

    The temporary folder is a sibling so the final move is a rename on the same file system: a
    reader sees either no dataset or a complete one, never a partial one.
    """
    out = Path(out)
    check_destination(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    staging = _sibling(out, "tmp")
    try:
        yield staging
        check_destination(out, overwrite, inputs)  # something may have appeared while we worked
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sibling(out: Path, tag: str) -> Path:
    """A new empty folder ``.<name>.<tag>-<host>-<pid>-<random>`` beside ``out``, with umask
    permissions (``tempfile.mkdtemp`` would make it 0700, and the dataset would keep that after the
    move). Host and pid name its owner, so a later run can tell one left by a killed process."""
    while True:
        path = out.parent / f".{out.name}.{tag}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def remove_stale_siblings(out: Path) -> list[Path]:
    """Delete the temporary folders beside ``out`` that a process of this host left when it was
    killed (SIGKILL, a crash: what no handler sees); those of live processes, or of other hosts
    sharing the folder, stay. Returns what was removed."""
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*-*"):
        tag, _, owner = path.name[len(out.name) + 2 :].partition("-")  # "tmp", "<host>-<pid>-<random>"
        host, pid, _ = owner.rsplit("-", 2) if owner.count("-") >= 2 else ("", "", "")
        if tag in ("tmp", "old") and host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _replace(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    # Move the old dataset aside first so there is no moment with neither dataset in place
    # for longer than two renames.
    old = _sibling(out, "old")
    old.rmdir()
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
