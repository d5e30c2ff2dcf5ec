"""How a sweep draws its trials: Ray's seeded random (and grid) variant generator, or Optuna's TPE
(``ray.tune.search.optuna.OptunaSearch``) that learns from the trials before, with the trials ASHA
stops told to Optuna as pruned. Both are seeded by ``run.seed`` and keep to the sweep's trial
concurrency; Tune saves either with its experiment state, so ``--resume`` continues the same search.
"""

from __future__ import annotations

from typing import Any, Mapping

from salgl.errors import BadValue

SEARCHES: tuple[str, ...] = ("random", "optuna")
DEFAULT_SEARCH = "random"  # the sweep bench's comparison: docs/sweeps.md#search
TPE_STARTUP_TRIALS = 10  # Optuna's own default: random draws before TPE models the results


def check_search(search: str, space: Mapping[str, Any]) -> None:
    """An unknown searcher, or Optuna asked to walk a grid (it samples; it has no "every value"),
    is refused before Ray starts, in one line."""
    if search not in SEARCHES:
        raise BadValue(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    grids = [key for key, domain in space.items() if isinstance(domain, dict) and "grid_search" in domain]
    if search == "optuna" and grids:
        raise BadValue(f"--search optuna samples and cannot walk a grid ({', '.join(grids)}): "
                       "list the values without grid: (a choice), or use --search random")


def startup_trials(samples: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, or a third of a smaller sweep (so
    that TPE gets to choose at all), and at least 2."""
    return max(2, min(TPE_STARTUP_TRIALS, samples // 3))


def build_searcher(search: str, *, seed: int, concurrency: int, samples: int, max_epochs: int) -> Any:
    """The Tune search algorithm for ``salgl tune --search``; Tune gives it the metric, the mode
    and the space (``TuneConfig`` and ``param_space``)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if search == "random":
        # Seeded by run.seed: the same sweep draws the same trials.
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)
    import optuna

    from jobs.sweep.optuna_search import AshaPrunedOptunaSearch

    # constant_liar: trials still running count as bad, so concurrent draws do not pile onto one spot.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(samples),
                                         constant_liar=concurrency > 1)
    return ConcurrencyLimiter(AshaPrunedOptunaSearch(max_t=max_epochs, sampler=sampler), max_concurrent=concurrency)
