"""Source rows of a scene-stability probe and two independent training augmentations of them.

The ingest ships augmented pixels only (``pipeline.ingest``: the encoded bytes stay in the data
tasks), so a worker that wants a second augmentation of the images it probes reads their rows
again from the shards, by id, and runs ``transforms.transform_batch`` twice, as the ingest does,
with two seeds of its own. Not the probe's pixels augmented again: those are already augmented
once (and resized), so a second pass would stack two augmentations and compare neither with what
training sees. Plain functions over parquet rows: no Ray, no torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline import transforms
from pipeline.shards import shard_files
from salgl.config import DataConfig


def _columns(table: "pyarrow.Table") -> dict[str, np.ndarray]:  # noqa: F821
    """A table as ``transform_batch`` takes a batch: one numpy array per column."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def rows_by_id(data_dir: str, split: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The rows of ``split`` whose ``id`` is in ``ids``, in the order of ``ids`` (each id once).

    Parquet's own filter reads the ``id`` column everywhere and the other columns only of the row
    groups that hold a match. Raises KeyError naming an id the split lacks.
    """
    import pyarrow.dataset as ds

    fs, paths = shard_files(data_dir, split)
    table = ds.dataset(paths, format="parquet", filesystem=fs).to_table(filter=ds.field("id").isin(list(ids)))
    where = {str(x): i for i, x in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in where]
    if missing:
        raise KeyError(f"split {split!r} of {data_dir} has no row with id {missing[0]!r}")
    return _columns(table.take([where[i] for i in ids]))


def first_rows(data_dir: str, split: str, count: int) -> dict[str, np.ndarray]:
    """The first ``count`` rows of ``split`` in storage order."""
    import pyarrow.dataset as ds

    fs, paths = shard_files(data_dir, split)
    return _columns(ds.dataset(paths, format="parquet", filesystem=fs).head(count))


def augmented_views(
    rows: dict[str, np.ndarray], cfg: DataConfig, *, num_labels: int, seeds: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Two training augmentations of the same rows, uint8 (P, 3, S, S) each, one per seed.

    The training transform itself (resize, flip, Cutout, RandAugment), so the views differ as two
    epochs' views of an image do. With ``cfg.augment == "none"`` they are identical.
    """
    first, second = (
        transforms.transform_batch(rows, cfg=cfg, num_labels=num_labels, train=True, seed=seed, normalized=False)["image"]
        for seed in seeds
    )
    return first, second
