"""Seeds: one derivation for every random stream of a run, and seeds that follow the epoch, not
Ray's execution count.

``derive_seed`` hashes the run's seed with a stream's name, epoch, rank, ... so that streams draw
independent numbers and a restarted run draws the same ones (STYLE habit 14).

Ray Data combines a ``reseed_after_execution`` seed with the execution index of the dataset, which
a Ray Train ``SplitCoordinator`` increments once per epoch and which restarts at 0 whenever Train
rebuilds its worker group (a replaced worker, or ``salgl train --resume``). ``EpochSeed`` shifts
that index by the epoch the run (re)starts from, so pass i of a restarted run draws the numbers of
epoch ``start_epoch + i``: a restarted run sees exactly the chunk orders, row orders and
augmentations of an uninterrupted one, and its co-occurrence counts come out identical.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ray.data import DataContext, RandomSeedConfig

from pipeline.ray_compat import seed_tuple


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 32-bit seed for one random stream: ``seed`` and ``parts`` (stream name, epoch, rank, ...)
    hashed together."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")  # < 2**32: NumPy's legacy seed range


@dataclass
class EpochSeed(RandomSeedConfig):
    start_epoch: int = 0

    def get_seed_tuple(self, *, data_context: DataContext) -> Any:
        tuple_ = super().get_seed_tuple(data_context=data_context)
        if tuple_ is None or tuple_.execution_idx is None:
            return tuple_
        return seed_tuple(tuple_.seed, tuple_.execution_idx + self.start_epoch)
