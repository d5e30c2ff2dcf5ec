"""The scene-stability probes (salgl/stability.py) and their metrics (jobs/scene_metrics.py):
train against eval mode, alone against inside the batch, and two augmentations of the same image.

Each probe is shown both ways: 1.0 where nothing it measures can move a scene, and below 1 where
something does (batch-statistic BatchNorm, a head with dropout), so a probe that always said 1
would fail here.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from jobs.scene_metrics import augmented_probe, probe_pairs, scene_metrics
from pipeline.probe import augmented_views, first_rows, rows_by_id
from pipeline.transforms import normalize_tensor
from salgl.config import DataConfig, preset
from salgl.model import build_model
from salgl.stability import batch_scenes, train_eval_scenes, train_mode_scenes

DROPOUT_HEAD = {"model.head.token_encoder": True, "model.head.encoder_dropout": 0.5}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Seconds on a busy 2-core machine, not minutes: many batch-of-1 forwards, no thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(count: int = 32, size: int = 64) -> torch.Tensor:
    """Random images with per-image brightness, so their batch statistics differ from any one image's."""
    noise = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1)) * 3
    return noise + torch.linspace(-4, 4, count).view(count, 1, 1, 1)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _share(pair: tuple[torch.Tensor, torch.Tensor]) -> float:
    return (pair[0] == pair[1]).float().mean().item()


def _tiny_model(batchnorm: str, overrides: dict[str, object] | None = None) -> torch.nn.Module:
    cfg = preset("tiny", {"model.backbone.batchnorm": batchnorm, "model.head.num_scenes": 4, **(overrides or {})}).model
    torch.manual_seed(0)
    model = build_model(cfg, num_labels=5, label_dim=16)
    with torch.no_grad():  # stored statistics far from any batch's, as after pretraining elsewhere
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-2, 2)
                module.running_var.uniform_(0.2, 4)
        model.head.scenes.prototypes.weight.mul_(50)  # sharp scenes, so a shift in features shows
    return model


# ---------------------------------------------------------------------------------------------
# scene_agreement (train against eval mode)


def test_frozen_batchnorm_gives_an_image_one_scene_whatever_its_batch_and_mode() -> None:
    model = _tiny_model("frozen")
    images = torch.randn(12, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    in_train, in_eval = train_eval_scenes(model, images)
    assert torch.equal(in_train, in_eval)
    model.train()
    alone = torch.cat([model(images[i : i + 1]).scene_probs.argmax(-1) for i in range(len(images))])
    assert torch.equal(alone, model(images).scene_probs.argmax(-1))  # the rest of the batch does not matter
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no statistic moved


def test_batch_statistics_show_up_as_train_eval_disagreement() -> None:
    """The alarm can fire: with BatchNorm on batch statistics the two modes give other scenes."""
    model = _tiny_model("train")
    images = torch.randn(32, 3, 32, 32) * 3 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    in_train, in_eval = train_eval_scenes(model, images)
    assert (in_train != in_eval).float().mean() > 0.2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # statistics untouched
    assert model.training  # mode restored


def test_backbone_train_mode_keeps_frozen_batchnorm_in_eval() -> None:
    for batchnorm, expected in (("frozen", False), ("train", True)):
        model = _tiny_model(batchnorm).train()
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and all(m.training == expected for m in norms)
        assert model.head.training



def _probe_model(batchnorm: str, dropout: float = 0.0) -> torch.nn.Module:
    """With the released token encoder: its LayerNorms spread random images over several scenes,
    so an agreement of 1 is not every image in one scene."""
    return _tiny_model(batchnorm, {**DROPOUT_HEAD, "model.head.encoder_dropout": dropout})


# ---------------------------------------------------------------------------------------------
# scene_stability_batch


def test_batch_stability_is_one_with_frozen_batchnorm() -> None:
    model = _probe_model("frozen").train()
    before = _state(model)
    in_batch, alone = batch_scenes(model, _images())
    assert len(set(in_batch.tolist())) > 1  # several scenes: agreeing is not trivial
    assert _share((in_batch, alone)) == 1.0
    assert _unchanged(model, before) and model.training


def test_batch_stability_drops_with_batch_statistic_batchnorm() -> None:
    model = _probe_model("train").eval()
    before = _state(model)
    in_batch, alone = batch_scenes(model, _images())
    assert _share((in_batch, alone)) < 0.9
    assert _unchanged(model, before) and not model.training  # statistics and mode as they were


def test_batch_stability_leaves_dropout_to_the_augment_probe() -> None:
    """Dropout's noise is no coupling between images: the batch probe runs with it off."""
    model = _probe_model("frozen", dropout=0.5)
    images = _images()
    assert _share(batch_scenes(model, images)) == 1.0
    assert _share((train_mode_scenes(model, images), train_mode_scenes(model, images))) < 0.9


def test_an_image_that_cannot_be_normalised_alone_counts_as_unstable() -> None:
    """32 px: a 1 x 1 last feature map, one value per channel in a batch of 1."""
    in_batch, alone = batch_scenes(_probe_model("train"), _images(8, 32))
    assert (alone == -1).all() and _share((in_batch, alone)) == 0.0


# ---------------------------------------------------------------------------------------------
# scene_stability_augment


def test_identical_views_give_full_stability_without_dropout() -> None:
    model = _probe_model("frozen")
    images = _images()
    assert _share((train_mode_scenes(model, images), train_mode_scenes(model, images.clone()))) == 1.0


def test_dropout_in_the_head_makes_the_repeat_stability_drop() -> None:
    model = _probe_model("frozen", dropout=0.5).eval()
    before = _state(model)
    images = _images()
    first, second = train_mode_scenes(model, images), train_mode_scenes(model, images)
    assert _share((first, second)) < 0.9
    assert _unchanged(model, before) and not model.training  # probed in train mode, left in eval


def test_augmented_views_are_the_training_transform_with_two_seeds(mosaic_dir: str) -> None:
    ids = [str(i) for i in first_rows(mosaic_dir, "train", 12)["id"]][::-1]
    rows = rows_by_id(mosaic_dir, "train", ids)
    assert [str(i) for i in rows["id"]] == ids  # in the order asked for
    released = DataConfig(img_size=64)
    first, second = augmented_views(rows, released, num_labels=10, seeds=(1, 2))
    assert first.shape == (12, 3, 64, 64) and first.dtype == np.uint8
    assert not np.array_equal(first, second)  # independent draws
    again, _ = augmented_views(rows, released, num_labels=10, seeds=(1, 3))
    assert np.array_equal(first, again)  # reproducible from the seed
    plain = augmented_views(rows, DataConfig(img_size=64, augment="none"), num_labels=10, seeds=(1, 2))
    assert np.array_equal(*plain)  # no augmentation: nothing to differ
    with pytest.raises(KeyError, match="no row with id"):
        rows_by_id(mosaic_dir, "train", ["no such image"])


def test_augment_stability_on_real_augmentations(mosaic_dir: str) -> None:
    """1.0 where the two views are the same image; below 1 where training's augmentation moves scenes."""
    cfg = preset("tiny", {"model.backbone.batchnorm": "frozen", "model.head.num_scenes": 4}).model
    torch.manual_seed(0)
    model = build_model(cfg, num_labels=5, label_dim=16)  # unit statistics: real images spread over scenes
    num_labels = 10
    none = augmented_probe(mosaic_dir, DataConfig(img_size=64, augment="none"), num_labels=num_labels, seed=0)
    released = augmented_probe(mosaic_dir, DataConfig(img_size=64), num_labels=num_labels, seed=0)
    assert none is not None and released is not None and none[0].shape == (64, 3, 64, 64)
    images = normalize_tensor(none[0], "imagenet")  # the other probes' images
    pairs = probe_pairs(model, images, none)
    assert scene_metrics(pairs["probe"][0], 4, **pairs)["scene_stability_augment"] == 1.0
    pairs = probe_pairs(model, images, released)
    assert len(set(pairs["augment"][0].tolist())) > 1  # several scenes: a moved image can show
    assert scene_metrics(pairs["probe"][0], 4, **pairs)["scene_stability_augment"] < 1.0
    assert augmented_probe("", DataConfig(), num_labels=num_labels, seed=0) is None  # no data folder: left out
    assert augmented_probe(mosaic_dir, DataConfig(), num_labels=num_labels, seed=0, split="nope") is None


# ---------------------------------------------------------------------------------------------
# metrics and wiring


def test_scene_metrics_report_each_probe_given() -> None:
    scenes = np.array([0, 1, 2, 0])
    pair = (np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    metrics = scene_metrics(scenes, 3, probe=pair, batch=(pair[0], pair[0]), augment=(pair[0], 1 - pair[0]))
    assert (metrics["scene_agreement"], metrics["scene_stability_batch"], metrics["scene_stability_augment"]) == (0.75, 1.0, 0.0)
    plain = scene_metrics(scenes, 3, augment=(np.zeros(0), np.zeros(0)))
    assert not {"scene_agreement", "scene_stability_batch", "scene_stability_augment"} & set(plain)


def test_training_epochs_report_the_probes_live_and_ema(mosaic_dir: str) -> None:
    """Recipe.evaluate, at world size 1 without Ray: the probe of the first training batch, its
    images read again by id and augmented twice, each model's shares under its prefix."""
    from jobs.training.acceleration import StepPrecision
    from jobs.training.checkpoints import TrainingState
    from jobs.training.recipe import Recipe
    from jobs.training.worker_spec import WorkerSpec
    from pipeline.transforms import transform_batch
    from salgl.config import to_flat
    from salgl.ema import ModelEma

    cfg = preset("tiny", {"data.path": mosaic_dir, "model.backbone.batchnorm": "frozen", **DROPOUT_HEAD})
    recipe = Recipe(WorkerSpec(config=to_flat(cfg), vocabulary=[str(i) for i in range(10)], label_embeddings=[[0.0] * 16] * 10, train_rows=128))
    torch.manual_seed(0)
    recipe.model = build_model(cfg.model, num_labels=10, label_dim=16)
    recipe.ema = ModelEma(recipe.model, cfg.ema)
    recipe.device = torch.device("cpu")
    recipe.precision = StepPrecision("fp32", recipe.device)
    recipe.state = TrainingState(epoch=1, step=16)
    rows = first_rows(mosaic_dir, "train", 16)
    train = transform_batch(rows, cfg=cfg.data, num_labels=10, train=True, seed=0)
    recipe.probe, recipe.probe_ids = torch.from_numpy(train["image"]), [str(i) for i in train["id"]]
    recipe.probe_views = None  # as setup leaves it: made by the first evaluate
    test = transform_batch(first_rows(mosaic_dir, "test", 8), cfg=cfg.data, num_labels=10, train=False, seed=None)
    batch = {k: torch.from_numpy(v) if k in ("image", "target", "ignore") else v for k, v in test.items()}
    metrics = recipe.epoch_metrics(1, {}, recipe.evaluate(iter([batch])))
    assert recipe.probe_views is not None and recipe.probe_views[0].shape == (16, 3, 64, 64)
    for prefix in ("", "ema_"):
        assert metrics[f"{prefix}scene_stability_batch"] == 1.0  # frozen BatchNorm: no coupling
        assert 0.0 <= metrics[f"{prefix}scene_stability_augment"] <= 1.0
        assert 0.0 <= metrics[f"{prefix}scene_agreement"] <= 1.0
