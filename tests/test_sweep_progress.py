"""What `salgl tune` prints while a sweep runs (``jobs.sweep.progress.SweepProgress``), on Tune's
callback calls with stand-in trials."""

from __future__ import annotations

from types import SimpleNamespace

from jobs.sweep.progress import SweepProgress

BASE = {"model.head.num_scenes": 4, "loss.entropy_weight": 1.0, "model.head.steps": 3}


def trial(trial_id: str, k: int, *, status: str = "RUNNING", best: float | None = None, last: dict | None = None):
    """The parts of a ``ray.tune.experiment.Trial`` the callback reads."""
    return SimpleNamespace(
        trial_id=trial_id, status=status, last_result=last or {},
        config={"model.head.num_scenes": k, "loss.entropy_weight": 0.25},
        metric_analysis={} if best is None else {"ema_mAP": {"max": best, "last": best}},
    )


def progress(total: int = 4, max_epochs: int = 3) -> tuple[SweepProgress, list[str]]:
    lines: list[str] = []
    return SweepProgress(total, max_epochs, BASE, write=lines.append), lines


def test_start_names_the_trial_as_its_mlflow_run_and_counts_it() -> None:
    callback, lines = progress()
    trials = [trial("a_00000", 2, status="TERMINATED"), trial("a_00001", 6)]
    callback.on_trial_start(0, trials, trials[1])
    assert lines[0].endswith("trial 2/4 K6-lam0.25-T3-a_00001 started")
    assert lines[0].startswith("0:00  ")


def test_each_epoch_prints_the_metrics_and_the_sweep_best_including_this_result() -> None:
    callback, lines = progress()
    trials = [trial("a_00000", 2, status="TERMINATED", best=61.5), trial("a_00001", 6)]
    result = {"epoch": 2, "loss": 0.5, "mAP": 60.0, "ema_mAP": 58.25, "ema_scene_entropy": 0.9, "images_per_s": 100.0}
    callback.on_trial_result(0, trials, trials[1], result)
    assert "K6-lam0.25-T3-a_00001  epoch 2/3" in lines[0] and "EMA mAP 58.25" in lines[0]
    assert lines[0].endswith("(sweep best 61.50)")
    callback.on_trial_result(0, trials, trials[1], {**result, "ema_mAP": 70.0})
    assert lines[1].endswith("(sweep best 70.00)")  # Tune records a result after its callbacks


def test_completion_tells_an_asha_stop_from_a_finished_trial_and_counts_trials_done() -> None:
    callback, lines = progress()
    done = trial("a_00000", 2, status="TERMINATED", last={"epoch": 3, "ema_mAP": 61.5})
    stopped = trial("a_00001", 6, last={"epoch": 1, "ema_mAP": 40.0})
    finished = trial("a_00002", 1, last={"epoch": 3, "ema_mAP": 65.0})
    pending = trial("a_00003", 8, status="PENDING")
    trials = [done, stopped, finished, pending]
    callback.on_trial_complete(0, trials, stopped)
    assert lines[0].endswith("trial K6-lam0.25-T3-a_00001 stopped by ASHA after epoch 1/3, EMA mAP 40.00  [2/4 trials done]")
    stopped.status = "TERMINATED"
    callback.on_trial_complete(0, trials, finished)
    assert lines[1].endswith("trial K1-lam0.25-T3-a_00002 finished 3 epochs, EMA mAP 65.00  [3/4 trials done]")


def test_failures_say_whether_tune_retries() -> None:
    callback, lines = progress()
    failing = trial("a_00001", 6)
    failing.error_file = "/runs/sweep/tune/a_00001/error.txt"
    callback.on_trial_recover(0, [failing], failing)
    callback.on_trial_error(0, [failing], failing)
    assert "K6-lam0.25-T3-a_00001 failed; Tune retries it from its last checkpoint" in lines[0]
    assert lines[1].endswith("K6-lam0.25-T3-a_00001 failed: see /runs/sweep/tune/a_00001/error.txt")
