"""Progress inside a training epoch: a line every ``every_s`` seconds of wall time (or every
``every_steps`` steps, whichever comes first) from rank 0, so that a long epoch shows it moves.

Each rank knows only its own steps and images, and the line needs nothing more: no collective is
added to a step. Images/s scales rank 0's count by the world size, as the epoch's metric does, and
is measured from the end of the first step, so the data pipeline's start (tens of seconds on a
small machine) does not inflate the ETA. The loss is the epoch's mean so far on rank 0.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable

log = logging.getLogger(__name__)

EVERY_S = 30.0
STATUS_FILE = "progress.json"  # in the run folder: rank 0's latest step, for the driver's bar
STATUS_EVERY_S = 1.0


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
        status_file: Path | None = None,
    ) -> None:
        self.total, self.epoch, self.epochs, self.world_size = total, epoch, epochs, world_size
        self.status_file = status_file  # where the driver's bar reads the latest step (ProgressBar)
        self.last_status = float("-inf")
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
            self._write_status(step, 0.0, None, loss, now)
            return
        first_step, first_images, first_time = self.first
        elapsed = max(now - first_time, 1e-9)
        images_per_s = (images - first_images) * self.world_size / elapsed
        eta = (self.total - step) * elapsed / (step - first_step) if step > first_step else None
        self._write_status(step, images_per_s, eta, loss, now)
        if not self.due(step, now) or eta is None:
            return
        self.last, self.last_step = now, step
        self.emit(format_step_line(self.epoch, self.epochs, step, self.total, images_per_s, eta, loss))

    def _write_status(self, step: int, images_per_s: float, eta: float | None, loss: float, now: float) -> None:
        """At most once a second (and at the epoch's last step), the latest step for the bar."""
        if self.status_file is None or (now - self.last_status < STATUS_EVERY_S and step < self.total):
            return
        from salgl.atomic_file import write_text_atomic

        self.last_status = now
        status = {"epoch": self.epoch, "epochs": self.epochs, "step": step, "total": self.total,
                  "images_per_s": images_per_s, "eta_s": eta, "loss": loss}
        write_text_atomic(self.status_file, json.dumps(status))


class ProgressBar:
    """The driver's progress bar while a run trains, when its stderr is a terminal: a tqdm bar per
    epoch, fed by the status file rank 0 writes (``StepProgress(status_file=...)``), polled on a
    thread. The workers' 30 s lines then stay in the run's salgl.log."""

    def __init__(self, status_file: Path, *, stream: IO[str] | None = None, poll_s: float = 0.5) -> None:
        self.status_file, self.stream, self.poll_s = Path(status_file), stream, poll_s
        self.bar: Any = None
        self.epoch: int | None = None
        self.seen: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="salgl-progress-bar", daemon=True)

    def __enter__(self) -> "ProgressBar":
        self.status_file.unlink(missing_ok=True)  # a resumed run's old status is not this one's
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._close()

    def _run(self) -> None:
        while not self.stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Show the status file's step, if it changed since the last look."""
        try:
            mtime = self.status_file.stat().st_mtime_ns
            if mtime == self.seen:
                return
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):  # not written yet
            return
        self.seen = mtime
        from tqdm import tqdm

        if status["epoch"] != self.epoch:
            self._close()
            self.epoch = status["epoch"]
            # tqdm's own rate and ETA would time the polls, not the steps: the status file has both.
            self.bar = tqdm(total=status["total"], desc=f"epoch {status['epoch']}/{status['epochs']}", file=self.stream,
                            leave=False, dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")
        eta = status.get("eta_s")
        self.bar.n = status["step"]
        self.bar.set_postfix_str(f"loss {status['loss']:.4f}  {status['images_per_s']:.1f} img/s  "
                                 f"ETA {format_duration(eta) if eta is not None else '-'}", refresh=False)
        self.bar.refresh()
        if status["step"] >= status["total"]:  # cleared before the epoch's own line arrives
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
