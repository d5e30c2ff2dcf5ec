"""What a sweep searches: the default space (K, lambda, T), the command line's ``key=...`` search
items turned into Tune domains, and the check that every value a trial can draw is one the
config takes."""

from __future__ import annotations

import math
from typing import Any, Mapping

from salgl.errors import BadValue
from salgl.config import Config, ConfigError, resolve_key, with_overrides


def default_space() -> dict[str, Any]:
    from ray import tune

    return {
        "model.head.num_scenes": tune.choice([1, 2, 3, 4, 6, 8]),
        # Where lambda moves the salgl preset's scenes (ASL at the released scale): docs/benchmarks.md#scenes.
        "loss.entropy_weight": tune.loguniform(0.01, 10.0),
        "model.head.steps": tune.choice([0, 1, 2, 3, 4, 5]),
    }


def parse_space_item(key: str, text: str) -> Any:
    """``K=2,4,6`` -> choice; ``lambda=log:0.01:10`` -> log-uniform; ``optim.lr=uniform:1e-4:1e-3``;
    ``K=grid:2,4`` -> every value (multiplies the trials); ``T=3`` -> a fixed value."""
    from ray import tune

    kind, _, rest = text.partition(":")
    if kind in ("log", "loguniform"):
        return tune.loguniform(*_range(key, text, rest, log=True))
    if kind == "uniform":
        return tune.uniform(*_range(key, text, rest, log=False))
    if kind in ("grid", "choice"):
        text = rest
    values = [_number(v) for v in text.split(",") if v != ""]
    if not values:
        raise BadValue(f"{key}: empty search values")
    if kind == "grid":
        return tune.grid_search(values)
    return tune.choice(values) if len(values) > 1 else values[0]


def _range(key: str, text: str, rest: str, *, log: bool) -> tuple[float, float]:
    """``LOW:HIGH`` of a ``log:`` / ``uniform:`` range, checked."""
    try:
        low, high = (float(x) for x in rest.split(":"))
    except ValueError:
        raise BadValue(f"{key}={text}: expected {'log' if log else 'uniform'}:LOW:HIGH with two numbers") from None
    if not low < high:
        raise BadValue(f"{key}={text}: LOW must be below HIGH")
    if log and low <= 0:
        raise BadValue(f"{key}={text}: a log range needs LOW > 0")
    return low, high


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def build_space(overrides: Mapping[str, str]) -> dict[str, Any]:
    space = default_space()
    for key, text in overrides.items():
        space[resolve_key(key)] = parse_space_item(key, text)
    return space


def check_space(base: Config, space: Mapping[str, Any]) -> None:
    """Every value a trial can draw must be one the config takes, found before any trial runs (a
    bad value failed every trial, then the summary). A range is checked at its ends and at a point
    between them that is not a whole number, so a range on an integer key is refused."""
    from ray.tune.search.sample import Categorical, Float

    for key, domain in space.items():
        between = None
        if isinstance(domain, dict) and "grid_search" in domain:
            values = list(domain["grid_search"])
        elif isinstance(domain, Categorical):
            values = list(domain.categories)
        elif isinstance(domain, Float):
            low, high = float(domain.lower), float(domain.upper)
            between = low + (high - low) / math.pi
            values = [low, high, between]
        else:
            values = [domain]
        for value in values:
            try:
                with_overrides(base, {key: value})
            except ConfigError as err:
                hint = "; a range draws fractional values: list the values this key takes instead (for example 1,2,4)" if value is between else ""
                raise ConfigError(key, f"in the search space: {str(err).split(': ', 1)[1]}{hint}") from None


def describe_domain(domain: Any) -> str:
    """A search-space entry as the sweep parent's MLflow param shows it: ``choice[1, 2, 4]``,
    ``grid[0, 3]``, ``loguniform[0.01, 10.0]``, ``uniform[...]`` or the fixed value (``str()`` of a
    Tune domain is its object address)."""
    from ray.tune.search.sample import Categorical, Float, LogUniform

    if isinstance(domain, dict) and "grid_search" in domain:
        return f"grid{list(domain['grid_search'])}"
    if isinstance(domain, Categorical):
        return f"choice{list(domain.categories)}"
    if isinstance(domain, Float):
        kind = "loguniform" if isinstance(domain.get_sampler(), LogUniform) else "uniform"
        return f"{kind}[{domain.lower}, {domain.upper}]"
    return str(domain)


def expected_trials(space: Mapping[str, Any], samples: int) -> int:
    """Trials a complete sweep has: ``samples`` times every combination of the grid values."""
    grids = [len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v]
    return samples * math.prod(grids)


# ---------------------------------------------------------------------------------------------
# A trial's values and name (shared by the sweep and its progress lines)

METRIC = "ema_mAP"  # what ASHA and the best-trial choice rank by, unless `salgl tune --metric` says otherwise

# What a sweep may rank by: the epoch report's scores where higher is better (the live model's
# and, prefixed ema_, the EMA model's; salgl.metrics.multilabel_metrics names them, in percent).
RANKING_METRICS: tuple[str, ...] = tuple(
    f"{model}{name}"
    for model in ("", "ema_")
    for name in ("mAP", "mAP_noninterp", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3",
                 "OP_top3", "OR_top3", "OF1_top3")
)


def check_metric(metric: str) -> None:
    """A ranking metric Tune would not find in any report fails every trial's ASHA check late and
    vaguely; it is refused here, naming the choices."""
    if metric not in RANKING_METRICS:
        raise BadValue(f"unknown ranking metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")


def trial_values(base: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's flat config: the sweep's flat ``base`` with the trial's Tune config (its sampled values) on top."""
    return {**base, **config}


def trial_label(flat: Mapping[str, Any], trial_id: str) -> str:
    """``K6-lam1.0-T3-<trial>``: the MLflow child run's name."""
    lam = float(f"{float(flat['loss.entropy_weight']):.3g}")  # 3 significant digits, printed as a float
    return f"K{flat['model.head.num_scenes']}-lam{lam}-T{flat['model.head.steps']}-{trial_id}"
