"""pipeline.ingest on a local Ray instance (2 CPUs) with 2 consumers, over real parquet and JPEGs.

One Ray instance for the module; every Ray test has a timeout (these failures hang, not raise).
The trainer tests run a real Train V2 ``TorchTrainer`` with 2 workers at half a CPU each, exactly
as the training job does, and compare what each worker saw with the parquet rows.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import ingest
from pipeline.seeding import derive_seed
from pipeline.shards import shard_paths
from pipeline.transforms import transform_batch
from salgl.config import DataConfig
from tests.bench.ingest import write_synthetic_dataset

TRAIN_ROWS, TEST_ROWS, N_LABELS, SCENES = 150, 37, 6, 3
BATCH, WORKERS, EPOCHS, IMG = 8, 2, 3, 32
CFG = DataConfig(img_size=IMG)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """150 train rows in 3 shards of 64 (row groups of 16), 37 test rows: odd, so it needs a pad."""
    root = tmp_path_factory.mktemp("ingest") / "ds"
    write_synthetic_dataset(
        root, {"train": TRAIN_ROWS, "test": TEST_ROWS}, num_labels=N_LABELS, width=64, height=48,
        unique_images=40, shard_rows=64, row_group_rows=16, scenes=SCENES, seed=1,
    )
    return str(root)


@pytest.fixture(scope="module")
def rows(data_dir: str) -> dict[str, dict[str, Any]]:
    """id -> {"labels", "ignore", "scene"} straight from the parquet files."""
    out = {}
    for path in sorted(Path(data_dir).glob("*/part-*.parquet")):
        for row in pq.read_table(path, columns=["id", "labels", "ignore", "scene"]).to_pylist():
            out[row.pop("id")] = row
    return out


# ---------------------------------------------------------------------------------------------
# A real 2-worker Train V2 run that records what every worker saw


def _record(batch: dict[str, Any]) -> list[dict[str, Any]]:
    image = batch["image"]
    assert image.dtype == torch.float32 and tuple(image.shape[1:]) == (3, IMG, IMG)
    return [
        {
            "id": id_,
            "target": np.flatnonzero(batch["target"][i].numpy()).tolist(),
            "target_dtype": str(batch["target"].dtype),
            "ignore": np.flatnonzero(batch["ignore"][i].numpy()).tolist(),
            "ignore_dtype": str(batch["ignore"].dtype),
            "scene": int(batch["scene"][i]),
            "pixels": float(image[i].double().sum()),
            **({"valid": bool(batch["valid"][i])} if "valid" in batch else {}),
        }
        for i, id_ in enumerate(batch["id"])
    ]


# Datasets of the one fit: the training split twice with the same seed (two independent pipelines,
# as two runs would build them), once with another seed, and the evaluation split.
TRAIN_SETS = {"train": 5, "again": 5, "other": 3}


def _probe_loop(config: dict[str, Any]) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    out: dict[str, Any] = {}
    for name, seed in TRAIN_SETS.items():
        shard = ray.train.get_dataset_shard(name)
        out[name] = [
            [_record(b) for b in ingest.iter_train_batches(shard, batch_size=config["batch"], epoch=epoch, seed=seed, rank=rank, normalize=CFG.normalize)]
            for epoch in range(config["epochs"])
        ]
    out["eval"] = [_record(b) for b in ingest.iter_eval_batches(ray.train.get_dataset_shard("test"), batch_size=config["batch"], normalize=CFG.normalize)]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ranks(ray_local, data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One 2-worker fit: [rank] -> {dataset: [epoch][batch][row], "eval": [batch][row]}."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("fit")
    datasets = {name: ingest.train_dataset(data_dir, CFG, seed=seed) for name, seed in TRAIN_SETS.items()}
    datasets["test"] = ingest.build_datasets(data_dir, CFG, seed=0, num_workers=WORKERS)["test"]
    trainer = TorchTrainer(
        _probe_loop,
        train_loop_config={"epochs": EPOCHS, "batch": BATCH, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="ingest-probe", storage_path=str(out / "storage")),
        datasets=datasets,
        dataset_config=ingest.data_config([*TRAIN_SETS, "test"]),
    )
    trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORKERS)]


def _ids(batches: list[list[dict[str, Any]]]) -> list[str]:
    return [row["id"] for batch in batches for row in batch]


# ---------------------------------------------------------------------------------------------
# Training split


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(TRAIN_SETS))
def test_workers_get_equal_batch_counts_of_full_batches(ranks, name):
    expected = (TRAIN_ROWS // WORKERS) // BATCH  # equal=True drops at most W - 1 rows, then drop_last
    for epoch in range(EPOCHS):
        assert [len(rank[name][epoch]) for rank in ranks] == [expected] * WORKERS
        assert all(len(batch) == BATCH for rank in ranks for batch in rank[name][epoch])


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(TRAIN_SETS))
def test_workers_see_disjoint_samples_each_epoch(ranks, rows, name):
    for epoch in range(EPOCHS):
        seen = [_ids(rank[name][epoch]) for rank in ranks]
        assert all(len(s) == len(set(s)) for s in seen), "no sample twice on one worker"
        assert not set(seen[0]) & set(seen[1]), "no sample on two workers"
        assert set(seen[0]) | set(seen[1]) <= {i for i in rows if i.startswith("train-")}


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(TRAIN_SETS))
def test_every_epoch_has_a_new_order_and_new_augmentations(ranks, name):
    for rank in ranks:
        assert len({tuple(_ids(epoch)) for epoch in rank[name]}) == EPOCHS, "each epoch in a different order"
    # The same image in two epochs is (almost always) augmented differently.
    pixels = [{row["id"]: row["pixels"] for rank in ranks for b in rank[name][e] for row in b} for e in range(2)]
    common = set(pixels[0]) & set(pixels[1])
    differ = sum(pixels[0][i] != pixels[1][i] for i in common)
    assert len(common) > 100 and differ > 0.8 * len(common)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_same_seed_gives_the_same_orders_and_pixels_in_a_fresh_pipeline(ranks):
    for rank in ranks:
        for epoch in range(EPOCHS):
            assert _ids(rank["train"][epoch]) == _ids(rank["again"][epoch])
            assert [r["pixels"] for b in rank["train"][epoch] for r in b] == [r["pixels"] for b in rank["again"][epoch] for r in b]
    assert _ids(ranks[0]["train"][0]) != _ids(ranks[0]["other"][0])


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(TRAIN_SETS))
def test_batches_mix_rows_from_across_the_split(ranks, name):
    """Chunks (here whole row groups of up to 16 rows, in 3 shards of 64 rows) come in a random
    order and the shuffle buffer mixes them: the first batches of an epoch hold rows of several
    row groups and shards, and different ones every epoch."""
    seen = set()
    for epoch in range(EPOCHS):
        first = [int(i.split("-")[1]) for rank in ranks for i in _ids(rank[name][epoch][:4])]
        assert len({i // 16 for i in first}) >= 3 and len({i // 64 for i in first}) >= 2
        assert any(len({int(r["id"].split("-")[1]) // 16 for r in b}) > 1 for b in ranks[0][name][epoch]), "a batch mixes chunks"
        seen |= {i // 16 for i in first}
    assert len(seen) >= 6


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_targets_ignore_masks_and_scenes_match_the_parquet_rows(ranks, rows):
    checked = 0
    for rank in ranks:
        batches = [b for name in TRAIN_SETS for epoch in rank[name] for b in epoch] + rank["eval"]
        for row in (r for b in batches for r in b):
            truth = rows[row["id"]]
            assert row["target"] == sorted(truth["labels"]), row["id"]
            assert row["ignore"] == sorted(truth["ignore"]), row["id"]
            assert row["scene"] == truth["scene"]
            assert (row["target_dtype"], row["ignore_dtype"]) == ("torch.float32", "torch.bool")
            checked += 1
    assert checked > len(TRAIN_SETS) * EPOCHS * TRAIN_ROWS * 0.9
    assert any(r["ignore"] for r in rows.values()), "the fixture has ignore entries to check"


# ---------------------------------------------------------------------------------------------
# Evaluation split


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_eval_covers_every_sample_exactly_once_with_marked_padding(ranks, rows):
    assert len({len(rank["eval"]) for rank in ranks}) == 1, "every worker yields the same number of eval batches"
    valid = collections.Counter(row["id"] for rank in ranks for b in rank["eval"] for row in b if row["valid"])
    assert set(valid) == {i for i in rows if i.startswith("test-")}
    assert set(valid.values()) == {1}
    padded = [row["id"] for rank in ranks for b in rank["eval"] for row in b if not row["valid"]]
    assert len(padded) == -TEST_ROWS % WORKERS and set(padded) <= set(valid)


# ---------------------------------------------------------------------------------------------
# Two streaming_split consumers as Ray tasks, without Train


def _consume(split: Any, epochs: int, seed: int, rank: int) -> list[list[str]]:
    return [
        [i for b in ingest.iter_train_batches(split, batch_size=BATCH, epoch=e, seed=seed, rank=rank, normalize=CFG.normalize) for i in b["id"]]
        for e in range(epochs)
    ]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_eval_images_are_the_test_transform_of_their_rows(ranks, data_dir):
    """The data tasks ship uint8 pixels and the consumer normalises: the result is what the
    test transform computes in one place (``transform_batch``, float32 rounding apart)."""
    table = pq.read_table(shard_paths(data_dir, "test")).to_pydict()
    raw = {k: np.array(v, dtype=object) for k, v in table.items()}
    images = transform_batch(raw, cfg=CFG, num_labels=N_LABELS, train=False, seed=None)["image"]
    expected = {id_: float(img.astype(np.float64).sum()) for id_, img in zip(table["id"], images)}
    seen = {row["id"]: row["pixels"] for rank in ranks for b in rank["eval"] for row in b}
    assert seen.keys() == expected.keys()
    assert all(abs(seen[i] - expected[i]) < 1e-6 * 3 * IMG * IMG for i in expected)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_streaming_split_consumers_in_ray_tasks(ray_local, data_dir):
    import ray

    ds = ingest.train_dataset(data_dir, CFG, seed=3, concurrency=2)
    ds.context.execution_options = ingest.execution_options()
    consume = ray.remote(num_cpus=0)(_consume)
    seen = ray.get([consume.remote(s, 2, 3, r) for r, s in enumerate(ds.streaming_split(WORKERS, equal=True))], timeout=280)
    for epoch in range(2):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(b) == (TRAIN_ROWS // WORKERS) // BATCH * BATCH
        assert not set(a) & set(b)
    assert seen[0][0] != seen[0][1]


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_derived_seeds_separate_streams_and_epochs():
    seeds = {derive_seed(0, e, s) for e in range(3) for s in ("order", "augment", "buffer/0")}
    assert len(seeds) == 9 and all(0 <= s < 2**32 for s in seeds)
    assert derive_seed(0, 1, "order") == derive_seed(0, 1, "order")
    # Fixed values: a run resumed from an older checkpoint must draw what it would have drawn.
    assert (derive_seed(0, 1, "order"), derive_seed(0, "dropout", 0, 0)) == (4170863029, 1793158690)


def test_data_config_splits_in_a_deterministic_order():
    config = ingest.data_config(["train"], object_store_bytes=1 << 30)
    options = config._resolve_execution_options("train")
    assert config._datasets_to_split == ["train"]
    assert options.preserve_order
    assert options.resource_limits.object_store_memory == 1 << 30


def test_chunk_table_covers_every_row_once_within_row_groups(data_dir):
    chunks = ingest.chunk_table(data_dir, "train", chunk_rows=10)
    ids = [i for c in chunks for i in ingest.read_chunk(c).column("id").to_pylist()]
    assert sorted(ids) == [f"train-{i:06d}" for i in range(TRAIN_ROWS)]
    assert all(0 < stop - start <= 10 for _, _, start, stop in chunks)
    groups = {(str(p), g) for p in Path(data_dir).glob("train/*.parquet") for g in range(pq.ParquetFile(p).num_row_groups)}
    assert {(path, group) for path, group, _, _ in chunks} == groups


def test_epoch_order_is_a_seeded_permutation():
    a, b, c = ingest.epoch_order(50, 1), ingest.epoch_order(50, 1), ingest.epoch_order(50, 2)
    assert sorted(a) == list(range(50)) and (a == b).all() and not (a == c).all()


def test_a_task_maps_several_chunks_and_emits_one_block_per_chunk(data_dir):
    chunks = [(*c, True) for c in ingest.chunk_table(data_dir, "test", chunk_rows=10)]
    kwargs = {"chunks": chunks, "order_seed": None, "augment_seed": None, "cfg": CFG, "num_labels": N_LABELS}
    blocks = list(ingest._decode_udf({"id": np.array([2, 0, 3])}, **kwargs))
    expected = [ingest.read_chunk(chunks[p][:4]).column("id").to_pylist() for p in (2, 0, 3)]
    assert [list(b["id"]) for b in blocks] == expected
    assert all(b["image"].shape == (len(ids), 3, IMG, IMG) and b["valid"].all() for b, ids in zip(blocks, expected))


def test_tasks_take_several_chunks_but_small_splits_still_run_in_parallel():
    assert [ingest.num_tasks(n) for n in (1, 5, ingest.MIN_TASKS, 40, 4001)] == [1, 5, ingest.MIN_TASKS, 10, 1001]
