"""What every converter shares: validate examples, record rejects, write shards and the manifest.

A converter only lists its input as :class:`Example` objects (label *names*, a file path or encoded
bytes) per split and hands them to :func:`write_dataset`. This module then, in input order:

- reads each image and checks it decodes with PIL (a small thread pool does the reading and
  decoding; results come back in input order, so the output does not depend on timing),
- maps label names to vocabulary indices,
- rejects bad rows (missing file, unreadable or corrupt image, unknown label, empty label set,
  duplicate id, malformed record) into ``rejects.jsonl`` with split, row, id and reason, or stops
  at the first one when ``strict``,
- counts rows a converter skips on purpose (COCO images without annotations, NUS-WIDE images
  without labels) as ``dropped``, so nothing disappears without a count,
- streams accepted rows into shards inside a staging folder that is moved into place at the end
  (in an object store, where nothing renames, into the destination prefix with the manifest last).

Memory is bounded by the thread pool's window of images plus one row group per split writer; the
only state that grows with the dataset is the set of seen ids (needed to detect duplicates).
"""

from __future__ import annotations

import functools
import io
import json
import os
import stat
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.shards import (
    DEFAULT_SHARD_ROWS,
    REJECTS_NAME,
    SCHEMA_VERSION,
    ShardWriter,
    check_destination,
    dataset_schema,
    is_remote,
    join,
    open_text_output,
    staged_output,
    write_manifest,
)
from salgl.errors import BadValue, Failed

T = TypeVar("T")
R = TypeVar("R")

# Reasons a row is rejected (written to rejects.jsonl) and reasons a converter drops a row on
# purpose (counted in the manifest's `dropped`). Fixed strings so they can be counted and grepped.
MISSING_FILE = "missing file"
UNREADABLE_FILE = "unreadable file"
CORRUPT_IMAGE = "corrupt image"
UNKNOWN_LABEL = "unknown label"
EMPTY_LABELS = "empty label set"
DUPLICATE_ID = "duplicate id"
MALFORMED = "malformed record"
NOT_A_FILE = "not a regular file"
TOO_LARGE = "image too large"
OUTSIDE_ROOT = "outside the image root"

# Images above this many pixels are rejected (TOO_LARGE): PIL refuses twice this as a
# decompression bomb, and every epoch would decode such an image in full again.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Example:
    """One input row before validation.

    ``labels`` and ``ignore`` are label names. Exactly one of ``path`` (a file read as is) and
    ``image`` (already-encoded bytes) is set, unless ``error`` says why the record is unusable.
    ``dropped`` marks a row the converter skips on purpose, with the reason.
    """

    id: str
    labels: Sequence[str] = ()
    ignore: Sequence[str] = ()
    path: str | None = None
    image: bytes | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    dropped: str | None = None


@dataclass
class SplitStats:
    rows: int = 0
    rejects: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    reject_reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class PrepareResult:
    """What :func:`write_dataset` produced: the final folder (or object-store URI), its manifest
    and per-split counts."""

    out: Path | str
    manifest: dict[str, Any]
    stats: dict[str, SplitStats]

    def summary(self) -> str:
        lines = [f"{self.manifest['source']['converter']} -> {self.out}"]
        for split, stats in self.stats.items():
            shards = len(self.manifest["splits"][split]["shards"])
            line = f"  {split}: {stats.rows} rows in {shards} shard(s), {stats.rejects} rejected"
            if stats.reject_reasons:
                line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(stats.reject_reasons.items())) + ")"
            dropped = sum(stats.dropped.values())
            line += f", {dropped} dropped"
            if dropped:
                line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(stats.dropped.items())) + ")"
            lines.append(line)
        if any(s.rejects for s in self.stats.values()):
            lines.append(f"  rejected rows and reasons: {join(self.out, REJECTS_NAME)}")
        return "\n".join(lines)


class RejectedInput(Failed):
    """Raised in strict mode at the first bad row; carries the reject record."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)
        where = f"split {record['split']!r}, row {record['row']}, id {record['id']!r}"
        super().__init__(f"bad input ({where}): {record['reason']}; --strict: nothing written")


def check_image(data: bytes) -> str | None:
    """Return ``None`` when ``data`` is a complete, decodable image, else the reason it is not.

    ``verify()`` checks the container; a full ``load()`` catches truncated pixel data, which
    ``verify()`` alone misses for JPEG. JPEGs decode in draft mode (DCT scaling), which still reads
    every entropy-coded byte but costs a fraction of a full decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return f"{TOO_LARGE}: {img.width} x {img.height} pixels, more than {MAX_PIXELS:,}"
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except UnidentifiedImageError:  # its message holds an object address: not reproducible
        return f"{CORRUPT_IMAGE}: not a recognised image format"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{CORRUPT_IMAGE}: {type(exc).__name__}: {exc}"
    return None


def shrink(data: bytes, max_side: int) -> bytes:
    """The image re-encoded with its longer side at most ``max_side`` (aspect kept), in its own
    format (JPEG at quality 95); unchanged bytes when it is already small enough, so a dataset
    converted with a limit above every image is byte-identical to one without."""
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= max_side:
            return data
        fmt = img.format if img.format in ("JPEG", "PNG", "WEBP") else "PNG"
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        small = img.convert("RGB") if fmt == "JPEG" and img.mode not in ("RGB", "L") else img
        small = small.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.save(out, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return out.getvalue()


def _load(example: Example, max_side: int | None = None) -> tuple[bytes | None, str | None]:
    """Read and check one example's image: (bytes, None) or (None, reason); with ``max_side``,
    downsized (``shrink``) so that huge images are not decoded in full again every epoch."""
    if example.error is not None or example.dropped is not None:
        return None, None
    data = example.image
    if data is None:
        if example.path is None:
            return None, f"{MALFORMED}: no image path"
        try:
            if not stat.S_ISREG(os.stat(example.path).st_mode):  # a FIFO would hang, /dev/zero never end
                return None, f"{NOT_A_FILE}: {example.path}"
            data = Path(example.path).read_bytes()
        except FileNotFoundError:
            return None, f"{MISSING_FILE}: {example.path}"
        except OSError as exc:
            return None, f"{UNREADABLE_FILE}: {example.path}: {exc.strerror or exc}"
    reason = check_image(data)
    if reason:
        return None, reason
    return (shrink(data, max_side) if max_side else data), None


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in input order, at most ``window`` in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (an error, strict mode): do not finish the queued work
            for future in pending:
                future.cancel()


def _label_indices(names: Sequence[str], index: Mapping[str, int]) -> tuple[list[int] | None, str | None]:
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        return None, f"{UNKNOWN_LABEL}: " + ", ".join(repr(n) for n in unknown)
    return sorted({index[n] for n in names}), None


@dataclass
class _SplitWriter:
    """Validates and writes the rows of one split; collects its counts and label frequencies."""

    split: str
    writer: ShardWriter
    index: Mapping[str, int]
    rejects: Any  # the open rejects.jsonl
    strict: bool
    stats: SplitStats = field(default_factory=SplitStats)
    seen: set[str] = field(default_factory=set)
    frequencies: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.frequencies = [0] * len(self.index)

    def add(self, row: int, example: Example, data: bytes | None, reason: str | None) -> None:
        if example.dropped is not None:
            self.stats.dropped[example.dropped] += 1
            return
        reason = example.error or reason
        labels, ignore = None, None
        if reason is None:
            labels, reason = _label_indices(example.labels, self.index)
        if reason is None:
            ignore, reason = _label_indices(example.ignore, self.index)
        if reason is None and not labels and not ignore:
            reason = EMPTY_LABELS
        if reason is None and example.id in self.seen:
            reason = DUPLICATE_ID
        if reason is not None:
            self._reject(row, example, reason)
            return
        self.seen.add(example.id)
        for i in labels:
            self.frequencies[i] += 1
        self.writer.write({"image": data, "labels": labels, "id": example.id, "ignore": ignore, **example.extra})
        self.stats.rows += 1

    def _reject(self, row: int, example: Example, reason: str) -> None:
        record = {"split": self.split, "row": row, "id": example.id, "reason": reason}
        if example.path is not None:
            record["path"] = example.path
        if self.strict:
            raise RejectedInput(record)
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stats.rejects += 1
        self.stats.reject_reasons[reason.split(":")[0]] += 1


def _load_pair(example: Example, max_side: int | None = None) -> tuple[Example, tuple[bytes | None, str | None]]:
    return example, _load(example, max_side)


def _write_split(
    staging: Path | str, split: str, examples: Iterable[Example], *, index: Mapping[str, int], schema: Any,
    rejects: Any, strict: bool, shard_rows: int, workers: int, total: int | None, progress: bool,
    max_side: int | None = None,
) -> tuple[list[dict[str, Any]], _SplitWriter]:
    """Stream one split into its shards; returns the shard entries and the split's counts."""
    with ShardWriter(staging, split, shard_rows=shard_rows, schema=schema) as writer:
        target = _SplitWriter(split, writer, index, rejects, strict)
        load = functools.partial(_load_pair, max_side=max_side)
        loaded = ordered_map(load, examples, workers=workers, window=4 * workers)
        bar = tqdm(total=total, desc=f"prepare {split}", unit="img", disable=not progress, dynamic_ncols=True)
        with bar:
            for row, (example, (data, reason)) in enumerate(loaded):
                target.add(row, example, data, reason)
                bar.update()
        return writer.close(), target


def write_dataset(
    out: str | os.PathLike[str],
    splits: Mapping[str, Iterable[Example]],
    *,
    vocabulary: Sequence[str],
    source: Mapping[str, Any],
    description: str,
    extra_columns: Sequence[str] = (),
    shard_rows: int = DEFAULT_SHARD_ROWS,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    totals: Mapping[str, int] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    max_side: int | None = None,
) -> PrepareResult:
    """Validate and write ``splits`` (name -> examples, consumed once, in order) as a dataset.

    ``source`` is ``{"converter": name, "parameters": {...}}``; ``totals`` (rows per split, when
    known) only sizes the progress bars; ``inputs`` are the files and folders the examples are
    read from, which ``out`` must not hold (``--overwrite`` would delete them); ``max_side``
    downsizes larger images (``shrink``). Raises :class:`RejectedInput` in strict mode and
    ``FileExistsError`` for an existing destination without ``overwrite``; either way no dataset
    (and no partial one) is left at ``out``.
    """
    if len(set(vocabulary)) != len(vocabulary):
        raise BadValue("vocabulary has repeated names")
    if max_side is not None and max_side < 8:
        raise BadValue(f"max side must be at least 8 pixels, got {max_side}")
    out = str(out).rstrip("/") if is_remote(out) else Path(out)
    check_destination(out, overwrite, inputs)  # fail before any work
    workers = workers or min(8, os.cpu_count() or 1)
    index = {name: i for i, name in enumerate(vocabulary)}
    shards, targets = {}, {}
    with staged_output(out, overwrite=overwrite, inputs=inputs) as staging:
        with open_text_output(staging, REJECTS_NAME) as rejects:
            for split, examples in splits.items():
                shards[split], targets[split] = _write_split(
                    staging, split, examples, index=index, schema=dataset_schema(extra_columns),
                    rejects=rejects, strict=strict, shard_rows=shard_rows, workers=workers,
                    total=(totals or {}).get(split), progress=progress, max_side=max_side,
                )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": dict(source),
            "description": description,
            "vocabulary": list(vocabulary),
            "splits": {split: {"rows": t.stats.rows, "shards": shards[split]} for split, t in targets.items()},
            "label_frequencies": {split: t.frequencies for split, t in targets.items()},
            "rejects": {split: t.stats.rejects for split, t in targets.items()},
            "dropped": {split: dict(sorted(t.stats.dropped.items())) for split, t in targets.items()},
            "extra_columns": list(extra_columns),
            **({"max_side": max_side} if max_side else {}),
        }
        write_manifest(staging, manifest)
    return PrepareResult(out=out, manifest=manifest, stats={split: t.stats for split, t in targets.items()})
