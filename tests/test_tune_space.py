"""Sweep search spaces from the command line, trial names, and how many trials a sweep has."""

from __future__ import annotations

import pytest

from jobs.sweep.search_space import build_space, check_space, expected_trials, parse_space_item
from jobs.sweep.tune import trial_config, trial_label
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
    config = {"model.head.num_scenes": 3, "loss.entropy_weight": 0.5}  # Tune's config: the sampled values alone
    cfg = trial_config(config, "ab12_00001", to_flat(base))
    assert (cfg.model.head.num_scenes, cfg.loss.entropy_weight, cfg.run.name) == (3, 0.5, "trial-ab12_00001")
    # A Train-level retry raced Tune's stop of the trial and leaked a placement group.
    assert cfg.run.max_failures == 0 and cfg.optim == base.optim


def test_closing_trial_runs_finishes_tune_stops_tagged_and_keeps_real_failures(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.tracking import end_run, start_run
    from jobs.sweep.tune import close_trial_runs

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
    assert status == {"t1": "FINISHED", "t2": "FAILED", "t3": "FINISHED", "t4": "FINISHED", "t5": "FINISHED"}
    tags = {t: client.get_run(r).data.tags for t, r in runs.items()}
    assert tags["t1"]["salgl.stopped_by"] == "asha" and tags["t1"]["salgl.stopped_at_epoch"] == "1"
    assert tags["t1"]["asha.stopped_early"] == "true"
    assert "salgl.stopped_by" not in tags["t5"] and "salgl.stopped_by" not in tags["t2"]


def test_a_bad_search_space_is_refused_before_any_trial_runs() -> None:
    from salgl.config import ConfigError

    base = preset("tiny")
    check_space(base, build_space({"K": "1,2,4", "lambda": "log:0.01:10", "T": "grid:0,3"}))  # the usual kind
    with pytest.raises(ConfigError, match=r"model.head.num_scenes: in the search space: must be >= 1, got 0$"):
        check_space(base, build_space({"K": "2,0"}))
    with pytest.raises(ConfigError, match="expected an integer, got 'foo:1'"):
        check_space(base, build_space({"K": "foo:1"}))
    with pytest.raises(ConfigError, match="a range draws fractional values"):  # ends 1 and 8 would pass
        check_space(base, build_space({"K": "log:1:8"}))
    with pytest.raises(ConfigError, match="optim.lr: in the search space: must be > 0"):
        check_space(base, build_space({"optim.lr": "grid:0.001,0"}))
    with pytest.raises(ConfigError, match="unknown key"):
        check_space(base, build_space({"optim.nope": "1,2"}))


def test_search_ranges_and_schedules_are_checked_with_their_own_words() -> None:
    from salgl.errors import BadValue
    from jobs.sweep.tune import check_schedule

    for text, words in (("log:1", "expected log:LOW:HIGH"), ("log:0:1", "LOW > 0"), ("uniform:2:1", "LOW must be below HIGH"), ("grid:", "empty")):
        with pytest.raises(BadValue, match=words):
            parse_space_item("lambda", text)
    check_schedule(8, 16, 1, 4)
    for args, words in (((0, 4, 1, 2), "samples"), ((8, 0, 1, 2), "max epochs"), ((8, 4, 5, 2), r"grace period must lie in 1\.\.4"), ((8, 4, 1, 1), "reduction factor")):
        with pytest.raises(BadValue, match=words):
            check_schedule(*args)


def test_cli_input_errors_are_one_line_and_overrides_may_follow_options(tmp_path, capsys) -> None:
    from jobs.cli import main

    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"salgl tune: error: {tmp_path} is not a sweep folder (no salgl_sweep.json); a sweep's folder is run.storage/<sweep name>, printed when the sweep started\n"
    # K=2,0 comes after an option: still an override (the space check names it), not an unknown argument.
    assert main(["tune", "tiny", "--samples", "2", "K=2,0", f"run.storage={tmp_path}"]) == 2
    assert capsys.readouterr().err == "salgl tune: error: model.head.num_scenes: in the search space: must be >= 1, got 0\n"
    assert main(["tune", "tiny", f"data.path={tmp_path / 'nope'}"]) == 2
    assert "holds no manifest.json: prepare it first" in capsys.readouterr().err
    assert main(["train", "tiny", "--address", "auto", "nope.key=1"]) == 2
    assert capsys.readouterr().err.startswith("salgl train: error: nope.key: unknown key")
    with pytest.raises(SystemExit):
        main(["tune", "tiny", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_sweep_that_breaks_marks_its_mlflow_parent_failed(tmp_path, caplog) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.tracking import start_run
    from jobs.sweep.tune import _fit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = {"tracking_uri": uri, "parent_run_id": start_run(uri, "sweep-test", run_name="sweep", params={})}

    class BrokenTuner:
        def fit(self):
            raise RuntimeError("the cluster went away")

    with pytest.raises(RuntimeError, match="went away"):
        _fit(BrokenTuner(), tmp_path / "sweep", record)
    assert MlflowClient(uri).get_run(record["parent_run_id"]).info.status == "FAILED"
    assert f"salgl tune --resume {tmp_path / 'sweep'}" in caplog.text  # a warning: shown with -q too


def test_every_ranking_metric_is_a_score_the_epoch_report_has() -> None:
    import numpy as np

    from jobs.sweep.search_space import RANKING_METRICS
    from salgl.metrics import multilabel_metrics

    scores = multilabel_metrics(np.random.default_rng(0).random((8, 3)), np.eye(8, 3))
    assert {name.removeprefix("ema_") for name in RANKING_METRICS} <= set(scores)
    assert {"mAP", "ema_mAP"} <= set(RANKING_METRICS) and "loss" not in RANKING_METRICS


def test_an_unknown_ranking_metric_is_a_usage_error_before_ray_starts(tmp_path, capsys) -> None:
    from jobs.cli import main

    assert main(["tune", "tiny", "--metric", "ema_map", f"run.storage={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salgl tune: error: unknown ranking metric 'ema_map'; choose one of mAP, ") and "ema_mAP" in err


def test_the_space_reads_as_its_values_on_the_sweep_parent() -> None:
    from jobs.sweep.search_space import describe_domain
    from salgl.config import short_key

    space = build_space({"K": "1,2,4", "T": "grid:0,3", "optim.lr": "uniform:1e-4:1e-3", "ema.decay": "0.99"})
    shown = {f"space.{short_key(k)}": describe_domain(v) for k, v in space.items()}
    assert shown == {
        "space.K": "choice[1, 2, 4]", "space.lambda": "loguniform[0.01, 10.0]", "space.T": "grid[0, 3]",
        "space.optim.lr": "uniform[0.0001, 0.001]", "space.ema.decay": "0.99",
    }


def test_a_trial_asha_stopped_gets_its_scene_pictures_and_weights_from_its_run_folder(tmp_path) -> None:
    """Tune ended the trial's process before ``train`` recorded anything: the sweep does it."""
    import torch
    from mlflow.tracking import MlflowClient

    from jobs.storage import Folder
    from jobs.sweep.tune import close_trial_runs
    from jobs.tracking import start_run
    from jobs.training.checkpoints import load_model_from_checkpoint
    from jobs.training.run_folder import RUN_FILE, write_run_file
    from tests._tiny_checkpoint import tiny_config, write_tiny_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "sweep-test", run_name="sweep", params={})
    run_dir = tmp_path / "trials" / "trial-t1"
    child = start_run(uri, "sweep-test", run_name="t1", params={"trial_id": "t1"}, parent_run_id=parent,
                      tags={"salgl.run_dir": str(run_dir)})
    checkpoint = write_tiny_checkpoint(run_dir / "checkpoint_000000", [f"c{i}" for i in range(4)])
    write_run_file(Folder(str(run_dir)), {"run_name": "trial-t1", "data_dir": "", "config": to_flat(tiny_config()),
                             "tracking_uri": uri, "mlflow_run_id": child})
    assert (run_dir / RUN_FILE).is_file()
    close_trial_runs(uri, parent, [{"trial": "t1", "stopped_early": True, "epochs": 1, "error": None}])

    client = MlflowClient(uri)
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["salgl.stopped_by"] == "asha"
    scenes = {a.path.split("/")[-1] for a in client.list_artifacts(child, "scenes")}
    assert {"scene_0_cooccurrence.png", "scene_occupancy.png", "top_labels_per_scene.json"} <= scenes
    top = {a.path for a in client.list_artifacts(child)}
    assert "best_weights" in top and "best_checkpoint" not in top
    weights = torch.load(client.download_artifacts(child, "best_weights/weights.pt", str(tmp_path)), weights_only=True)
    ema, _, _ = load_model_from_checkpoint(checkpoint)
    assert weights.keys() == ema.state_dict().keys()
    torch.testing.assert_close(weights["head.counts"], ema.state_dict()["head.counts"])  # the EMA's, not the live model's
