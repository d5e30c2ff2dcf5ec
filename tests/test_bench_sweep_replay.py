"""The sweep benchmark's ASHA replay (tests/bench/sweep.py) follows Ray's own rule: on random
curves with ties, the epochs it gives each trial are those Ray 2.60's ASHA bracket allows when the
trials report one after another."""

from __future__ import annotations

import random

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from tests.bench.sweep import asha_epochs


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _ray_epochs(curves: list[list[float]], max_t: int, grace: int, rf: int) -> list[int]:
    bracket = _Bracket(grace, max_t, rf, 0)
    epochs = []
    for index, curve in enumerate(curves):
        trial, ran = _Trial(str(index)), max_t
        for epoch in range(1, max_t + 1):
            if bracket.on_result(trial, epoch, curve[epoch - 1]) == TrialScheduler.STOP:
                ran = epoch
                break
        epochs.append(ran)
    return epochs


@pytest.mark.parametrize("seed", range(4))
def test_replay_stops_trials_where_rays_asha_bracket_does(seed: int) -> None:
    rng = random.Random(seed)
    stopped = 0
    for _ in range(60):
        max_t, rf, grace = rng.choice([4, 8, 16, 27]), rng.choice([2, 3, 4]), rng.choice([1, 2])
        curves = [[round(rng.random(), 1) for _ in range(max_t)] for _ in range(rng.randint(1, 9))]  # ties too
        ours = asha_epochs(curves, max_t, grace, rf)
        assert ours == _ray_epochs(curves, max_t, grace, rf)
        stopped += sum(e < max_t for e in ours)
    assert stopped > 0  # the cases exercise stopping, not only running to the end
