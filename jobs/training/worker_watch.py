"""What a run's worker group goes through, said on the Train controller: workers lost (a process,
or a whole node), and the size the group starts again at (an elastic run, ``run.min_workers``,
continues with fewer workers when a node is gone), with the time it took."""

from __future__ import annotations

import logging
import time
from typing import Any

from jobs.logs import configure_worker_logging

# The run's own lines keep the logger name of the run's other controller lines (jobs.training.epoch_report).
log = logging.getLogger("jobs.training.driver")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def make_worker_watch(workers: int | tuple[int, int], *, max_failures: int, level: int, log_file: str | None = None) -> Any:
    """A Train controller callback for ``RunConfig(callbacks=)``. ``workers`` is the run's
    ``ScalingConfig(num_workers=)``: a count, or (min, max) for an elastic run; ``max_failures``
    its ``FailureConfig``'s (restarts allowed); ``level`` the console level of the run's lines
    (they always go to ``log_file``)."""
    from pipeline.ray_compat import worker_group_callback_class

    elastic = isinstance(workers, tuple)
    most = workers[1] if elastic else workers

    class WorkerWatch(worker_group_callback_class()):  # type: ignore[misc]
        lost_at: float | None = None
        logging_ready = False
        failures = 0

        def _ready(self) -> None:
            if not self.logging_ready:
                configure_worker_logging(level, log_file)
                self.logging_ready = True

        def after_worker_group_poll_status(self, worker_group_status: Any) -> None:
            errors = getattr(worker_group_status, "errors", None)
            if not errors or self.lost_at is not None:
                return
            self._ready()
            self.lost_at = time.monotonic()
            self.failures += 1
            ranks = ", ".join(str(rank) for rank in sorted(errors))
            some = first_line(next(iter(errors.values())))
            if self.failures > max_failures:
                then = f"no restart left (run.max_failures={max_failures}): the run stops"
            elif elastic:
                then = f"continuing from the last checkpoint with {workers[0]} to {most} workers, as the cluster allows"
            else:
                then = f"restarting {most} workers from the last checkpoint"
            log.warning(f"lost worker{'s' if len(errors) > 1 else ''} {ranks} ({some}); {then}")

        def after_worker_group_start(self, worker_group: Any) -> None:
            if self.lost_at is None:
                return
            self._ready()
            size = len(worker_group.get_workers())
            log.warning(f"workers running again: {size} worker{'s' if size != 1 else ''} of {most}, "
                        f"{time.monotonic() - self.lost_at:.1f} s after the loss")
            self.lost_at = None

    return WorkerWatch()
