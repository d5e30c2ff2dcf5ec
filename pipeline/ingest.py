"""Streaming ingest with Ray Data: parquet shards -> decoded, augmented torch batches per worker.

The graph only composes the plain functions of ``pipeline.transforms`` (STYLE habit 11)::

    driver:  build_datasets(...)  ->  {"train": Dataset, "test": Dataset}
             TorchTrainer(..., datasets=..., dataset_config=data_config(...))
    worker:  shard = ray.train.get_dataset_shard("train")
             for epoch ...: for batch in iter_train_batches(shard, batch_size=b, epoch=epoch, seed=s): ...
             for batch in iter_eval_batches(ray.train.get_dataset_shard("test"), batch_size=b): ...

How Ray 2.60 runs this (read from ``ray/train/_internal/data_config.py`` and
``ray/data/_internal/iterator/stream_split_iterator.py``):

- Train V2 calls ``streaming_split(world_size, equal=True)`` once per split dataset. A
  ``SplitCoordinator`` actor re-executes the whole Dataset every time all workers start a new pass
  over their shard (one pass = one epoch), and counts the passes in its copy of the dataset's
  ``DataContext`` (the execution index).
- Every random step of the graph takes a ``RandomSeedConfig(seed, reseed_after_execution=True)``
  (or ``FileShuffleConfig(..., reseed_after_execution=True)``): Ray combines the seed with that
  execution index, so every epoch gets a new shard order (or a new global permutation) and new
  augmentations, and the same seed replays the same sequence of epochs in a fresh run. The
  worker-side shuffle buffer is seeded by (seed, epoch, rank) explicitly. When Train rebuilds its
  worker group (a replaced worker, or a resumed run) the coordinators and their count restart at
  0, so the driver rebuilds the datasets with ``start_epoch`` = the epoch the run restarts from,
  and ``pipeline/seeding.py`` shifts the count by it: pass i draws the numbers of epoch
  ``start_epoch + i``, exactly what an uninterrupted run draws.
- ``equal=True`` hands every worker exactly ``floor(N / W)`` rows (at most W - 1 rows of an
  epoch are dropped, different ones every epoch); ``iter_train_batches`` then drops the last
  partial batch, so every worker yields exactly ``floor(floor(N / W) / b)`` batches and the
  training collectives never wait on a worker that has run out.
- ``preserve_order=True`` (set in ``data_config``) makes the block sequence, and so the split of
  rows among workers, independent of task timing: the same seed gives every worker the same rows
  in the same order in every run.
- The evaluation split is padded, in the graph, to a multiple of W with copies of its first rows,
  marked ``valid = False``; with ``equal=True`` nothing is then dropped, every real row reaches
  exactly one worker once, and every worker yields the same number of batches.

Memory: data tasks stream; Ray Data's backpressure keeps a few blocks per operator in the object
store, capped by ``data_config(object_store_bytes=...)``; each decode task holds ``MAP_BATCH_ROWS``
rows and the local shuffle buffer a fixed number of rows, so with the default ``shuffle="local"``
memory does not grow with the dataset (``tests/bench/ingest.py`` measures it). ``shuffle="global"``
is a full all-to-all of the encoded split through the object store every epoch (spilled to disk
beyond its cap): a perfect permutation for datasets that fit, I/O-bound for ones that do not.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import torch

from pipeline import transforms
from salgl.config import DataConfig

TRAIN_SPLIT = "train"
EVAL_SPLIT = "test"
SHUFFLES = ("local", "global")
# Rows per decode task: one output block (rows x 3 S^2 float32, 38 MB at 448 px) stays well below
# Ray Data's 128 MB target block size, and a task (0.1-0.4 s of work) amortises its overhead.
# The read splits its blocks to about this size (``override_num_blocks``): a map task takes whole
# blocks, so without the split one decode task would get a whole shard (thousands of rows) and
# decode parallelism would be the number of shards read at once.
MAP_BATCH_ROWS = 16
# CPU share of a read task: reading parquet pages of already-encoded images is light. Being
# different from the decode tasks' share also keeps Ray from fusing read and decode into one task.
READ_CPUS = 0.1
# Default local shuffle buffer of ``iter_train_batches``, in batches (decoded float32 rows).
SHUFFLE_BUFFER_BATCHES = 2


# ---------------------------------------------------------------------------------------------
# Manifest access (pipeline.shards owns the format)


def _manifest(data_dir: str) -> dict[str, Any]:
    from pipeline.shards import read_manifest

    return read_manifest(data_dir)


def _shard_paths(data_dir: str, split: str) -> list[str]:
    from pipeline.shards import shard_paths

    return shard_paths(data_dir, split)


def num_labels(data_dir: str) -> int:
    return len(_manifest(data_dir)["vocabulary"])


# ---------------------------------------------------------------------------------------------
# Seeds


def epoch_seed(seed: int, start_epoch: int, stream: str) -> int:
    """The base seed Ray combines with the execution index; ``stream`` names the random step so
    file order, row permutation and augmentation draw independent numbers."""
    digest = hashlib.blake2b(f"{seed}/{start_epoch}/{stream}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")  # < 2**32: NumPy's legacy seed range


def _seed_from_context(seed_config: Any) -> int:
    """(base seed, execution index of this pass) -> one int, inside a Ray Data task."""
    from ray.data import DataContext

    st = seed_config.get_seed_tuple(data_context=DataContext.get_current())
    return int(np.random.SeedSequence([st.seed, st.execution_idx or 0]).generate_state(1, np.uint32)[0])


def _train_udf(batch: dict[str, np.ndarray], *, seed_config: Any, cfg: DataConfig, num_labels: int) -> dict[str, np.ndarray]:
    return transforms.transform_batch(batch, cfg=cfg, num_labels=num_labels, train=True, seed=_seed_from_context(seed_config))


def _eval_udf(batch: dict[str, np.ndarray], *, cfg: DataConfig, num_labels: int) -> dict[str, np.ndarray]:
    return transforms.transform_batch(batch, cfg=cfg, num_labels=num_labels, train=False, seed=None)


def _mark_valid(table: pa.Table, *, valid: bool) -> pa.Table:
    return table.append_column("valid", pa.array(np.full(table.num_rows, valid)))


# ---------------------------------------------------------------------------------------------
# Driver: datasets


def _read_parquet(paths: list[str], **kwargs: Any) -> "ray.data.Dataset":  # noqa: F821
    """``ray.data.read_parquet`` through the V1 parquet datasource.

    Ray 2.60 routes reads through the new DataSourceV2 by default; on this 2-core machine its
    ``ListFiles`` step took 3-15 s per execution (every epoch) against 0.3-0.8 s for V1 on the same
    three shards. V1 honours ``FileShuffleConfig(reseed_after_execution=True)`` the same way.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False  # read at call time only: the plan is built here
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = previous


def _read(data_dir: str, split: str, *, shuffle: Any, read_cpus: float, map_batch_rows: int) -> "ray.data.Dataset":  # noqa: F821
    rows = int(_manifest(data_dir)["splits"][split]["rows"])
    blocks = max(1, -(-rows // map_batch_rows))
    return _read_parquet(_shard_paths(data_dir, split), shuffle=shuffle, num_cpus=read_cpus, override_num_blocks=blocks)


def train_dataset(
    data_dir: str,
    cfg: DataConfig,
    *,
    seed: int,
    split: str = TRAIN_SPLIT,
    start_epoch: int = 0,
    shuffle: Literal["local", "global"] = "local",
    num_cpus: float = 0.5,
    concurrency: int | None = None,
    read_cpus: float = READ_CPUS,
    map_batch_rows: int = MAP_BATCH_ROWS,
) -> "ray.data.Dataset":  # noqa: F821
    """Read (new shard order every pass) -> [global shuffle] -> decode + augment, lazily.

    ``shuffle="local"`` (default; memory-bounded whatever the dataset size): the shard order is
    drawn anew every epoch and rows are read in blocks of ``map_batch_rows``; the row-level mixing
    is then the consumer's local shuffle buffer (``iter_train_batches(shuffle_buffer=...)``). A
    batch draws from the few shards being read at that moment, so converters should write rows in
    a random order (or at least not sorted by label).
    ``shuffle="global"``: a full random permutation of the encoded rows every epoch, through an
    all-to-all ``random_shuffle`` that holds the whole encoded split in the object store (spilled
    to disk beyond its cap): for datasets that fit it.
    ``num_cpus`` per decode task (fractional on small machines, so Train workers at ~0.5 CPU leave
    room: STACK.md), ``concurrency`` caps concurrent decode tasks (None: as many as CPUs allow).
    """
    from pipeline.seeding import EpochFileShuffle, EpochSeed

    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")

    # Pass i of this dataset draws the numbers of epoch start_epoch + i (pipeline/seeding.py), so a
    # run restarted from a checkpoint replays exactly what an uninterrupted run would have seen.
    def reseeded(stream: str) -> EpochSeed:
        return EpochSeed(seed=epoch_seed(seed, 0, stream), reseed_after_execution=True, start_epoch=start_epoch)

    files = EpochFileShuffle(seed=epoch_seed(seed, 0, "files"), reseed_after_execution=True, start_epoch=start_epoch)
    ds = _read(data_dir, split, shuffle=files if shuffle == "local" else None, read_cpus=read_cpus, map_batch_rows=map_batch_rows)
    if shuffle == "global":
        ds = ds.random_shuffle(seed=reseeded("rows"), num_cpus=read_cpus)  # keeps the input's block count
    return ds.map_batches(
        _train_udf,
        fn_kwargs={"seed_config": reseeded("augment"), "cfg": cfg, "num_labels": num_labels(data_dir)},
        batch_size=map_batch_rows,
        batch_format="numpy",
        num_cpus=num_cpus,
        **({"concurrency": concurrency} if concurrency else {}),
    )


def eval_dataset(
    data_dir: str,
    cfg: DataConfig,
    *,
    num_workers: int,
    split: str = EVAL_SPLIT,
    num_cpus: float = 0.5,
    concurrency: int | None = None,
    read_cpus: float = READ_CPUS,
    map_batch_rows: int = MAP_BATCH_ROWS,
) -> "ray.data.Dataset":  # noqa: F821
    """Read in shard order -> resize + normalise, padded to a multiple of ``num_workers`` rows.

    Padding rows repeat the first rows of the split with ``valid = False``, so that
    ``streaming_split(num_workers, equal=True)`` drops nothing: drop them before scoring.
    """
    rows = int(_manifest(data_dir)["splits"][split]["rows"])
    light = {"num_cpus": read_cpus, "batch_format": "pyarrow", "batch_size": None}
    ds = _read(data_dir, split, shuffle=None, read_cpus=read_cpus, map_batch_rows=map_batch_rows)
    out = ds.map_batches(_mark_valid, fn_kwargs={"valid": True}, **light)
    if pad := -rows % num_workers:
        out = out.union(ds.limit(pad).map_batches(_mark_valid, fn_kwargs={"valid": False}, **light))
    return out.map_batches(
        _eval_udf,
        fn_kwargs={"cfg": cfg, "num_labels": num_labels(data_dir)},
        batch_size=map_batch_rows,
        batch_format="numpy",
        num_cpus=num_cpus,
        **({"concurrency": concurrency} if concurrency else {}),
    )


def build_datasets(
    data_dir: str,
    cfg: DataConfig,
    *,
    seed: int,
    num_workers: int,
    start_epoch: int = 0,
    train_split: str = TRAIN_SPLIT,
    eval_split: str | None = EVAL_SPLIT,
    shuffle: Literal["local", "global"] = "local",
    num_cpus: float = 0.5,
    concurrency: int | None = None,
) -> dict[str, "ray.data.Dataset"]:  # noqa: F821
    """``{"train": ..., "test": ...}`` for ``TorchTrainer(datasets=...)``, with ``data_config()``.

    ``num_workers`` must equal the trainer's worker count (the eval split is padded for it).
    Nothing executes here; each Train worker's pass over its shard runs the graph once.
    """
    out = {
        TRAIN_SPLIT: train_dataset(data_dir, cfg, seed=seed, split=train_split, start_epoch=start_epoch, shuffle=shuffle, num_cpus=num_cpus, concurrency=concurrency)
    }
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


def _collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numeric columns -> tensors; string columns (``id``) -> ``list[str]``.

    A batch that is a zero-copy view of an object-store block is read-only: copied, so that
    in-place ops on the tensors are safe (the copy runs in Ray's prefetch thread).
    """
    out: dict[str, Any] = {}
    for name, col in batch.items():
        if col.dtype.kind in "OUS":
            out[name] = [str(x) for x in col]
        else:
            col = np.ascontiguousarray(col)
            out[name] = torch.from_numpy(col if col.flags.writeable else col.copy())
    return out


def _to_device(batch: dict[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    if device is None:
        return batch
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _shard_batches(shard: Any, *, batch_size: int, drop_last: bool, shuffle_buffer: int | None, shuffle_seed: int | None, prefetch_batches: int) -> Iterator[dict[str, Any]]:
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return _collate(batch)

    return shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        collate_fn=Collate(),
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed,
        prefetch_batches=prefetch_batches,
    )


def iter_train_batches(
    shard: Any,
    *,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    rank: int = 0,
    device: torch.device | str | None = None,
    shuffle_buffer: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """One epoch of a worker's shard (``ray.train.get_dataset_shard("train")``) as torch batches.

    Yields ``image`` float32 (b, 3, S, S), ``target`` float32 (b, n), ``ignore`` bool (b, n),
    ``id`` list[str], and ``scene`` int32 (b,) when the dataset has it. Every batch is full (the
    remainder is dropped), so all workers yield the same count.

    ``shuffle_buffer``: rows of Ray's local shuffle buffer, seeded by (seed, epoch, rank); None
    means ``SHUFFLE_BUFFER_BATCHES * batch_size``, 0 turns it off. It holds decoded float32 rows
    (3 S^2 x 4 bytes: 0.6 MB at 224 px, 2.4 MB at 448 px), so it bounds its own memory.
    """
    if shuffle_buffer is None:
        shuffle_buffer = SHUFFLE_BUFFER_BATCHES * batch_size
    buffer_seed = epoch_seed(seed, epoch, f"buffer/{rank}") if shuffle_buffer else None
    for batch in _shard_batches(shard, batch_size=batch_size, drop_last=True, shuffle_buffer=shuffle_buffer, shuffle_seed=buffer_seed, prefetch_batches=prefetch_batches):
        yield _to_device(batch, device)


def iter_eval_batches(
    shard: Any,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """A worker's part of the evaluation split (``get_dataset_shard("test")``), in order.

    Keys as ``iter_train_batches`` plus ``valid`` bool (b,): False marks padding rows, which
    repeat real rows and must be dropped before scoring. The last batch may be short; every
    worker yields the same number of batches.
    """
    for batch in _shard_batches(shard, batch_size=batch_size, drop_last=False, shuffle_buffer=None, shuffle_seed=None, prefetch_batches=prefetch_batches):
        yield _to_device(batch, device)
