"""What the driver hands every training worker (``jobs.training.recipe.train_loop_per_worker``).

Apart from ``jobs.training.recipe`` so that the driver, and the process of every Tune trial, can build it
without importing the training stack (torch.distributed, timm, the model: about 2 s of a trial's
start-up on 2 cores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class WorkerSpec:
    """Plain values, so Ray can ship it."""

    config: dict[str, Any]  # flat dotted keys
    vocabulary: list[str]
    label_embeddings: list[list[float]]
    train_rows: int
    threads: int = 1
    run_dir: str = ""  # this run's folder: an absolute path or an object-store URI (jobs.storage)
    local_dir: str = ""  # a local folder for salgl.log, the progress file and the fault-injection marker
    scene_mixture: dict[str, Any] | None = None  # {"prior": (K,), "theta": (K, n)}: salgl/scenes.py
    log_level: int = logging.INFO  # the console's (jobs.logs.console_level); WARNING in a sweep's trials
    progress_bar: bool = False  # the driver shows a bar (a terminal): rank 0 writes its status, lines go to the log only

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "WorkerSpec":
        return WorkerSpec(**data)
