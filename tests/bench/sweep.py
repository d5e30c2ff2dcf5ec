"""Sweep benchmark: wall time of an 8-trial ASHA sweep against the same 8 trials run to the end
(FIFO), and the trial-start overhead, on the tiny config and mosaic data.

    .venv/bin/python -m tests.bench.sweep [--trials 8] [--max-epochs 16] [--reduction-factor 4]
        [--grace-period 1] [--train-images 2048] [--space K=1,2,3,4 ...] [--seed 1] [--quick]
        [--full-only] [--search random|optuna] [--out bench_out/sweep.json]
    .venv/bin/python -m tests.bench.sweep --compare-search [--seeds 1 2 3] [--quick] [...]

The defaults (16 epochs of 2,048 images, reduction factor 4; 35 - 45 minutes on 2 cores) are trials
long enough that ASHA's savings show: an epoch takes about 10 s and a trial's start-up about 20 s.
``--quick`` (4 epochs of 128 images, reduction factor 2; about 8 minutes) is a smoke run whose
trials are mostly start-up, so its ratio says little about ASHA. The space is ``salgl tune``'s
default unless ``--space`` overrides entries (same syntax as the command). Both sweeps draw the
same seeded trials.

The two sweeps run one after the other, and this machine's speed drifts by 10 - 30% over tens of
minutes, so the bench also compares the same trial's same epochs across the two sweeps: the median
of those time ratios is how much slower the full sweep's machine was, and the ratio at equal speed
divides it out.

One ASHA sweep is also one draw of the order the trials come in: the first always runs to the
end, and a later one stops only when it is worse than most of those before it at the same rung.
So the bench also replays Ray's ASHA rule on the full sweep's per-epoch metrics and times, over
every arrival order of its trials, and prints the median and range of the estimated ratio.

Target (issue 5): ASHA's sweep takes at most half the time of the full one.

``--compare-search`` runs ASHA sweeps only, one per searcher (``salgl tune --search random`` and
``optuna``) and seed, and reports each one's best EMA mAP after half and after all of its trials
(in the order the trials started), with the mean over the seeds (issue 30: keep the better searcher
as the default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence
from unittest import mock

import numpy as np

from salgl.config import Config, preset


def bench_config(kind: str, root: Path, data_dir: str, seed: int) -> Config:
    """The tiny config every bench sweep runs, its run folders under ``root / kind``."""
    return preset("tiny", {
        "data.path": data_dir, "data.img_size": 64, "optim.batch_size": 16, "run.workers": 1,
        "run.storage": str(root / kind), "run.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "run.name": f"bench-{kind}", "run.keep_checkpoints": 1, "run.seed": seed,
        # ASHA ranks trials by EMA mAP. The tiny preset's decay (0.9997, the paper's, for thousands
        # of steps an epoch) keeps the EMA at the shared initial weights for these few hundred
        # steps, so trials tie at the early rungs and ASHA cannot rank them; 0.99 as
        # jobs/configs/default.yaml, for its short runs.
        "ema.decay": 0.99,
    })


def run(kind: str, root: Path, data_dir: str, trials: int, max_epochs: int, grace_period: int, reduction_factor: int,
        space: dict[str, str], seed: int, search: str = "random") -> dict:
    """One sweep: ``salgl tune``'s ASHA (``kind="asha"``), or FIFO in its place (``"fifo"``: every
    trial to the end; the sweep still prints ASHA in its first line)."""
    from ray.tune.schedulers import FIFOScheduler

    from jobs.sweep import tune

    cfg = bench_config(kind, root, data_dir, seed)
    scheduler = tune.asha_scheduler if kind == "asha" else lambda *args: FIFOScheduler()
    start = time.perf_counter()
    with mock.patch.object(tune, "asha_scheduler", scheduler):
        outcome = tune.tune_sweep(cfg, samples=trials, max_epochs=max_epochs, space_overrides=space,
                                  register_as=f"bench-{kind}", grace_period=grace_period, reduction_factor=reduction_factor,
                                  search=search)
    seconds = time.perf_counter() - start
    reports = trial_reports(Path(outcome.sweep_dir) / "tune")
    times = epoch_times(reports)
    epochs = sum(row["epochs"] for row in outcome.summary)
    return {"seconds": seconds, "trial_epochs": epochs, "stopped_early": sum(r["stopped_early"] for r in outcome.summary),
            "best_ema_mAP": outcome.best.get("best_ema_mAP"), "overheads": trial_start_overheads(times),
            "time_split": time_split(times, seconds), "epoch_times": times, "curves": metric_curves(reports)}


def trial_reports(tune_dir: Path) -> dict[str, list[dict]]:
    """Each trial's reports (Tune's result.json rows), keyed by the trial's index in the seeded draw."""
    reports = {}
    for results in tune_dir.glob("*/result.json"):
        index = results.parent.name.split("_")[3]  # run_trial_<id>_<index>_<config>_<date>
        reports[index] = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return reports


def epoch_times(reports: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Each trial's seconds per report."""
    return {index: [r["time_this_iter_s"] for r in rows] for index, rows in reports.items()}


def trial_start_overheads(times: dict[str, list[float]]) -> list[float]:
    """Per trial with two reports or more: seconds of its first report beyond its median later one
    (the trial's start-up)."""
    out = []
    for iters in times.values():
        if len(iters) >= 2:
            later = sorted(iters[1:])
            out.append(float(iters[0] - later[len(later) // 2]))
    return out


def metric_curves(reports: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Each trial's ASHA metric (EMA mAP) per epoch."""
    from jobs.sweep.tune import METRIC

    return {index: [r[METRIC] for r in rows] for index, rows in reports.items()}


def asha_epochs(curves: Sequence[Sequence[float]], max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Epochs each trial runs under ASHA when the trials arrive in this order, one at a time.

    Ray 2.60's rule (``ray.tune.schedulers.async_hyperband._Bracket``, one bracket): rungs at
    grace * rf^k below max_t; at a rung a trial stops when its value is below the (1 - 1/rf)
    percentile of the values recorded there by earlier trials, and its value is recorded either way.
    """
    rungs = []
    milestone = grace_period
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= reduction_factor
    recorded: dict[int, list[float]] = {rung: [] for rung in rungs}
    epochs = []
    for curve in curves:
        ran = max_t
        for rung in rungs:
            value = curve[rung - 1]
            cutoff = np.nanpercentile(recorded[rung], (1 - 1 / reduction_factor) * 100) if recorded[rung] else None
            recorded[rung].append(value)
            if cutoff is not None and value < cutoff:
                ran = rung
                break
        epochs.append(ran)
    return epochs


def asha_over_orders(times: dict[str, list[float]], curves: dict[str, list[float]], wall: float, max_t: int,
                     grace_period: int, reduction_factor: int, samples: int = 5040) -> dict[str, float]:
    """ASHA replayed on the full sweep's own curves and times, for many arrival orders of its trials.

    One ASHA sweep is one draw: which trials come first decides how many epochs it keeps (the
    first always runs to the end). Replaying Ray's rule on the full sweep's per-epoch metrics, each
    order's wall time is estimated as the full sweep's, less the epochs ASHA would have skipped
    (each trial's own epoch times). Every order when there are at most 8 trials (40,320
    orders, about 20 s), else ``samples`` random ones.
    """
    trials = sorted(curves)
    if len(trials) <= 8:
        orders = list(itertools.permutations(trials))
    else:
        rng = np.random.default_rng(0)
        orders = [tuple(rng.permutation(trials)) for _ in range(samples)]
    fractions, ratios = [], []
    for order in orders:
        ran = asha_epochs([curves[t] for t in order], max_t, grace_period, reduction_factor)
        skipped = sum(sum(times[t][e:]) for t, e in zip(order, ran))
        fractions.append(sum(ran) / (max_t * len(order)))
        ratios.append((wall - skipped) / wall)
    return {"orders": len(orders), "epoch_fraction_median": statistics.median(fractions),
            "time_ratio_mean": statistics.mean(ratios), "time_ratio_median": statistics.median(ratios), "time_ratio_min": min(ratios), "time_ratio_max": max(ratios),
            "share_of_orders_at_most_half": sum(r <= 0.5 for r in ratios) / len(ratios)}


def speed_ratio(slow: dict[str, list[float]], fast: dict[str, list[float]]) -> float | None:
    """Median over the epochs both sweeps ran of the same trial (after its first) of slow / fast."""
    ratios = [a / b for index in slow.keys() & fast.keys() for a, b in zip(slow[index][1:], fast[index][1:])]
    return statistics.median(ratios) if ratios else None


def time_split(times: dict[str, list[float]], wall: float) -> dict[str, float]:
    """Where a sweep's wall time went, from each trial's ``epoch_times``: from each trial's start to
    its first report (start-up and the first epoch), its later epochs, and the rest (Tune between
    trials, the end of each trial after its last report, the sweep's own set-up and summary).
    Sums over trials; one trial at a time, so they add up to the wall time."""
    first = sum(t[0] for t in times.values() if t)
    later = sum(sum(t[1:]) for t in times.values())
    return {"to_first_report_s": first, "later_epochs_s": later, "outside_trials_s": wall - first - later}


def search_run(search: str, seed: int, root: Path, data_dir: str, trials: int, max_epochs: int, grace_period: int,
               reduction_factor: int, space: dict[str, str]) -> dict:
    """One ASHA sweep drawn by ``search``: its wall time, stops, and its best EMA mAP after each trial."""
    from jobs.sweep.tune import tune_sweep

    kind = f"{search}-seed{seed}"
    start = time.perf_counter()
    outcome = tune_sweep(bench_config(kind, root, data_dir, seed), samples=trials, max_epochs=max_epochs,
                         space_overrides=space, register_as=f"bench-{kind}", grace_period=grace_period,
                         reduction_factor=reduction_factor, search=search)
    seconds = time.perf_counter() - start
    by_trial = {row["trial"]: row["best_ema_mAP"] for row in outcome.summary}
    scores = [by_trial.get(trial) for trial in arrival_order(Path(outcome.sweep_dir) / "tune")]
    return {"search": search, "seed": seed, "seconds": seconds, "trial_epochs": sum(r["epochs"] for r in outcome.summary),
            "stopped_early": sum(r["stopped_early"] for r in outcome.summary), "best_after": running_best(scores)}


def arrival_order(tune_dir: Path) -> list[str]:
    """Trial ids in the order the trials first reported (Optuna's ids carry no index)."""
    first = {}
    for results in tune_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if rows:
            first[rows[0]["trial_id"]] = rows[0]["timestamp"] - rows[0]["time_this_iter_s"]
    return sorted(first, key=first.get)


def running_best(scores: Sequence[float | None]) -> list[float | None]:
    """The best score after each trial (None until one has a score)."""
    out, best = [], None
    for score in scores:
        if score is not None and (best is None or score > best):
            best = score
        out.append(best)
    return out


def compare_searches(args: argparse.Namespace, root: Path, data_dir: str, space: dict[str, str]) -> list[dict]:
    """Random and TPE, one ASHA sweep per seed each; prints each sweep's row as it ends, then the means."""
    half = args.trials // 2
    print(f"{'search':<8}{'seed':>6}{'wall (s)':>10}{'trial epochs':>14}{'stopped':>9}"
          f"{f'best@{half}':>10}{f'best@{args.trials}':>10}", flush=True)
    rows = []
    for seed in args.seeds:
        for search in ("random", "optuna"):
            r = search_run(search, seed, root, data_dir, args.trials, args.max_epochs, args.grace_period,
                           args.reduction_factor, space)
            rows.append(r)
            best = [_score(r["best_after"], n) for n in (half, args.trials)]
            print(f"{r['search']:<8}{r['seed']:>6}{r['seconds']:>10.1f}{r['trial_epochs']:>14}{r['stopped_early']:>9}"
                  f"{best[0]:>10}{best[1]:>10}", flush=True)
    for search in ("random", "optuna"):
        finals = [r["best_after"][-1] for r in rows if r["search"] == search and r["best_after"] and r["best_after"][-1] is not None]
        if finals:
            print(f"{search}: mean best EMA mAP after {args.trials} trials {statistics.mean(finals):.2f} over {len(finals)} seeds")
    return rows


def _score(best_after: list[float | None], trials: int) -> str:
    """The best score after ``trials`` trials, printed ("-" when the sweep has no score there)."""
    value = best_after[trials - 1] if 0 < trials <= len(best_after) else None
    return f"{value:.2f}" if value is not None else "-"


# Unless given on the command line. FULL_SIZE is the setting of docs/benchmarks.md's sweep table.
FULL_SIZE = {"max_epochs": 16, "reduction_factor": 4, "train_images": 2048}
QUICK_SIZE = {"max_epochs": 4, "reduction_factor": 2, "train_images": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, help=f"default {FULL_SIZE['max_epochs']} ({QUICK_SIZE['max_epochs']} with --quick)")
    parser.add_argument("--reduction-factor", type=int,
                        help=f"default {FULL_SIZE['reduction_factor']} ({QUICK_SIZE['reduction_factor']} with --quick)")
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--train-images", type=int,
                        help=f"default {FULL_SIZE['train_images']} ({QUICK_SIZE['train_images']} with --quick)")
    parser.add_argument("--quick", action="store_true", help="short trials, for a smoke run (mostly trial start-up)")
    parser.add_argument("--space", nargs="*", default=[], metavar="KEY=SPEC",
                        help="search-space entries as `salgl tune` takes them (default: its default space)")
    parser.add_argument("--seed", type=int, default=1, help="run.seed: which trials the sweeps draw (and each trial's seed)")
    parser.add_argument("--full-only", action="store_true",
                        help="run only the full sweep, and report ASHA replayed on it (half the time)")
    parser.add_argument("--search", choices=("random", "optuna"), default="random", help="how the sweeps draw their trials")
    parser.add_argument("--compare-search", action="store_true",
                        help="ASHA sweeps only: random against optuna (TPE), one per seed of --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="the seeds --compare-search runs")
    parser.add_argument("--out", default="bench_out/sweep.json")
    args = parser.parse_args()
    for key, value in (QUICK_SIZE if args.quick else FULL_SIZE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    kinds = ("fifo",) if args.full_only else ("asha", "fifo")
    space = dict(item.split("=", 1) for item in args.space)

    import ray
    from ray.data import DataContext

    from jobs.training.ray_setup import local_instance_env
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convert_mosaic(root / "mosaic", MosaicConfig(train=args.train_images, test=32, canvas=64), progress=False)
        local_instance_env()  # as `salgl tune` starts its local Ray
        ray.init(num_cpus=2, log_to_driver=False)
        try:
            if args.compare_search:
                write_comparison(args, compare_searches(args, root, str(root / "mosaic"), space))
                return
            rows = {
                kind: run(kind, root, str(root / "mosaic"), args.trials, args.max_epochs, args.grace_period, args.reduction_factor, space,
                          args.seed, args.search)
                for kind in kinds
            }
            overheads = [o for r in rows.values() for o in r.pop("overheads")]
        finally:
            ray.shutdown()
    times = {kind: r.pop("epoch_times") for kind, r in rows.items()}
    curves = {kind: r.pop("curves") for kind, r in rows.items()}
    ratio = rows["asha"]["seconds"] / rows["fifo"]["seconds"] if "asha" in rows else None
    drift = speed_ratio(times["fifo"], times["asha"]) if "asha" in rows else None
    replay = asha_over_orders(times["fifo"], curves["fifo"], rows["fifo"]["seconds"], args.max_epochs, args.grace_period,
                              args.reduction_factor)
    print(f"{'scheduler':<10}{'wall (s)':>10}{'trial epochs':>14}{'stopped':>9}{'best mAP':>10}")
    for kind, r in rows.items():
        best = f"{r['best_ema_mAP']:.2f}" if r["best_ema_mAP"] is not None else "-"
        print(f"{kind:<10}{r['seconds']:>10.1f}{r['trial_epochs']:>14}{r['stopped_early']:>9}{best:>10}")
    print(f"{'time split (s)':<16}{'to 1st report':>14}{'later epochs':>14}{'outside trials':>16}")
    for kind, r in rows.items():
        split = r["time_split"]
        print(f"{kind:<16}{split['to_first_report_s']:>14.1f}{split['later_epochs_s']:>14.1f}{split['outside_trials_s']:>16.1f}")
    if ratio is not None:
        print(f"ASHA / full wall time: {ratio:.2f} (target <= 0.5)")
    if drift is not None:
        print(f"the same trials' epochs took {drift:.2f}x as long in the full sweep as in the ASHA sweep; "
              f"at equal speed: {rows['asha']['seconds'] / (rows['fifo']['seconds'] / drift):.2f}")
    print(f"ASHA replayed on the full sweep's curves and times over {replay['orders']} arrival orders: "
          f"mean {replay['time_ratio_mean']:.2f}, median {replay['time_ratio_median']:.2f} of its time ({replay['time_ratio_min']:.2f} - {replay['time_ratio_max']:.2f}; "
          f"{100 * replay['share_of_orders_at_most_half']:.0f}% of orders at most 0.5), "
          f"median {100 * replay['epoch_fraction_median']:.0f}% of its epochs")
    print(f"trial-start overhead: median {statistics.median(overheads):.1f} s over {len(overheads)} trials" if overheads else "trial-start overhead: n/a")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("trials", "max_epochs", "reduction_factor", "grace_period", "train_images", "space", "seed", "full_only", "search")}
    out.write_text(json.dumps({"settings": settings, "rows": rows, "asha_over_full": ratio, "full_over_asha_epoch_time": drift,
                               "asha_replay": replay, "full_curves": curves["fifo"], "full_epoch_times": times["fifo"], "trial_start_overhead_s": overheads}, indent=1, default=str))
    print(f"wrote {out}")


def write_comparison(args: argparse.Namespace, rows: list[dict]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("trials", "max_epochs", "reduction_factor", "grace_period", "train_images", "space", "seeds")}
    out.write_text(json.dumps({"settings": settings, "searches": rows}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
