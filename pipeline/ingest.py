"""Streaming ingest with Ray Data: parquet shards -> decoded, augmented torch batches per worker.

The graph only composes the plain functions of ``pipeline.transforms`` (STYLE habit 11)::

    driver:  build_datasets(...)  ->  {"train": Dataset, "test": Dataset}
             TorchTrainer(..., datasets=..., dataset_config=data_config(...))
    worker:  shard = ray.train.get_dataset_shard("train")
             for epoch ...: for batch in iter_train_batches(shard, batch_size=b, epoch=epoch, seed=s): ...
             for batch in iter_eval_batches(ray.train.get_dataset_shard("test"), batch_size=b): ...

The unit of work is a chunk: at most ``CHUNK_ROWS`` consecutive rows of one parquet row group.
A dataset is the positions 0..N-1 of the chunk sequence, a few positions per task, mapped by one
task type that reads each chunk, decodes, augments, builds targets and emits it as one block.
Shuffling permutes the chunk index (a few bytes a chunk), never the data.

Why not ``read_parquet`` + ``random_shuffle`` / ``randomize_block_order`` + a local buffer: a
global shuffle is an all-to-all that holds the whole encoded split in the object store every epoch
(spilling to disk beyond it); a file-order shuffle plus a buffer only mixes rows of the few shards
being read at once; Ray's map tasks take whole read blocks (a row group, or a shard), which ties
decode parallelism to the shard layout; and in Ray 2.60 the default DataSourceV2 read added 3-15 s
of ``ListFiles`` to every epoch on a 2-core machine. Permuting a chunk index costs nothing, keeps
memory bounded whatever the dataset size, and draws every batch from anywhere in the split.

How Ray 2.60 runs this (read from ``ray/train/_internal/data_config.py`` and
``ray/data/_internal/iterator/stream_split_iterator.py``):

- Train V2 calls ``streaming_split(world_size, equal=True)`` once per split dataset. A
  ``SplitCoordinator`` actor re-executes the whole Dataset every time all workers start a new pass
  over their shard (one pass = one epoch), and counts the passes in its copy of the dataset's
  ``DataContext`` (the execution index).
- The chunk order and the augmentation seeds come from ``EpochSeed`` (``pipeline/seeding.py``), a
  ``RandomSeedConfig(seed, reseed_after_execution=True)`` whose execution index is shifted by
  ``start_epoch``: pass i draws the numbers of epoch ``start_epoch + i``, so every epoch gets a new
  order and new augmentations, the same seed replays the same epochs in a fresh run, and a run
  restarted from a checkpoint (Train rebuilds its worker group, the count restarts at 0) replays
  what an uninterrupted run would have drawn. The worker-side shuffle buffer is seeded by
  (seed, epoch, rank) explicitly.
- ``equal=True`` hands every worker exactly ``floor(N / W)`` rows (at most W - 1 rows of an
  epoch are dropped, different ones every epoch); ``iter_train_batches`` then drops the last
  partial batch, so every worker yields exactly ``floor(floor(N / W) / b)`` batches and the
  training collectives never wait on a worker that has run out.
- ``preserve_order=True`` (set in ``data_config``) makes the block sequence, and so the split of
  rows among workers, independent of task timing: the same seed gives every worker the same rows
  in the same order in every run.
- The evaluation split is padded to a multiple of W with copies of its first rows, marked
  ``valid = False``; with ``equal=True`` nothing is then dropped, every real row reaches exactly
  one worker once, and every worker yields the same number of batches.

Memory: a task holds one row group and one chunk's output; Ray Data's backpressure keeps a few
blocks per operator in the object store, capped by ``data_config(object_store_bytes=...)``; the
shuffle buffer holds a fixed number of rows. Nothing grows with the dataset but the chunk index
(``tests/bench/ingest.py`` measures it).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import pyarrow as pa

from pipeline import transforms
from salgl.config import DataConfig

if TYPE_CHECKING:  # torch loads in the consumers only: the data tasks and split coordinators never need it
    import torch

TRAIN_SPLIT = "train"
EVAL_SPLIT = "test"
# Rows per chunk: one output block (rows x 3 S^2 uint8 pixels, 19 MB at 448 px) stays well below
# Ray Data's 128 MB target block size, and a task (0.2-0.6 s of work) amortises its overhead. A
# chunk reads its whole parquet row group, so row groups of 256 rows read 8 times the bytes used.
CHUNK_ROWS = 32
# Chunks per data task. Ray Data 2.60's executor notices a finished task only on its next
# scheduling-loop pass (it waits up to 0.1 s for *all* running tasks, then does its bookkeeping),
# so every task leaves its process idle for ~0.2 s: next to one 32-row chunk's work (0.28 s at
# 224 px) that idles the data processes half the time. Four chunks per task, each still emitted as
# its own block, keep them busy (docs/benchmarks.md, "Ingest").
CHUNKS_PER_TASK = 4
MIN_TASKS = 8
# Default local shuffle buffer of ``iter_train_batches``, in batches (decoded uint8 rows).
SHUFFLE_BUFFER_BATCHES = 2


# ---------------------------------------------------------------------------------------------
# Manifest access (pipeline.shards owns the format)


# ``manifest``: the dataset's manifest where the caller has read it already (a training run reads
# it once as it starts), else None: read here.


def _manifest(data_dir: str, manifest: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    from pipeline.shards import read_manifest

    return read_manifest(data_dir) if manifest is None else manifest


def _shard_paths(data_dir: str, split: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    from pipeline.shards import dataset_location, join, shard_paths

    if manifest is None or split not in manifest["splits"]:
        return shard_paths(data_dir, split)  # reads the manifest; a missing split is said with the ones there are
    base = dataset_location(data_dir)
    return [join(base, shard["file"]) for shard in manifest["splits"][split]["shards"]]


def num_labels(data_dir: str, manifest: Mapping[str, Any] | None = None) -> int:
    return len(_manifest(data_dir, manifest)["vocabulary"])


# ---------------------------------------------------------------------------------------------
# Seeds


def _seed_from_context(seed_config: Any) -> int:
    """(base seed, execution index of this pass) -> one int, inside a Ray Data task."""
    from ray.data import DataContext

    st = seed_config.get_seed_tuple(data_context=DataContext.get_current())
    return int(np.random.SeedSequence([st.seed, st.execution_idx or 0]).generate_state(1, np.uint32)[0])


# ---------------------------------------------------------------------------------------------
# Chunks: the unit of work, and of shuffling


def chunk_table(
    data_dir: str, split: str, chunk_rows: int = CHUNK_ROWS, *, manifest: Mapping[str, Any] | None = None,
) -> list[tuple[str, int, int, int]]:
    """``(shard path, row group, start, stop)`` for every run of at most ``chunk_rows`` rows of
    ``split`` in storage order; a chunk never crosses a row group (the unit parquet reads). A
    shard path is an object-store URI for a dataset in one: the data tasks read it from there."""
    from pipeline.shards import open_parquet

    chunks = []
    for path in _shard_paths(data_dir, split, manifest):
        meta = open_parquet(path).metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            chunks += [(path, group, start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]
    return chunks


@functools.lru_cache(maxsize=64)
def _parquet_file(path: str) -> Any:
    """A shard opened once per process (its footer read once; from an object store, ranged reads)."""
    from pipeline.shards import open_parquet

    return open_parquet(path)


def read_chunk(chunk: tuple[str, int, int, int]) -> pa.Table:
    path, group, start, stop = chunk
    return _parquet_file(path).read_row_group(group).slice(start, stop - start)


@functools.lru_cache(maxsize=4)
def epoch_order(num_chunks: int, seed: int) -> np.ndarray:
    """The chunk order of one epoch (cached: every task of the epoch asks for it)."""
    return np.random.default_rng(seed).permutation(num_chunks)


def _decode_udf(
    batch: dict[str, np.ndarray],
    *,
    chunks: list[tuple[str, int, int, int, bool]],
    order_seed: Any,
    augment_seed: Any,
    cfg: DataConfig,
    num_labels: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Positions of this epoch's chunk sequence -> one output block per position: the chunk's
    rows, decoded and transformed.

    ``order_seed`` None keeps storage order (evaluation); otherwise position p of pass e reads
    chunk ``permutation_e[p]``. Chunks carry ``valid`` (False: padding rows of the eval split).
    A generator, so a task that maps several positions still emits chunk-sized blocks.
    """
    positions = batch["id"]
    if order_seed is not None:
        positions = epoch_order(len(chunks), _seed_from_context(order_seed))[positions]
    train = augment_seed is not None
    seed = _seed_from_context(augment_seed) if train else None
    for pos in positions:
        *chunk, valid = chunks[int(pos)]
        table = read_chunk(tuple(chunk))
        rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        rows["valid"] = np.full(table.num_rows, valid)
        # uint8 pixels: the consumer normalises (iter_*_batches), so the object store, the shuffle
        # buffer and every copy in between move a quarter of float32's bytes.
        out = transforms.transform_batch(rows, cfg=cfg, num_labels=num_labels, train=train, seed=seed, normalized=False)
        if train:
            del out["valid"]  # every training row is real
        yield out


def num_tasks(num_chunks: int) -> int:
    """Data tasks for ``num_chunks`` chunk positions: ``CHUNKS_PER_TASK`` positions per task,
    but never fewer than ``MIN_TASKS`` (while there are chunks), so small splits still decode in
    parallel."""
    return max(-(-num_chunks // CHUNKS_PER_TASK), min(num_chunks, MIN_TASKS))


# ---------------------------------------------------------------------------------------------
# Driver: datasets


def _chunk_dataset(chunks: list[tuple[str, int, int, int, bool]], *, udf_kwargs: dict[str, Any], num_cpus: float, concurrency: int | None) -> "ray.data.Dataset":  # noqa: F821
    """Chunk positions in ``num_tasks`` blocks, mapped by one task type (read + decode + transform
    fused) that emits one block per position.

    The positions are in-memory blocks (``from_items``), not a ``range`` read: Ray Data's read
    tasks ask for a whole CPU and do not fuse with a map asking for less, so on nodes with less than
    one CPU left beside the Train workers (a 1-CPU node) the read could never be scheduled and the
    job would wait forever.
    """
    import ray.data

    positions = ray.data.from_items([{"id": p} for p in range(len(chunks))], override_num_blocks=num_tasks(len(chunks)))
    return positions.map_batches(
        _decode_udf,
        fn_kwargs={"chunks": chunks, **udf_kwargs},
        batch_size=None,  # one input block = one task's positions
        batch_format="numpy",
        num_cpus=num_cpus,
        **({"concurrency": concurrency} if concurrency else {}),
    )


def train_dataset(
    data_dir: str,
    cfg: DataConfig,
    *,
    seed: int,
    split: str = TRAIN_SPLIT,
    start_epoch: int = 0,
    num_cpus: float = 0.5,
    concurrency: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    manifest: Mapping[str, Any] | None = None,
) -> "ray.data.Dataset":  # noqa: F821
    """Every pass: the split's chunks in a new random order -> read, decode, augment, lazily.

    The shuffle permutes an index of chunks (a few bytes each), never the data: memory stays
    bounded whatever the dataset size, and every epoch draws its chunks from anywhere in the split
    (not only from the few shards a file-order shuffle would be reading); ``iter_train_batches``'
    shuffle buffer then mixes rows of several chunks into each batch. ``chunk_rows`` trades mixing
    against read amplification (a chunk reads its whole row group; keep row groups small).
    ``num_cpus`` per task (fractional on small machines, so Train workers at ~0.5 CPU leave room:
    STACK.md), ``concurrency`` caps concurrent tasks (None: as many as CPUs allow).
    """
    from pipeline.seeding import EpochSeed, derive_seed

    # Pass i of this dataset draws the numbers of epoch start_epoch + i (pipeline/seeding.py), so a
    # run restarted from a checkpoint replays exactly what an uninterrupted run would have seen.
    # The stream's seed names epoch 0: the (shifted) execution index supplies the epoch.
    def reseeded(stream: str) -> EpochSeed:
        return EpochSeed(seed=derive_seed(seed, 0, stream), reseed_after_execution=True, start_epoch=start_epoch)

    chunks = [(*c, True) for c in chunk_table(data_dir, split, chunk_rows, manifest=manifest)]
    kwargs = {
        "order_seed": reseeded("order"), "augment_seed": reseeded("augment"), "cfg": cfg,
        "num_labels": num_labels(data_dir, manifest),
    }
    return _chunk_dataset(chunks, udf_kwargs=kwargs, num_cpus=num_cpus, concurrency=concurrency)


def eval_dataset(
    data_dir: str,
    cfg: DataConfig,
    *,
    num_workers: int,
    split: str = EVAL_SPLIT,
    num_cpus: float = 0.5,
    concurrency: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    manifest: Mapping[str, Any] | None = None,
) -> "ray.data.Dataset":  # noqa: F821
    """The split in storage order -> resize + normalise, padded to a multiple of ``num_workers``.

    Padding rows repeat the first rows of the split with ``valid = False``, so that
    ``streaming_split(num_workers, equal=True)`` drops nothing: drop them before scoring.
    """
    chunks = [(*c, True) for c in chunk_table(data_dir, split, chunk_rows, manifest=manifest)]
    pad = -sum(stop - start for _, _, start, stop, _ in chunks) % num_workers
    for path, group, start, stop, _ in list(chunks):  # repeat the first `pad` rows, marked invalid
        if pad <= 0:
            break
        take = min(pad, stop - start)
        chunks.append((path, group, start, start + take, False))
        pad -= take
    kwargs = {"order_seed": None, "augment_seed": None, "cfg": cfg, "num_labels": num_labels(data_dir, manifest)}
    return _chunk_dataset(chunks, udf_kwargs=kwargs, num_cpus=num_cpus, concurrency=concurrency)


def build_datasets(
    data_dir: str,
    cfg: DataConfig,
    *,
    seed: int,
    num_workers: int,
    start_epoch: int = 0,
    train_split: str = TRAIN_SPLIT,
    eval_split: str | None = EVAL_SPLIT,
    num_cpus: float = 0.5,
    concurrency: int | None = None,
) -> dict[str, "ray.data.Dataset"]:  # noqa: F821
    """``{"train": ..., "test": ...}`` for ``TorchTrainer(datasets=...)``, with ``data_config()``.

    ``num_workers`` must equal the trainer's worker count (the eval split is padded for it).
    Nothing executes here; each Train worker's pass over its shard runs the graph once.
    """
    out = {TRAIN_SPLIT: train_dataset(data_dir, cfg, seed=seed, split=train_split, start_epoch=start_epoch, num_cpus=num_cpus, concurrency=concurrency)}
    if eval_split is not None:
        out[EVAL_SPLIT] = eval_dataset(data_dir, cfg, num_workers=num_workers, split=eval_split, num_cpus=num_cpus, concurrency=concurrency)
    return out


def execution_options(*, object_store_bytes: int | None = 2 << 30, cpu: float | None = None) -> "ray.data.ExecutionOptions":  # noqa: F821
    """Deterministic block order (so the split among workers is reproducible), Ray Data's
    object-store use capped at ``object_store_bytes`` and its CPUs at ``cpu`` (None: what is left)."""
    from ray.data import ExecutionOptions, ExecutionResources

    limits = ExecutionResources(cpu=cpu, object_store_memory=object_store_bytes)
    return ExecutionOptions(resource_limits=limits, preserve_order=True)


def data_config(
    datasets_to_split: list[str] | None = None,
    *,
    object_store_bytes: int | None = 2 << 30,
    cpu: float | None = None,
) -> "ray.train.DataConfig":  # noqa: F821
    """The ``ray.train.DataConfig`` these datasets need: every dataset named is split with
    ``equal=True`` (what Train does with a split dataset) under ``execution_options``."""
    import ray.train

    options = execution_options(object_store_bytes=object_store_bytes, cpu=cpu)
    return ray.train.DataConfig(datasets_to_split=datasets_to_split or [TRAIN_SPLIT, EVAL_SPLIT], execution_options=options)


# ---------------------------------------------------------------------------------------------
# Worker: torch batches


def _collate(batch: dict[str, np.ndarray], normalize: str | None = None) -> dict[str, Any]:
    """Numeric columns -> tensors; string columns (``id``) -> ``list[str]``; uint8 ``image`` ->
    normalised float32 when ``normalize`` names the normalisation (None: left uint8, for the
    device to normalise after a 4x smaller copy).

    A batch that is a zero-copy view of an object-store block is read-only: copied, so that
    in-place ops on the tensors are safe. This runs in Ray's prefetch thread, beside the step.
    """
    import torch

    out: dict[str, Any] = {}
    for name, col in batch.items():
        if col.dtype.kind in "OUS":
            out[name] = [str(x) for x in col]
            continue
        if name == "image" and col.dtype == np.uint8 and normalize is not None:
            col = transforms.normalize_pixels(col, normalize)  # a new, writable array
        col = np.ascontiguousarray(col)
        out[name] = torch.from_numpy(col if col.flags.writeable else col.copy())
    return out


def _on_host(device: torch.device | str | None) -> bool:
    return device is None or str(device).split(":")[0] == "cpu"


def _to_device(batch: dict[str, Any], device: torch.device | str | None, normalize: str) -> dict[str, Any]:
    """Move a collated batch to ``device`` and normalise its uint8 images there."""
    if _on_host(device):
        return batch
    import torch

    out = {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if out["image"].dtype == torch.uint8:
        out["image"] = transforms.normalize_tensor(out["image"], normalize)
    return out


def _shard_batches(
    shard: Any,
    *,
    batch_size: int,
    drop_last: bool,
    shuffle_buffer: int | None,
    shuffle_seed: int | None,
    prefetch_batches: int,
    normalize: str,
    device: torch.device | str | None,
) -> Iterator[dict[str, Any]]:
    from ray.data.collate_fn import NumpyBatchCollateFn

    host_normalize = normalize if _on_host(device) else None

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return _collate(batch, host_normalize)

    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        collate_fn=Collate(),
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        yield _to_device(batch, device, normalize)


def iter_train_batches(
    shard: Any,
    *,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    rank: int = 0,
    normalize: str,
    device: torch.device | str | None = None,
    shuffle_buffer: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """One epoch of a worker's shard (``ray.train.get_dataset_shard("train")``) as torch batches.

    Yields ``image`` float32 (b, 3, S, S) normalised as ``normalize`` says (the config's
    ``data.normalize``: the data tasks ship uint8 pixels), ``target`` float32 (b, n), ``ignore`` bool (b, n),
    ``id`` list[str], and ``scene`` int32 (b,) when the dataset has it. Every batch is full (the
    remainder is dropped), so all workers yield the same count.

    ``shuffle_buffer``: rows of Ray's local shuffle buffer, seeded by (seed, epoch, rank); None
    means ``SHUFFLE_BUFFER_BATCHES * batch_size``, 0 turns it off. It holds decoded rows
    (uint8, 3 S^2 bytes: 0.15 MB at 224 px, 0.6 MB at 448 px), so it bounds its own memory.
    """
    from pipeline.seeding import derive_seed

    if shuffle_buffer is None:
        shuffle_buffer = SHUFFLE_BUFFER_BATCHES * batch_size
    buffer_seed = derive_seed(seed, epoch, f"buffer/{rank}") if shuffle_buffer else None
    yield from _shard_batches(
        shard, batch_size=batch_size, drop_last=True, shuffle_buffer=shuffle_buffer, shuffle_seed=buffer_seed,
        prefetch_batches=prefetch_batches, normalize=normalize, device=device,
    )


def iter_eval_batches(
    shard: Any,
    *,
    batch_size: int,
    normalize: str,
    device: torch.device | str | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """A worker's part of the evaluation split (``get_dataset_shard("test")``), in order.

    Keys as ``iter_train_batches`` plus ``valid`` bool (b,): False marks padding rows, which
    repeat real rows and must be dropped before scoring. The last batch may be short; every
    worker yields the same number of batches.
    """
    yield from _shard_batches(
        shard, batch_size=batch_size, drop_last=False, shuffle_buffer=None, shuffle_seed=None,
        prefetch_batches=prefetch_batches, normalize=normalize, device=device,
    )
