"""``salgl tune [CONFIG.yaml] --samples N --max-epochs E [--metric NAME] [--search random|optuna] [key=value | key=v1,v2 | key=log:lo:hi ...]``."""

from __future__ import annotations

import argparse

from jobs.sweep.search import DEFAULT_SEARCH, SEARCHES

SPACE_PREFIXES = ("log:", "loguniform:", "uniform:", "choice:", "grid:")


def split_space(items: dict[str, str], searched: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Search-space entries (searched keys, lists, distributions) vs plain config overrides."""
    from salgl.config import resolve_key

    space, fixed = {}, {}
    for key, value in items.items():
        if resolve_key(key) in searched or "," in value or value.startswith(SPACE_PREFIXES):
            space[key] = value
        else:
            fixed[key] = value
    return space, fixed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="ASHA sweep over K, lambda, T (any key) with Ray Tune, compared in MLflow")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value|key=a,b|key=log:lo:hi]",
                   help="config file, then overrides; K=2,4,6 / lambda=log:0.01:10 / T=3 set the search space")
    p.add_argument("--samples", type=int, default=8, help="number of trials (default 8)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of a trial that ASHA never stops (default: optim.epochs)")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--metric", default=None, metavar="NAME",
                   help="what ASHA stops trials by and the best trial is chosen by (default ema_mAP; "
                        "mAP, ema_CF1, ema_OF1, ... : any score of the epoch report)")
    p.add_argument("--search", choices=SEARCHES, default=DEFAULT_SEARCH,
                   help=f"how trials are drawn: seeded random (grid values too), or Optuna's TPE learning from the "
                        f"trials before, ASHA's stops told to it as pruned (default {DEFAULT_SEARCH}; --resume keeps "
                        "the sweep's own)")
    p.add_argument("--register-as", default="salgl", help="MLflow registered model name for the best checkpoint")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep (its folder: a path or an s3:// gs:// abfs:// URI)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.cli.train import load_config_file, split_config_and_overrides
    from jobs.sweep.search_space import METRIC, default_space
    from jobs.sweep.tune import tune_sweep
    from salgl.config import load, parse_overrides

    config_file, items = split_config_and_overrides(args.args)
    space, fixed = split_space(parse_overrides(items), set(default_space()))
    cfg = load(load_config_file(config_file), fixed)
    max_epochs = args.max_epochs or cfg.optim.epochs
    outcome = tune_sweep(
        cfg, samples=args.samples, max_epochs=max_epochs, space_overrides=space, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, register_as=args.register_as, address=args.address, resume=args.resume,
        metric=args.metric or METRIC, search=args.search,
    )
    return 130 if outcome.interrupted else 0  # 130: the shell's code for an interrupted command
