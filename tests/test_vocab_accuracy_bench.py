"""tests/bench/vocab_accuracy.py's core at tiny size (seconds): the generator and one train + test."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests.bench import vocab_accuracy as va

TINY = replace(va.QUICK_DATA, labels=96, regions=4, token_dim=8, label_dim=8, train_images=96, test_images=64)


@pytest.fixture
def one_thread():
    """The bench's setting; on a loaded 2-core machine two threads make these tiny steps slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_generator_draws_labels_from_the_scene_pool():
    world, train_set, test_set = va.make_data(TINY)
    groups_of = torch.full((TINY.labels,), -1)
    groups_of[world.groups.reshape(-1)] = torch.arange(world.groups.shape[0]).repeat_interleave(TINY.group_size)
    for data in (train_set, test_set):
        assert data.targets.sum(1).min() >= 1  # every image has a label
        for scene, row in zip(data.scene.tolist(), data.targets):
            labels = row.nonzero().squeeze(1)
            groups = groups_of[labels]
            outside = (~world.pools[scene][groups.clamp(min=0)]) | (groups < 0)
            assert int(outside.sum()) <= 1  # all from the scene's pool but at most one clutter label
    assert not torch.equal(train_set.tokens[:8], test_set.tokens[:8])  # different sample seeds
    assert va.make_data(TINY)[1].targets.equal(train_set.targets)  # the data seed fixes the data
    weak = world.visibility < 1.0
    assert torch.allclose(world.visibility[weak], torch.tensor(TINY.weak_visibility)) and 0 < int(weak.sum()) < TINY.labels


def test_one_tiny_run_gives_a_finite_map(one_thread):
    world, train_set, test_set = va.make_data(TINY)
    mixture = va.fit_mixture(train_set.targets, 6, restarts=1)
    train = replace(va.QUICK_TRAIN, steps=3, batch=8, attn_dim=8, eval_batch=16)
    for variant in ("dense", "sparse-k4", "T0"):
        row = va.train_and_eval(variant, 0, world, train_set, test_set, TINY, train, mixture)
        assert math.isfinite(row["mAP"]) and 0.0 <= row["mAP"] <= 100.0  # percent, as salgl.metrics reports
        assert 0 < row["labels_scored"] <= TINY.labels
    summary = va.summarize([{**row, "seed": s} for s in (0, 1)], ["T0"])
    assert summary["T0"]["mAP"]["std"] == 0.0
