"""``--search optuna``'s searcher: Ray's ``OptunaSearch`` that tells Optuna the trials ASHA stopped
as pruned. A module of its own because it imports Ray Tune and Optuna when loaded (the class must
live at module level: Tune pickles the searcher with the sweep's state)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)
# The sweep prints its own line per trial (jobs.sweep.progress); Optuna's INFO lines would repeat
# them. Set on import, which both a new sweep and an unpickled (resumed) one go through.
optuna.logging.set_verbosity(optuna.logging.WARNING)


class AshaPrunedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna the trials ASHA stopped as PRUNED, not COMPLETE.

    Tune ends a trial that ASHA stops with ``on_trial_complete(result=<its last report>)``, and that
    report never reaches ``on_trial_result`` (Tune skips the searcher on a STOP decision), so
    ``OptunaSearch`` records the stopped trial as COMPLETE with its early-epoch metric, as if it
    had trained to the end. Here a trial whose last ``time_attr`` (ASHA's, epochs) is below
    ``max_t`` is PRUNED instead: its last report becomes its last intermediate value, which Optuna
    keeps as the trial's value, and TPE ranks pruned trials below the complete ones (and among
    themselves by how far they got). A trial that reached ``max_t``, errored, or never reported
    is told as ``OptunaSearch`` tells it. The attributes live in ``__dict__``, which
    ``OptunaSearch.save`` pickles, so a restored sweep keeps them.
    """

    def __init__(self, *, max_t: int, time_attr: str = "epoch", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_t = max_t
        self._time_attr = time_attr

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or trial_id in self._completed_trials or not self._stopped_early(result):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial = self._ot_trials[trial_id]
        value = result.get(self.metric)
        try:
            if value is not None and TRAINING_ITERATION in result:
                ot_trial.report(value, result[TRAINING_ITERATION])  # the stopping report, on_trial_result never saw
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception as err:  # as OptunaSearch: a NaN metric must not end the sweep
            log.warning(f"trial {trial_id}: Optuna refused the pruned trial: {err}")
        self._completed_trials.add(trial_id)

    def _stopped_early(self, result: Mapping[str, Any]) -> bool:
        reached = result.get(self._time_attr)
        return reached is not None and reached < self._max_t
