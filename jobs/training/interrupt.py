"""Ctrl-C, SIGTERM or SIGHUP during ``salgl train``: abort the run the way Ray Train does, then
raise ``KeyboardInterrupt`` in the driver, so the caller can mark the MLflow run KILLED and say how
to resume.

Ray Train's own SIGINT handler (``DataParallelTrainer._register_sigint_handler``, ray 2.60.0)
aborts the controller and then calls ``sys.exit(0)`` from inside the blocked ``ray.get``, and the
process still ends with status 1 and no word of what to do next. This trainer keeps the graceful
abort (the controller stops the workers and marks the Train run ABORTED) and only changes what
reaches the caller. The stop signals (``jobs.stop_signals``: what ``kill``, ``timeout``, a scheduler
or a closed terminal send) take the same path, where they would otherwise raise out of ``fit()``
past the controller; a signal the process ignores (``nohup``) stays ignored. Tune trials run
``fit()`` off the main thread, where Ray registers no handler.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from ray.train.torch import TorchTrainer

from jobs.stop_signals import STOP_SIGNALS, handlers_restored, install, stop_like_ctrl_c

log = logging.getLogger(__name__)

ABORT_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)


class InterruptibleTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` whose ``fit()`` aborts its run and raises ``KeyboardInterrupt`` on Ctrl-C,
    SIGTERM or SIGHUP; the process's handlers are back as they were once ``fit()`` returns."""

    def fit(self) -> Any:
        with handlers_restored(ABORT_SIGNALS):
            return super().fit()

    def _register_sigint_handler(self, controller: Any) -> None:  # overrides a private hook of ray 2.60.0
        import ray

        def on_stop(signum: int, frame: Any) -> None:
            install(stop_like_ctrl_c, ABORT_SIGNALS)  # a second stop ends at once
            log.info(f"{signal.Signals(signum).name}: stopping the run's workers (its checkpoints so far are kept)")
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:  # abort ends the controller actor: expected
                pass
            stop_like_ctrl_c(signum, frame)

        install(on_stop, ABORT_SIGNALS)
