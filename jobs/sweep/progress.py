"""What ``salgl tune`` shows while a sweep runs: a Tune callback on the driver, logging.

The trials train with ``quiet=True`` (their controllers' lines would arrive through Ray's log
forwarding, interleaved and prefixed) and Tune's own reporter is off (``verbose=0``: its status
table repeats every trial at every step). This logs one line per event instead, each naming
the trial as its MLflow child run is named.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

from ray.tune import Callback

from jobs.training.epoch_report import format_epoch_line
from jobs.sweep.search_space import METRIC, trial_label, trial_values

log = logging.getLogger(__name__)


class SweepProgress(Callback):
    """Trial started / each epoch / stopped by ASHA or finished / failed, with the sweep's clock.

    ``total`` is the number of trials the sweep has; ``base`` the sweep's flat config (a trial's
    Tune config holds only its sampled values); ``metric`` what the sweep ranks by; ``write`` takes
    each line (``log.info`` by default).
    """

    metric: str = METRIC  # a callback pickled by an older sweep (restored by --resume) has no attribute of its own

    def __init__(
        self, total: int, max_epochs: int, base: Mapping[str, Any], write: Callable[[str], None] | None = None,
        metric: str = METRIC,
    ) -> None:
        self.metric = metric
        self.total = total
        self.max_epochs = max_epochs
        self.base = dict(base)
        self.write = write or _log
        self.started = time.monotonic()

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()  # also when a restored sweep starts again

    def _line(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        self.write(f"{minutes:d}:{seconds:02d}  {text}")

    def _name(self, trial: Any) -> str:
        return trial_label(trial_values(self.base, trial.config), trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"trial {trials.index(trial) + 1}/{self.total} {self._name(trial)} started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        best = _sweep_best(trials, result.get(self.metric), self.metric)
        label = "" if self.metric == METRIC else f" {self.metric}"
        sweep_best = f"  (sweep best{label} {best:.2f})" if best is not None else ""
        self.write(format_epoch_line(result, self.max_epochs, label=self._name(trial)) + sweep_best)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        epochs = int(last.get("epoch") or 0)
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        if 0 < epochs < self.max_epochs:
            what = f"stopped by ASHA after epoch {epochs}/{self.max_epochs}"
        else:
            what = f"finished {epochs} epochs"
        value = last.get(self.metric)
        name = "EMA mAP" if self.metric == METRIC else self.metric
        metric = f", {name} {value:.2f}" if isinstance(value, (int, float)) else ""
        self._line(f"trial {self._name(trial)} {what}{metric}  [{done}/{self.total} trials done]")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"trial {self._name(trial)} failed; Tune retries it from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        where = getattr(trial, "error_file", None)
        self._line(f"trial {self._name(trial)} failed" + (f": see {where}" if where else ""))


def _sweep_best(trials: list, value: Any, metric: str = METRIC) -> float | None:
    """The best metric so far over every trial (kept in Tune's trial state, so a resumed sweep
    counts the epochs before the interruption) and this result's, which Tune records after the
    callbacks have seen it."""
    values = [t.metric_analysis[metric]["max"] for t in trials if metric in t.metric_analysis]
    if isinstance(value, (int, float)):
        values.append(value)
    return max(values) if values else None


def _log(line: str) -> None:  # a module function: Tune pickles the callback with the sweep's state
    log.info(line)
