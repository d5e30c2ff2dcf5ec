"""`salgl tune --search`: the searchers, and Optuna's record of ASHA's stops, fed the calls Tune makes
(suggest, on_trial_result, on_trial_complete) without starting Ray."""

from __future__ import annotations

import pytest

from jobs.sweep.search import build_searcher, check_search, startup_trials
from jobs.sweep.search_space import METRIC, build_space

MAX_T = 3


def optuna_searcher(seed: int = 0, samples: int = 8, concurrency: int = 1):
    """A ``--search optuna`` searcher as Tune sets it up: the metric, the mode and the space."""
    searcher = build_searcher("optuna", seed=seed, concurrency=concurrency, samples=samples, max_epochs=MAX_T)
    assert searcher.set_search_properties(METRIC, "max", build_space({"T": "1"}))
    return searcher


def report(epoch: int, value: float) -> dict:
    """A flattened epoch report as Tune hands it to the searcher."""
    return {"epoch": epoch, "training_iteration": epoch, METRIC: value}


def states(searcher) -> list[tuple[str, float | None, dict]]:
    study = searcher.searcher._ot_study
    return [(t.state.name, t.value, dict(t.intermediate_values)) for t in study.get_trials(deepcopy=False)]


def test_optuna_records_asha_stops_as_pruned_and_finished_trials_as_complete() -> None:
    searcher = optuna_searcher(concurrency=4)
    for trial_id in ("a", "b", "c", "d"):
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_result(trial_id, report(1, 40.0))
    searcher.on_trial_complete("a", result=report(2, 45.0))  # ASHA stopped it at epoch 2 of 3
    for epoch in (2, 3):
        searcher.on_trial_result("b", report(epoch, 50.0 + epoch))
    searcher.on_trial_complete("b", result=report(3, 53.0))  # ran to the end
    searcher.on_trial_complete("c", error=True)
    searcher.on_trial_complete("d", result=report(MAX_T, 60.0))  # ASHA's STOP at max_t: complete
    assert states(searcher) == [
        ("PRUNED", 45.0, {1: 40.0, 2: 45.0}),  # the stopping report (never seen by on_trial_result) kept
        ("COMPLETE", 53.0, {1: 40.0, 2: 52.0, 3: 53.0}),
        ("FAIL", None, {1: 40.0}),
        ("COMPLETE", 60.0, {1: 40.0}),
    ]


def test_a_trial_ended_before_its_first_report_is_pruned_without_a_value() -> None:
    searcher = optuna_searcher()
    searcher.suggest("a")
    searcher.on_trial_complete("a")  # a pending trial Tune removed
    assert states(searcher) == [("PRUNED", None, {})]


def test_optuna_draws_are_seeded_and_keep_to_the_concurrency() -> None:
    first = [optuna_searcher(seed=7).suggest("a") for _ in range(2)]
    assert first[0] == first[1]
    assert optuna_searcher(seed=8).suggest("a") != first[0]
    limited = optuna_searcher(concurrency=2)
    assert limited.suggest("a") and limited.suggest("b")
    assert limited.suggest("c") is None  # two trials running
    limited.on_trial_complete("a", result=report(1, 10.0))
    assert limited.suggest("c") is not None


def test_a_saved_study_restores_with_its_trials_and_continues_the_same_draws(tmp_path) -> None:
    """What ``--resume`` relies on: Tune saves the searcher with its state and restores it."""
    searcher = optuna_searcher(samples=6, concurrency=4)
    for index in range(3):
        trial_id = f"t{index}"
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, result=report(1 + index, 40.0 + index))
    searcher.save(str(tmp_path / "searcher.pkl"))
    expected = searcher.suggest("t3")

    restored = optuna_searcher(samples=6, seed=123, concurrency=4)  # as Tune rebuilds it, then restores the state
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [state for state, _, _ in states(restored)] == ["PRUNED", "PRUNED", "COMPLETE"]
    assert restored.suggest("t3") == expected
    restored.on_trial_complete("t3", result=report(1, 1.0))
    assert states(restored)[-1][0] == "PRUNED"  # max_t came back with the state


def test_tpe_models_the_results_after_its_startup_trials() -> None:
    assert [startup_trials(n) for n in (1, 6, 8, 30, 100)] == [2, 2, 2, 10, 10]
    sampler = optuna_searcher(samples=8).searcher._ot_study.sampler
    assert type(sampler).__name__ == "TPESampler" and sampler._n_startup_trials == 2
    assert not sampler._constant_liar and optuna_searcher(concurrency=2).searcher._ot_study.sampler._constant_liar


def test_random_search_is_the_seeded_variant_generator() -> None:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    searcher = build_searcher("random", seed=3, concurrency=2, samples=8, max_epochs=MAX_T)
    assert isinstance(searcher, BasicVariantGenerator) and searcher.max_concurrent == 2


def test_optuna_with_grid_values_or_an_unknown_search_is_refused_in_one_line() -> None:
    check_search("random", build_space({"K": "grid:1,2"}))
    check_search("optuna", build_space({"K": "1,2"}))
    with pytest.raises(ValueError, match=r"^--search optuna samples and cannot walk a grid \(model.head.num_scenes\): "):
        check_search("optuna", build_space({"K": "grid:1,2"}))
    with pytest.raises(ValueError, match="unknown search 'tpe'; choose one of random, optuna"):
        check_search("tpe", {})


def test_the_cli_refuses_optuna_over_a_grid_before_ray_starts(tmp_path, capsys) -> None:
    from jobs.cli import main

    assert main(["tune", "tiny", "--search", "optuna", "K=grid:1,2", f"run.storage={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        "salgl tune: error: --search optuna samples and cannot walk a grid (model.head.num_scenes): "
        "list the values without grid: (a choice), or use --search random\n")


def test_the_bench_ranks_trials_by_start_and_keeps_the_best_so_far(tmp_path) -> None:
    """tests/bench/sweep.py --compare-search: Optuna's trial ids carry no index, so the order is
    each trial's first report less that report's own time."""
    import json

    from tests.bench.sweep import arrival_order, running_best

    for name, trial_id, end, took in (("b", "9f3a", 130, 40), ("a", "1c2d", 100, 50), ("c", "77aa", 160, 10)):
        (tmp_path / name).mkdir()
        row = {"trial_id": trial_id, "timestamp": end, "time_this_iter_s": took}
        (tmp_path / name / "result.json").write_text(json.dumps(row) + "\n" + json.dumps({**row, "timestamp": end + 9}) + "\n")
    assert arrival_order(tmp_path) == ["1c2d", "9f3a", "77aa"]
    assert running_best([None, 40.0, 38.0, 52.5, None]) == [None, 40.0, 40.0, 52.5, 52.5]


def test_a_trial_the_interrupt_caught_starting_does_not_count_as_ended() -> None:
    """Tune's clean-up marks such a trial TERMINATED with no report; the sweep is not finished."""
    from types import SimpleNamespace as Result

    from jobs.sweep.tune import trials_ended

    class Grid(list):
        num_terminated, num_errors = 2, 1

    ran = Result(error=None, metrics={METRIC: 50.0, "training_iteration": 1, "trial_id": "a"})
    failed = Result(error=RuntimeError("x"), metrics={"trial_id": "b"})
    caught = Result(error=None, metrics={"trial_id": "c"})
    assert trials_ended(Grid([ran, failed, caught])) == 2
    assert trials_ended(Grid([ran, ran, failed])) == 3
