"""The on-disk dataset format: parquet shards plus a JSON manifest (SPEC section 4).

A dataset is a folder, or a prefix of an object store (``s3://bucket/data/NAME``, ``gs://``,
``abfs://``: the same layout, written and read through pyarrow's filesystems)::

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

This module is plain pyarrow: no Ray, so converters and tests run anywhere. Object-store URIs
resolve as ``jobs.storage`` resolves a run folder's (credentials from the store's usual environment).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from salgl.errors import AlreadyExists, BadValue, CorruptFile, NotFound, SalglError, UsageError
from salgl.sparse_labels import Csr, SparseLabels

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


# ---------------------------------------------------------------------------------------------
# Where a dataset lives: a local folder or an object-store prefix


def is_remote(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` is an object-store URI (``s3://``, ``gs://``, ``abfs://``)."""
    from jobs.storage import is_object_store

    return is_object_store(str(root))


def dataset_location(root: str | os.PathLike[str]) -> str:
    """A dataset's location as runs record it and Ray workers get it: a URI without a trailing
    slash, or an absolute local path (workers run with another working directory)."""
    return str(root).rstrip("/") if is_remote(root) else str(Path(root).expanduser().resolve())


def join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name`` for a local folder or a URI (``Path`` would fold ``s3://`` into ``s3:/``)."""
    return f"{str(root).rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


def filesystem(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``path`` and the path on it: for a URI, as ``jobs.storage`` (and so
    Ray) resolves it, one client per bucket."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    from jobs.storage import object_key

    return object_key(str(path).rstrip("/"))


# What stores answer when the caller may not read or write there (S3 through pyarrow, GCS, Azure).
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "PERMISSION_DENIED",
           "UNAUTHENTICATED", "AuthorizationFailure", "AuthenticationFailed", "credentials")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "ContainerNotFound", "bucket does not exist")


def store_error(location: str, err: BaseException) -> SalglError | None:
    """An object store's refusal as a one-line error naming ``location`` (a bucket that does not
    exist, missing or refused credentials); None for any other failure."""
    text = str(err)
    if any(mark in text for mark in _NO_BUCKET):
        return NotFound(f"{location}: the bucket does not exist (create it, or check the URI)")
    if any(mark in text for mark in _DENIED):
        return UsageError(f"{location}: the store refused access; check its credentials (AWS_ACCESS_KEY_ID / "
                          f"AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*): "
                          f"{text.splitlines()[0][:200]}")
    return None


@contextlib.contextmanager
def store_errors(location: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an object store's refusal inside the block as ``store_error``'s one line."""
    try:
        yield
    except OSError as err:
        mapped = None if isinstance(err, FileNotFoundError) else store_error(str(location), err)
        if mapped is None:
            raise
        raise mapped from None


def check_bucket(root: str) -> None:
    """Raise ``NotFound`` when the bucket (or container) of the URI ``root`` does not exist."""
    fs, path = filesystem(root)
    bucket = path.split("/", 1)[0]
    with store_errors(root):
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise NotFound(f"{root}: the bucket {bucket!r} does not exist (create it, or check the URI)")


def _read_text(path: str) -> str | None:
    """The text of the file ``path`` (local or URI); None where there is no such file."""
    fs, key = filesystem(path)
    with store_errors(path):
        try:
            with fs.open_input_stream(key) as stream:
                return stream.read().decode("utf-8")
        except FileNotFoundError:
            return None


def open_text_output(root: str | os.PathLike[str], name: str) -> IO[str]:
    """``root/name`` opened for writing UTF-8 text (in an object store, the object appears on close)."""
    if not is_remote(root):
        return open(Path(root) / name, "w", encoding="utf-8")
    fs, key = filesystem(join(root, name))
    return io.TextIOWrapper(fs.open_output_stream(key), encoding="utf-8")


def open_parquet(path: str) -> pq.ParquetFile:
    """A shard, local or in an object store (ranged reads: the footer, then the row groups read)."""
    if not is_remote(path):
        return pq.ParquetFile(path)
    fs, key = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(key))


class _HashingSink:
    """A write-only file passing its bytes to ``stream`` and hashing them on the way, so a shard's
    sha256 needs no second read (of an object-store upload, a second download)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self._stream.write(data)

    def tell(self) -> int:
        return self._stream.tell()

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self.closed = True


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
    """The sha256 of a file, local or in an object store (one streamed read)."""
    digest = hashlib.sha256()
    if is_remote(path):
        fs, key = filesystem(path)
        with fs.open_input_stream(key) as stream:
            while block := stream.read(1 << 22):
                digest.update(block)
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Streams rows of one split into ``root/<split>/part-NNNNN.parquet`` shards (``root`` a
    folder or an object-store URI), hashing each shard as it is written.

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
        self.root = str(root)
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
        self._sink: _HashingSink | None = None
        if not is_remote(root):
            (Path(root) / split).mkdir(parents=True, exist_ok=True)

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
            self._sink.close()
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
        fs, key = filesystem(join(self.root, self._shard_file()))
        self._sink = _HashingSink(fs.open_output_stream(key))
        self._writer = pq.ParquetWriter(self._sink, self.schema, **self._options)
        self._shard_rows_written = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()  # an object-store upload completes here
        self._writer = None
        entry = {"file": self._shard_file(), "rows": self._shard_rows_written, "sha256": self._sink.digest.hexdigest()}
        self._shards.append(entry)


def write_manifest(root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path | str:
    """Write ``root/manifest.json`` (key order kept, no timestamps, so it is reproducible); in an
    object store one PUT, which makes it appear whole or not at all."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    if is_remote(root):
        with open_text_output(root, MANIFEST_NAME) as f:
            f.write(text)
        return join(root, MANIFEST_NAME)
    path = Path(root) / MANIFEST_NAME
    path.write_text(text, encoding="utf-8")
    return path


def has_manifest(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` (a folder or a URI) holds a manifest file."""
    if not is_remote(root):
        return (Path(root) / MANIFEST_NAME).is_file()
    fs, key = filesystem(join(root, MANIFEST_NAME))
    with store_errors(root):
        return fs.get_file_info(key).type == pafs.FileType.File


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and sanity-check ``root/manifest.json`` (a folder's or an object-store prefix's)."""
    path = join(root, MANIFEST_NAME)
    if is_remote(root):
        text = _read_text(path)
        if text is None:
            check_bucket(str(root))  # a missing bucket said as such, not as a missing manifest
    else:
        text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    if text is None:
        raise NotFound(f"{path} not found: not a prepared dataset (run `salgl prepare ...`)")
    manifest = json.loads(text)
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


def shard_paths(root: str | os.PathLike[str], split: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Absolute paths (object-store URIs for a dataset in one) of the shards of ``split``, in row
    order (``manifest``: the dataset's, where the caller has read it already)."""
    manifest = manifest or read_manifest(root)
    if split not in manifest["splits"]:
        raise NotFound(f"split {split!r} not in {dataset_location(root)}; it has {sorted(manifest['splits'])}")
    base = dataset_location(root)
    return [join(base, shard["file"]) for shard in manifest["splits"][split]["shards"]]


def shard_files(root: str | os.PathLike[str], split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of ``root`` and its shards' paths there, for pyarrow's multi-file readers
    (which take one filesystem, not a list of URIs)."""
    fs, _ = filesystem(root)
    return fs, [filesystem(path)[1] for path in shard_paths(root, split)]


def read_label_matrix(root: str | os.PathLike[str], split: str) -> np.ndarray:
    """The multi-hot labels of ``split``, (N, n) bool in row order; only the ``labels`` column is read."""
    return read_label_matrices(root, split, columns=("labels",))[0]


def read_label_matrices(
    root: str | os.PathLike[str], split: str, columns: tuple[str, ...] = ("labels", "ignore")
) -> tuple[np.ndarray, ...]:
    """Each of ``columns`` (lists of label indices) of ``split`` as an (N, n) bool matrix in row
    order: by default the labels and the ignore mask."""
    num_labels = len(read_manifest(root)["vocabulary"])
    fs, keys = shard_files(root, split)
    table = pq.ParquetDataset(keys, filesystem=fs).read(columns=list(columns))
    return tuple(_multi_hot(table.column(name), num_labels) for name in columns)


def read_sparse_labels(root: str | os.PathLike[str], split: str, manifest: Mapping[str, Any] | None = None) -> SparseLabels:
    """The labels and ignore mask of ``split`` as sparse rows (``salgl.sparse_labels``), in row
    order: read a row group at a time, so memory is O(nnz + row group x n), never N x n."""
    manifest = manifest or read_manifest(root)
    num_labels = len(manifest["vocabulary"])
    parts = [
        SparseLabels.build(_csr(batch.column("labels"), num_labels), _csr(batch.column("ignore"), num_labels), num_labels)
        for path in shard_paths(root, split, manifest)
        for batch in open_parquet(path).iter_batches(batch_size=ROW_GROUP_ROWS, columns=["labels", "ignore"])
    ]
    if not parts:
        raise NotFound(f"split {split!r} of {dataset_location(root)} holds no rows")
    return SparseLabels.concatenate(parts)


def _csr(rows: Any, num_labels: int) -> Csr:
    lengths = pc.fill_null(pc.list_value_length(rows), 0).to_numpy(zero_copy_only=False)
    return Csr.from_lists(lengths, pc.list_flatten(rows).to_numpy(zero_copy_only=False), num_labels)


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
            path = join(root, shard["file"])
            try:
                rows = open_parquet(path).metadata.num_rows
            except (OSError, pa.ArrowInvalid) as err:
                if refused := store_error(str(root), err) if is_remote(root) else None:
                    raise refused from None
                raise CorruptFile(f"{path}: {'missing' if not _exists(path) else 'not a readable parquet file'} "
                                  f"(split {name!r}; prepare the dataset again): {str(err)[:200]}") from None
            if rows != shard["rows"]:
                raise CorruptFile(f"{path}: {rows} rows, the manifest says {shard['rows']} (prepare the dataset again)")


def _exists(path: str) -> bool:
    fs, key = filesystem(path)
    return fs.get_file_info(key).type != pafs.FileType.NotFound


def verified_cache_file() -> Path:
    """Where ``verify_shards`` remembers the shards it hashed (per user, outside the dataset,
    which may be read-only or shared)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "salgl" / "verified-shards.json"


def verify_shards(root: str | os.PathLike[str], cache: Path | None = None) -> int:
    """``check_shards``, then every shard's sha256 against the manifest; raise ``CorruptFile``
    naming the first that differs. A shard hashed before with the same size and modification time
    is not read again (``cache``, default ``verified_cache_file()``), so only the first run on a
    dataset pays for reading it. Returns the number of shards hashed now.

    In an object store the cache is keyed by the shard's URI with the object's size and
    last-modified time (pyarrow's filesystems do not expose ETags): an object replaced is a new
    object with a new time, so it is hashed again (one streamed read), and the ingest's ranged reads
    are never hashed a second time. An object replaced by one of the same size within the store's
    time resolution (a second on S3) would pass unseen."""
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
            path = join(dataset_location(root), shard["file"])
            fs, key = filesystem(path)
            with store_errors(str(root)):
                info = fs.get_file_info(key)
            seen = {"size": info.size, "mtime_ns": info.mtime_ns, "sha256": shard["sha256"]}
            if known.get(str(path)) == seen:
                continue
            hashed += 1
            with store_errors(str(root)):
                digest = file_sha256(path)
            if digest != shard["sha256"]:
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
    never an arbitrary folder. In an object store: a prefix holding any object counts as existing,
    and a bucket that does not exist is refused here, before any work."""
    if is_remote(out):
        _check_remote_destination(str(out), overwrite)
        return
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


def _check_remote_destination(out: str, overwrite: bool) -> None:
    from jobs.storage import Folder

    check_bucket(out)
    with store_errors(out):
        taken = Folder(out.rstrip("/")).exists()
    if not taken:
        return
    if not overwrite:
        raise AlreadyExists(f"{out} already holds objects; pass --overwrite (overwrite=True) to replace the dataset there")
    if not is_dataset(out):
        raise BadValue(f"--overwrite replaces only a dataset that `salgl prepare` wrote (a prefix with its "
                       f"{MANIFEST_NAME}); {out} is not one, and nothing in it was touched")


def is_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder (or object-store prefix) holding a manifest this project wrote."""
    try:
        text = _read_text(join(path, MANIFEST_NAME)) if is_remote(path) else (Path(path) / MANIFEST_NAME).read_text()
        manifest = json.loads(text or "")
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "schema_version" in manifest and "splits" in manifest


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike[str], *, overwrite: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success move it to ``out``, on error delete it.

    The temporary folder is a sibling so the final move is a rename on the same file system: a
    reader sees either no dataset or a complete one, never a partial one. An object store has no
    rename: see ``_staged_in_store``.
    """
    if is_remote(out):
        with _staged_in_store(str(out).rstrip("/"), overwrite=overwrite) as prefix:
            yield prefix
        return
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


@contextlib.contextmanager
def _staged_in_store(out: str, *, overwrite: bool) -> Iterator[str]:
    """Yield ``out`` itself to write into, in an object store (no rename there): the caller writes
    the manifest last, so a reader sees no dataset until every shard is in place. An old dataset's
    manifest is deleted before anything else (no reader sees it beside new shards), then its
    objects; on an error everything written under ``out`` is deleted again, and with no manifest
    there is no dataset."""
    check_destination(out, overwrite)
    fs, key = filesystem(out)
    with store_errors(out):
        if overwrite and is_dataset(out):
            fs.delete_file(f"{key}/{MANIFEST_NAME}")
            fs.delete_dir(key)
    try:
        with store_errors(out):
            yield out
    except BaseException:
        with contextlib.suppress(OSError):  # delete_dir: delete_dir_contents would leave a folder marker
            fs.delete_dir(key)
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
