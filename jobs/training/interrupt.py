"""Ctrl-C during ``salgl train``: abort the run the way Ray Train does, then raise
``KeyboardInterrupt`` in the driver, so the caller can mark the MLflow run KILLED and say how to
resume.

Ray Train's own SIGINT handler (``DataParallelTrainer._register_sigint_handler``, ray 2.60.0)
aborts the controller and then calls ``sys.exit(0)`` from inside the blocked ``ray.get``, and the
process still ends with status 1 and no word of what to do next. This trainer keeps the graceful
abort (the controller stops the workers and marks the Train run ABORTED) and only changes what
reaches the caller. Tune trials run ``fit()`` off the main thread, where Ray registers no handler.
"""

from __future__ import annotations

import signal
from typing import Any

from ray.train.torch import TorchTrainer


class InterruptibleTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` whose ``fit()`` raises ``KeyboardInterrupt`` on Ctrl-C."""

    def _register_sigint_handler(self, controller: Any) -> None:  # overrides a private hook of ray 2.60.0
        import ray

        def on_sigint(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:  # abort ends the controller actor: expected
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
