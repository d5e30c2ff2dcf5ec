"""Scene mosaics from Fashion-MNIST (pipeline/mosaic.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.mosaic import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FashionMNISTNotFound,
    MosaicConfig,
    convert_mosaic,
    degrade,
    extra_columns,
    fashion_mnist_files,
    iter_mosaics,
    load_fashion_mnist,
    scene_design,
)
from pipeline.shards import read_manifest, shard_paths
from tests._data_trees import write_fake_fashion_mnist

TINY = MosaicConfig(train=40, test=16, canvas=48)
real_files = pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def table(out: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in shard_paths(out, split))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@real_files
def test_real_items_scene_column_and_manifest(tmp_path: Path) -> None:
    result = convert_mosaic(tmp_path / "m", TINY, progress=False)
    manifest = read_manifest(tmp_path / "m")
    assert manifest["vocabulary"] == list(FASHION_MNIST_CLASSES)
    assert manifest["extra_columns"] == ["scene"]
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 40, "test": 16}
    description = manifest["description"]
    for phrase in ("real Fashion-MNIST", "synthetic and ours", "not a benchmark", "`scene` column"):
        assert phrase in description
    assert manifest["source"]["parameters"]["seed"] == 0
    assert len(manifest["source"]["parameters"]["scene_design"]) == TINY.scenes
    train = table(tmp_path / "m", "train")
    assert train.schema.field("scene").type == pa.int32()
    assert set(train.column("scene").to_pylist()) <= set(range(TINY.scenes))
    image = pixels(train.column("image")[0].as_py())
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert all(1 <= len(labels) <= TINY.max_items for labels in train.column("labels").to_pylist())
    assert result.stats["train"].rejects == 0


@real_files
def test_byte_identical_from_the_seed(tmp_path: Path) -> None:
    a = convert_mosaic(tmp_path / "a", TINY, shard_rows=16, workers=4, progress=False).manifest
    b = convert_mosaic(tmp_path / "b", TINY, shard_rows=16, workers=1, progress=False).manifest  # no threads
    assert a == b and len(a["splits"]["train"]["shards"]) == 3
    assert (tmp_path / "a" / "train/part-00000.parquet").read_bytes() == (
        tmp_path / "b" / "train/part-00000.parquet").read_bytes()
    c = convert_mosaic(tmp_path / "c", MosaicConfig(train=40, test=16, canvas=48, seed=1), progress=False).manifest
    assert c["splits"]["train"]["shards"][0]["sha256"] != a["splits"]["train"]["shards"][0]["sha256"]


def test_train_uses_train_file_items_test_uses_t10k(fake_dir: Path, tmp_path: Path) -> None:
    # Fake files: train items are solid white (255), t10k items are all 0 (fully transparent), so
    # white pixels appear in a mosaic only if it drew from the train file.
    convert_mosaic(tmp_path / "m", TINY, fashion_mnist=fake_dir, progress=False)
    train = [pixels(b) for b in table(tmp_path / "m", "train").column("image").to_pylist()]
    test = [pixels(b) for b in table(tmp_path / "m", "test").column("image").to_pylist()]
    assert all(img.max() == 255 for img in train)
    assert all(img.max() < 140 for img in test)  # only the background


def test_labels_follow_the_scenes(fake_dir: Path) -> None:
    images, labels = load_fashion_mnist(fashion_mnist_files(fake_dir)["train"])
    for in_scene, expected in ((0.9, 0.9 + 0.1 * 0.4), (0.0, 0.4)):
        config = MosaicConfig(train=800, in_scene=in_scene, canvas=32)
        design = scene_design(config)
        hits = total = 0
        per_scene = np.zeros((config.scenes, 10))
        for mosaic in iter_mosaics(images, labels, design, config, "train"):
            item_classes = labels[mosaic.items]
            hits += np.isin(item_classes, design.classes[mosaic.scene]).sum()
            total += len(item_classes)
            assert mosaic.classes == sorted(set(item_classes.tolist()))
            per_scene[mosaic.scene, mosaic.classes] += 1
        # An item is in-scene with probability in_scene, or by chance (4 of 10 classes) otherwise.
        assert abs(hits / total - expected) < 0.03
        if in_scene:
            for scene, cls in enumerate(design.classes):  # each scene's top labels are its own classes
                assert set(np.argsort(-per_scene[scene])[: len(cls)]) == set(cls.tolist())


@pytest.mark.parametrize("cue", ["none", "tint"])
def test_background_shows_the_scene_only_with_the_tint_cue(fake_dir: Path, tmp_path: Path, cue: str) -> None:
    # t10k items of the fake files are fully transparent: a test image is its background alone.
    config = MosaicConfig(train=4, test=64, canvas=16, scene_cue=cue)
    convert_mosaic(tmp_path / "m", config, fashion_mnist=fake_dir, progress=False)
    test = table(tmp_path / "m", "test")
    colours = np.stack([pixels(b).reshape(-1, 3).mean(0) for b in test.column("image").to_pylist()])  # (N, 3)
    scenes = np.asarray(test.column("scene").to_pylist())
    means = np.stack([colours[scenes == k].mean(0) for k in range(config.scenes)])  # (K, 3)
    spread = np.abs(means - means.mean(0)).max()
    if cue == "none":
        assert spread < 4  # one neutral background, jitter only
    else:
        assert spread > 15  # each scene its own tint


def test_scene_design_covers_classes_and_differs_per_scene() -> None:
    design = scene_design(MosaicConfig())
    assert set(design.classes.ravel().tolist()) == set(range(10))
    assert len({tuple(sorted(c)) for c in design.classes.tolist()}) == 4
    assert np.allclose(design.weights.sum(axis=1), 1)
    assert len({tuple(t) for t in design.tints.tolist()}) == 4


def test_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FashionMNISTNotFound) as info:
        convert_mosaic(tmp_path / "m", TINY, fashion_mnist=tmp_path / "nowhere", progress=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "t10k-labels-idx1-ubyte.gz" in message and "zalandoresearch/fashion-mnist" in message
    assert not (tmp_path / "m").exists()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        MosaicConfig(min_items=3, max_items=2)
    with pytest.raises(ValueError):
        MosaicConfig(image_format="gif")


# ------------------------------------------------------------------------------- context design

CONTEXT = MosaicConfig(train=40, test=16, canvas=48, design="context")


def test_defaults_keep_the_classes_design_and_no_degraded_column() -> None:
    config = MosaicConfig()
    assert (config.design, config.degrade_px, config.ambiguous) == ("classes", 2, (2, 4))
    assert scene_design(config).resolves_to is None and extra_columns(config) == ["scene"]


def test_context_design_resolves_by_scene_not_by_any_one_context_class() -> None:
    design = scene_design(MosaicConfig(design="context"))
    pair = set(MosaicConfig().ambiguous)
    assert set(design.resolves_to.tolist()) == pair  # (K,)
    context = set(design.classes.ravel().tolist())
    assert len(context) == 4 and not context & pair and not set(design.fillers) & (context | pair)
    assert len({tuple(c) for c in design.classes.tolist()}) == 4  # each scene its own combination
    for cls in context:  # each context class goes with each pair class in as many scenes
        with_it = design.resolves_to[(design.classes == cls).any(1)]
        assert sorted(with_it.tolist()) == sorted(pair)


def test_context_labels_follow_the_scene_and_the_item_is_degraded(fake_dir: Path) -> None:
    images, labels = load_fashion_mnist(fashion_mnist_files(fake_dir)["train"])
    config = MosaicConfig(train=600, canvas=32, design="context", in_scene=0.9)
    design = scene_design(config)
    follows, by_context = 0, {}
    for mosaic in iter_mosaics(images, labels, design, config, "train"):
        assert len(mosaic.degraded) == 1 and mosaic.degraded[0] in config.ambiguous
        assert set(design.classes[mosaic.scene]) <= set(mosaic.classes)
        assert config.min_items <= len(mosaic.items) <= max(config.max_items, 3)
        odd = mosaic.degraded[0]
        follows += odd == design.resolves_to[mosaic.scene]
        for cls in design.classes[mosaic.scene]:  # P(pair class | one context class) stays near 1/2
            by_context.setdefault(int(cls), []).append(odd == config.ambiguous[0])
        assert mosaic.degraded_mask == 1 << odd
    assert abs(follows / config.train - 0.9) < 0.05
    assert all(abs(np.mean(v) - 0.5) < 0.12 for v in by_context.values())


def test_degrade_keeps_only_a_few_pixels_at_fixed_brightness() -> None:
    rng = np.random.default_rng(0)
    item = rng.integers(0, 256, size=(28, 28)).astype(np.uint8)
    small = degrade(item, 2)
    assert small.shape == (2, 2) and abs(small.mean() - 120) < 1.5 and abs(small.std() - 60) < 1.5
    assert (degrade(item * 0 + 200, 3) == 120).all()  # no contrast: a flat patch of fixed brightness


def test_context_column_and_seed(fake_dir: Path, tmp_path: Path) -> None:
    a = convert_mosaic(tmp_path / "a", CONTEXT, fashion_mnist=fake_dir, progress=False).manifest
    b = convert_mosaic(tmp_path / "b", CONTEXT, fashion_mnist=fake_dir, progress=False).manifest
    assert a == b and a["extra_columns"] == ["scene", "degraded"] and "`degraded` column" in a["description"]
    assert all("degraded_class" in scene for scene in a["source"]["parameters"]["scene_design"])
    train = table(tmp_path / "a", "train")
    assert train.schema.field("degraded").type == pa.int32()
    for mask, found in zip(train.column("degraded").to_pylist(), train.column("labels").to_pylist()):
        assert bin(mask).count("1") == 1 and mask.bit_length() - 1 in found
    c = convert_mosaic(tmp_path / "c", MosaicConfig(**{**CONTEXT.__dict__, "seed": 1}), fashion_mnist=fake_dir,
                       progress=False).manifest
    assert c["splits"]["train"]["shards"][0]["sha256"] != a["splits"]["train"]["shards"][0]["sha256"]


def test_context_config_is_checked() -> None:
    for bad in (dict(scenes=3), dict(scenes=32), dict(ambiguous=(2, 2)), dict(degrade_px=0)):
        with pytest.raises(ValueError):
            MosaicConfig(design="context", **bad)
    with pytest.raises(ValueError):
        MosaicConfig(design="fancy")
