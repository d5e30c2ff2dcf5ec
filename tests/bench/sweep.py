"""Sweep benchmark: wall time of an 8-trial ASHA sweep against the same 8 trials run to the end
(FIFO), and the trial-start overhead, on the tiny config and mosaic data.

    .venv/bin/python -m tests.bench.sweep [--trials 8] [--max-epochs 4] [--reduction-factor 2]
        [--grace-period 1] [--train-images 128] [--space K=1,2,3,4 ...] [--out bench_out/sweep.json]

Longer trials (``--max-epochs 16 --reduction-factor 4``, more ``--train-images``) show the regime
where per-trial start-up no longer dominates. The space is ``salgl tune``'s default unless
``--space`` overrides entries (same syntax as the command). Both sweeps draw the same seeded trials.

The two sweeps run one after the other, and this machine's speed drifts by 10 - 30% over tens of
minutes, so the bench also compares the same trial's same epochs across the two sweeps: the median
of those time ratios is how much slower the full sweep's machine was, and the ratio at equal speed
divides it out.

Target (issue 5): ASHA's sweep takes at most half the time of the full one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from salgl.config import preset

def run(kind: str, root: Path, data_dir: str, trials: int, max_epochs: int, grace_period: int, reduction_factor: int,
        space: dict[str, str]) -> dict:
    from jobs.tune import tune_sweep

    cfg = preset("tiny", {
        "data.path": data_dir, "data.img_size": 64, "optim.batch_size": 16, "run.workers": 1,
        "run.storage": str(root / kind), "run.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "run.name": f"bench-{kind}", "run.keep_checkpoints": 1, "run.seed": 1,
        # ASHA ranks trials by EMA mAP. The tiny preset's decay (0.9997, the paper's, for thousands
        # of steps an epoch) keeps the EMA at the shared initial weights for these few hundred
        # steps, so trials tie at the early rungs and ASHA cannot rank them; 0.99 as
        # jobs/configs/default.yaml, for its short runs.
        "ema.decay": 0.99,
    })
    start = time.perf_counter()
    outcome = tune_sweep(cfg, samples=trials, max_epochs=max_epochs, space_overrides=space,
                         register_as=f"bench-{kind}", scheduler=kind,
                         grace_period=grace_period, reduction_factor=reduction_factor)
    seconds = time.perf_counter() - start
    times = epoch_times(Path(outcome.sweep_dir) / "tune")
    epochs = sum(row["epochs"] for row in outcome.summary)
    return {"seconds": seconds, "trial_epochs": epochs, "stopped_early": sum(r["stopped_early"] for r in outcome.summary),
            "best_ema_mAP": outcome.best.get("best_ema_mAP"), "overheads": outcome.trial_start_overheads,
            "time_split": time_split(times, seconds), "epoch_times": times}


def epoch_times(tune_dir: Path) -> dict[str, list[float]]:
    """Each trial's seconds per report, keyed by the trial's index in the seeded draw."""
    times = {}
    for results in tune_dir.glob("*/result.json"):
        index = results.parent.name.split("_")[3]  # run_trial_<id>_<index>_<config>_<date>
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        times[index] = [r["time_this_iter_s"] for r in rows]
    return times


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--space", nargs="*", default=[], metavar="KEY=SPEC",
                        help="search-space entries as `salgl tune` takes them (default: its default space)")
    parser.add_argument("--out", default="bench_out/sweep.json")
    args = parser.parse_args()
    space = dict(item.split("=", 1) for item in args.space)

    import ray
    from ray.data import DataContext

    from jobs.train import local_instance_env
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convert_mosaic(root / "mosaic", MosaicConfig(train=args.train_images, test=32, canvas=64), progress=False)
        local_instance_env()  # as `salgl tune` starts its local Ray
        ray.init(num_cpus=2, log_to_driver=False)
        try:
            rows = {
                kind: run(kind, root, str(root / "mosaic"), args.trials, args.max_epochs, args.grace_period, args.reduction_factor, space)
                for kind in ("asha", "fifo")
            }
            overheads = [o for r in rows.values() for o in r.pop("overheads")]
        finally:
            ray.shutdown()
    ratio = rows["asha"]["seconds"] / rows["fifo"]["seconds"]
    drift = speed_ratio(rows["fifo"].pop("epoch_times"), rows["asha"].pop("epoch_times"))
    print(f"{'scheduler':<10}{'wall (s)':>10}{'trial epochs':>14}{'stopped':>9}{'best mAP':>10}")
    for kind, r in rows.items():
        best = f"{r['best_ema_mAP']:.2f}" if r["best_ema_mAP"] is not None else "-"
        print(f"{kind:<10}{r['seconds']:>10.1f}{r['trial_epochs']:>14}{r['stopped_early']:>9}{best:>10}")
    print(f"{'time split (s)':<16}{'to 1st report':>14}{'later epochs':>14}{'outside trials':>16}")
    for kind, r in rows.items():
        split = r["time_split"]
        print(f"{kind:<16}{split['to_first_report_s']:>14.1f}{split['later_epochs_s']:>14.1f}{split['outside_trials_s']:>16.1f}")
    print(f"ASHA / full wall time: {ratio:.2f} (target <= 0.5)")
    if drift is not None:
        print(f"the same trials' epochs took {drift:.2f}x as long in the full sweep as in the ASHA sweep; "
              f"at equal speed: {rows['asha']['seconds'] / (rows['fifo']['seconds'] / drift):.2f}")
    print(f"trial-start overhead: median {statistics.median(overheads):.1f} s over {len(overheads)} trials" if overheads else "trial-start overhead: n/a")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("trials", "max_epochs", "reduction_factor", "grace_period", "train_images", "space")}
    out.write_text(json.dumps({"settings": settings, "rows": rows, "asha_over_full": ratio, "full_over_asha_epoch_time": drift, "trial_start_overhead_s": overheads}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
