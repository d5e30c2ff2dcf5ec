"""Sweep search spaces from the command line, trial names, and how many trials a sweep has."""

from __future__ import annotations

import pytest

from jobs.tune import build_space, expected_trials, parse_space_item, trial_config, trial_label
from salgl.config import preset, to_flat


def test_space_items_parse_to_tune_domains() -> None:
    from ray.tune.search.sample import Categorical, Float

    assert isinstance(parse_space_item("K", "2,4,6"), Categorical)
    log = parse_space_item("lambda", "log:0.01:10")
    assert isinstance(log, Float) and (log.lower, log.upper) == (0.01, 10.0)
    assert parse_space_item("K", "grid:2,4") == {"grid_search": [2, 4]}
    assert parse_space_item("T", "3") == 3 and parse_space_item("optim.lr", "1e-3") == 0.001
    with pytest.raises(ValueError, match="K: empty search values"):
        parse_space_item("K", ",")


def test_aliases_resolve_and_override_the_default_space() -> None:
    space = build_space({"K": "grid:1,2", "T": "1"})
    assert space["model.head.num_scenes"] == {"grid_search": [1, 2]}
    assert space["model.head.steps"] == 1
    assert "loss.entropy_weight" in space  # the default lambda range stays


def test_expected_trials_multiply_grids_by_samples() -> None:
    assert expected_trials(build_space({}), 8) == 8  # random draws only
    assert expected_trials(build_space({"K": "grid:1,2", "optim.lr": "grid:0.003,1e-9,1e-4"}), 2) == 12


def test_trial_label_names_k_lambda_t() -> None:
    flat = {"model.head.num_scenes": 6, "loss.entropy_weight": 0.123456, "model.head.steps": 3}
    assert trial_label(flat, "ab12_00003") == "K6-lam0.123-T3-ab12_00003"


def test_a_trial_takes_its_sampled_values_and_leaves_retries_to_tune() -> None:
    base = preset("tiny", {"run.max_failures": 2})
    config = {"__base__": to_flat(base), "__parent_run_id__": "p", "model.head.num_scenes": 3, "loss.entropy_weight": 0.5}
    cfg = trial_config(config, "ab12_00001")
    assert (cfg.model.head.num_scenes, cfg.loss.entropy_weight, cfg.run.name) == (3, 0.5, "trial-ab12_00001")
    # A Train-level retry raced Tune's stop of the trial and leaked a placement group.
    assert cfg.run.max_failures == 0 and cfg.optim == base.optim


def test_closing_trial_runs_marks_tune_stops_killed_and_keeps_real_failures(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.tracking import end_run, start_run
    from jobs.tune import close_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "sweep-test", run_name="sweep", params={})
    runs = {}
    for trial, status in (("t1", "FAILED"), ("t2", "FAILED"), ("t3", "RUNNING"), ("t4", "FINISHED"), ("t5", "FAILED")):
        runs[trial] = start_run(uri, "sweep-test", run_name=trial, params={"trial_id": trial}, parent_run_id=parent)
        if status != "RUNNING":
            end_run(uri, runs[trial], status)
    summary = [
        {"trial": "t1", "stopped_early": True, "epochs": 1, "error": None},  # stopped by ASHA, reached training as an error
        {"trial": "t2", "stopped_early": False, "epochs": 1, "error": "RuntimeError('boom')"},  # a real failure
        {"trial": "t3", "stopped_early": True, "epochs": 1, "error": None},
        {"trial": "t4", "stopped_early": False, "epochs": 3, "error": None},
        {"trial": "t5", "stopped_early": False, "epochs": 3, "error": None},  # stopped at max_t while Train shut down
    ]
    close_trial_runs(uri, parent, summary)
    client = MlflowClient(uri)
    status = {t: client.get_run(r).info.status for t, r in runs.items()}
    assert status == {"t1": "KILLED", "t2": "FAILED", "t3": "KILLED", "t4": "FINISHED", "t5": "KILLED"}
    assert client.get_run(runs["t1"]).data.tags["asha.stopped_early"] == "true"
