"""Seeds that follow the epoch, not Ray's execution count.

Ray Data combines a ``reseed_after_execution`` seed with the execution index of the dataset, which
a Ray Train ``SplitCoordinator`` increments once per epoch and which restarts at 0 whenever Train
rebuilds its worker group (a replaced worker, or ``salgl train --resume``). These configs shift
that index by the epoch the run (re)starts from, so pass i of a restarted run draws the numbers of
epoch ``start_epoch + i``: a restarted run sees exactly the file orders, row orders and
augmentations of an uninterrupted one, and its co-occurrence counts come out identical.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.data import DataContext, FileShuffleConfig, RandomSeedConfig
from ray.data._internal.random_config import SeedTuple


@dataclass
class EpochSeed(RandomSeedConfig):
    start_epoch: int = 0

    def get_seed_tuple(self, *, data_context: DataContext) -> SeedTuple | None:
        tuple_ = super().get_seed_tuple(data_context=data_context)
        if tuple_ is None or tuple_.execution_idx is None:
            return tuple_
        return SeedTuple(seed=tuple_.seed, execution_idx=tuple_.execution_idx + self.start_epoch)


@dataclass
class EpochFileShuffle(FileShuffleConfig):
    start_epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        return super().get_seed(execution_idx + self.start_epoch)
