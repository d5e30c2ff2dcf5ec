"""Progress inside a training epoch: a line every ``every_s`` seconds of wall time (or every
``every_steps`` steps, whichever comes first) from rank 0, so that a long epoch shows it moves.

Each rank knows only its own steps and images, and the line needs nothing more: no collective is
added to a step. Images/s scales rank 0's count by the world size, as the epoch's metric does, and
is measured from the end of the first step, so the data pipeline's start (tens of seconds on a
small machine) does not inflate the ETA. The loss is the epoch's mean so far on rank 0.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour up."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


def format_step_line(epoch: int, epochs: int, step: int, total: int, images_per_s: float, eta_s: float, loss: float) -> str:
    return (
        f"epoch {epoch}/{epochs}  step {step}/{total}  loss {loss:.4f}  {images_per_s:.1f} img/s  "
        f"ETA {format_duration(eta_s)}"
    )


class StepProgress:
    """Call ``update`` after every step; it writes a line when one is due.

    ``enabled`` is decided once (rank 0 of a run); ``clock`` and ``emit`` are there for tests.
    No line on the epoch's last step: the epoch's own line follows it.
    """

    def __init__(
        self,
        total: int,
        *,
        epoch: int,
        epochs: int,
        world_size: int = 1,
        every_s: float = EVERY_S,
        every_steps: int = 0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.total, self.epoch, self.epochs, self.world_size = total, epoch, epochs, world_size
        self.every_s, self.every_steps = every_s, every_steps
        self.enabled = enabled
        self.clock = clock
        self.emit = emit or log.info
        self.last = clock()
        self.last_step = 0
        self.first: tuple[int, int, float] | None = None  # (step, images, time) at the first update

    def due(self, step: int, now: float) -> bool:
        if not 0 < step < self.total:
            return False
        by_steps = self.every_steps > 0 and step - self.last_step >= self.every_steps
        return by_steps or now - self.last >= self.every_s

    def update(self, step: int, images: int, loss: float) -> None:
        """``step`` steps and ``images`` images done on this rank this epoch; ``loss``: their mean."""
        if not self.enabled:
            return
        now = self.clock()
        if self.first is None:
            self.first = (step, images, now)
            return
        if not self.due(step, now):
            return
        self.last, self.last_step = now, step
        first_step, first_images, first_time = self.first
        elapsed = max(now - first_time, 1e-9)
        eta = (self.total - step) * elapsed / (step - first_step)
        images_per_s = (images - first_images) * self.world_size / elapsed
        self.emit(format_step_line(self.epoch, self.epochs, step, self.total, images_per_s, eta, loss))
