"""A run's dataset: its folder (the built-in mosaic prepared on first use) and the facts of its
manifest, read once as the run starts and handed to what needs them (the run record, MLflow's
dataset input, the workers' vocabulary, the ingest's shard list)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from salgl.config import Config
from salgl.errors import NotFound

# The run's own lines keep the logger name they had in salgl.log before the driver was split.
log = logging.getLogger("jobs.training.driver")

DEFAULT_DATA = "data/mosaic"


@dataclass(frozen=True)
class DatasetFacts:
    """A prepared dataset as its ``manifest.json`` describes it (``pipeline.shards`` owns the format)."""

    location: str  # the folder or object-store URI the run reads, as given to ``read_dataset``
    vocabulary: tuple[str, ...]
    split_rows: Mapping[str, int]
    digest: str  # ``pipeline.shards.shards_digest``: the dataset's identity in the run record
    manifest: Mapping[str, Any] = field(repr=False, compare=False)  # for the ingest's shard list and MLflow

    @property
    def num_labels(self) -> int:
        return len(self.vocabulary)

    @property
    def train_rows(self) -> int:
        return self.split_rows["train"]


def read_dataset(data_dir: str) -> DatasetFacts:
    """The facts of the dataset at ``data_dir``: one read of its manifest."""
    from pipeline.shards import read_manifest, shards_digest

    manifest = read_manifest(data_dir)
    return DatasetFacts(
        location=data_dir,
        vocabulary=tuple(manifest["vocabulary"]),
        split_rows={name: int(split["rows"]) for name, split in manifest["splits"].items()},
        digest=shards_digest(manifest),
        manifest=manifest,
    )


def resolve_data(cfg: Config, *, prepare_default: bool = True) -> str:
    """The dataset folder, or object-store URI; the built-in mosaic data is prepared on first use."""
    from pipeline.shards import check_bucket, dataset_location, has_manifest, is_remote, verify_shards

    path = dataset_location(cfg.data.path or DEFAULT_DATA)
    if not has_manifest(path):
        if is_remote(path):
            check_bucket(path)  # a bucket that does not exist is said as such
        if cfg.data.path and cfg.data.path != DEFAULT_DATA:
            raise NotFound(
                f"data.path={cfg.data.path!r} holds no manifest.json: prepare it first, for example "
                f"`salgl prepare voc2007 VOCdevkit/VOC2007 --out {cfg.data.path}`"
            )
        if not prepare_default:
            raise NotFound(f"no dataset at {path}")
        from pipeline.mosaic import convert_mosaic

        log.info(f"preparing the built-in mosaic dataset at {path} (first use)")
        convert_mosaic(path)
    verify_shards(path)  # a truncated, missing or altered shard fails here, named, before Ray starts
    return path
