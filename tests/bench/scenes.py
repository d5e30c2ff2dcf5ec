"""Scene benchmark: the paper's ablation orderings (Tables 4 and 5) on cue-free scene mosaics.

    .venv/bin/python -m tests.bench.scenes [--seeds 3] [--settings K4 K1 T0 lambda0]
        [--scenes 4] [--classes-per-scene 4] [--in-scene 0.9] [--items 2 4] [--data-seed 0]
        [--train-images 4000] [--test-images 1000] [--design classes|context] [--degrade-px 2]
        [--set key=value ...] [--out bench_out/scenes.json]

Each setting is trained with the default recipe (jobs/configs/default.yaml: 2 epochs at 96 px,
2 workers, the offline EfficientNet-Lite0 and MiniLM) once per seed, on mosaics whose scene shows
only in which items co-occur (no colour cue); the mosaic's own design options make other scene
designs. Settings (K = the data's number of scenes):

- ``K<k>``: k scenes (``K4`` is the true K of the default data, ``K1`` one global graph);
- ``T0``: the true K with no propagation (T = 0), the paper's "+SA" row;
- ``lambda<v>``: the true K with lambda = v; ``lambda0`` (no scene loss, the scene classifier
  trained by the classification loss alone through P^I) is the paper's entropy ablation, and
  ``--settings lambda0 lambda0.1 lambda1 lambda10`` is the lambda curve.

Before the runs, a label-only analysis of the data (seconds): the scene NMI of the label mixture's
posterior on the test labels (what a scene classifier that predicted it perfectly would reach),
and how well a label is predicted from the image's other labels alone (test mAP) with no context,
with a pairwise model (one logistic regression per label on the others) and with the K-scene
mixture. Where the mixture adds nothing over pairwise context, scene-specific graphs have nothing
to add over one global graph either. On ``--design context`` mosaics (pipeline/mosaic.py: one
degraded item per image that only the scene, read from the clear items, resolves) it also
predicts each label from the clear items' labels alone and reports mAP on degraded and clear items
apart: the all-labels numbers cannot show that design, since there the other labels include the
degraded item's confusable partner. ``--analysis-only`` stops there.

Printed per setting: mean and spread (sample standard deviation) over the seeds of the test EMA
and live mAP, the EMA model's test scene entropy (paper, COCO K = 6: 1.759 with L_en, 0.001
without), scene NMI (EMA and live) and ARI against the true scenes, and the train/eval agreement
on the probe batch. About 5 minutes
a run on 2 cores: the default 4 settings x 3 seeds take about an hour.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

METRICS = (
    "ema_mAP", "mAP", "ema_pair_mAP", "ema_scene_entropy", "ema_scene_nmi", "scene_nmi", "ema_scene_ari",
    "ema_scene_agreement", "ema_scene_stability_augment",
)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "default.yaml"


def setting_overrides(name: str, true_k: int) -> dict[str, Any]:
    if name.startswith("K") and name[1:].isdigit():
        return {"K": int(name[1:])}
    if name == "T0":
        return {"K": true_k, "T": 0}
    if name.startswith("lambda"):
        try:
            return {"K": true_k, "lambda": float(name[len("lambda"):])}
        except ValueError:
            pass
    raise SystemExit(f"unknown setting {name!r}: K<k>, T0 or lambda<value> (lambda0, lambda0.1, ...)")


def run_one(
    data_dir: str, root: Path, setting: str, seed: int, true_k: int, extra: dict[str, str], focus: tuple[int, ...] = ()
) -> dict[str, Any]:
    """One training run; ``focus`` (label indices, the context design's degraded pair) adds
    ``ema_pair_mAP``, the EMA model's mean AP over those labels alone."""
    from jobs.training.driver import train
    from salgl.config import load

    tree = yaml.safe_load(DEFAULT_CONFIG.read_text())
    overrides = {
        "data.path": data_dir, "run.seed": seed, "run.name": f"{setting}-s{seed}", "run.storage": str(root / "runs"),
        "run.tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "run.keep_checkpoints": 1,
        **setting_overrides(setting, true_k), **extra,
    }
    start = time.perf_counter()
    outcome = train(load(tree, overrides), log_model=False, quiet=True)
    row = {key: outcome.metrics.get(key) for key in METRICS}
    per_class = outcome.metrics.get("ema_ap") or []
    if focus and per_class and all(per_class[i] is not None for i in focus):
        row["ema_pair_mAP"] = statistics.fmean(per_class[i] for i in focus)
    row.update(setting=setting, seed=seed, seconds=round(time.perf_counter() - start, 1))
    print(f"  {setting:<8} seed {seed}: " + "  ".join(f"{k} {_fmt(row[k])}" for k in METRICS) + f"  ({row['seconds']:.0f} s)", flush=True)
    return row


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def label_only_analysis(data_dir: str, num_scenes: int) -> dict[str, float]:
    """Scene NMI reachable from the labels, and context-only mAP: none / pairwise / scene mixture.

    On data with a ``degraded`` column (the mosaic's context design) it adds the same comparison
    from the *visible* context: a label predicted from the labels of the image's clear items only
    (a degraded item's own class, and any other degraded one, is what the pixels do not tell), with
    mAP on degraded items (images where the label is present only degraded, or absent) and on clear
    items apart."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, normalized_mutual_info_score

    from pipeline.shards import read_label_matrix, shard_paths
    from salgl.scenes import LabelMixture, fit_label_mixture

    train = read_label_matrix(data_dir, "train").astype(float)  # (N, n)
    test = read_label_matrix(data_dir, "test").astype(float)
    truth = pq.read_table(shard_paths(data_dir, "test"), columns=["scene"]).column("scene").to_numpy()
    fit = fit_label_mixture(train, num_scenes)
    mixture = LabelMixture(num_scenes, train.shape[1])
    mixture.load_fit(fit.prior, fit.theta)
    found = mixture.posterior(torch.from_numpy(test)).argmax(-1).numpy()
    pairwise, scene_mixture = np.zeros_like(test), np.zeros_like(test)
    for i in range(train.shape[1]):
        rest = np.arange(train.shape[1]) != i
        model = LogisticRegression(max_iter=1000).fit(train[:, rest], train[:, i])
        pairwise[:, i] = model.predict_proba(test[:, rest])[:, 1]
        # q(k | the other labels): label i left out through the ignore mask; then P(y_i | k) averaged over it.
        q = mixture.posterior(torch.from_numpy(test), torch.from_numpy(np.broadcast_to(~rest, test.shape).copy()))
        scene_mixture[:, i] = q.numpy() @ fit.theta[:, i]

    def mean_ap(scores: np.ndarray) -> float:
        return 100 * float(np.mean([average_precision_score(test[:, i], scores[:, i]) for i in range(test.shape[1])]))

    out = {
        "label_posterior_scene_nmi": float(normalized_mutual_info_score(truth, found)),
        "context_map_none": mean_ap(np.tile(train.mean(0), (len(test), 1))),
        "context_map_pairwise": mean_ap(pairwise),
        "context_map_scene_mixture": mean_ap(scene_mixture),
    }
    if "degraded" in pq.read_schema(shard_paths(data_dir, "test")[0]).names:
        masks = [_degraded_matrix(data_dir, split, train.shape[1]) for split in ("train", "test")]
        out.update(visible_context_analysis(train, test, *masks, fit.theta, mixture))
    return out


def _degraded_matrix(data_dir: str, split: str, num_labels: int) -> Any:
    """(N, n) bool from the ``degraded`` bitmask column, rows in read_label_matrix's order."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.shards import shard_paths

    bits = pq.read_table(shard_paths(data_dir, split), columns=["degraded"]).column("degraded").to_numpy()
    return ((bits[:, None] >> np.arange(num_labels)) & 1).astype(bool)


def visible_context_analysis(train: Any, test: Any, train_degraded: Any, test_degraded: Any, theta: Any,
                             mixture: Any) -> dict[str, float]:
    """Context mAP from the clear items' labels only, pairwise vs scene mixture, on degraded and clear items."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score

    n = train.shape[1]
    clear_test = test.astype(bool) & ~test_degraded
    # A label that can be degraded and shows no clear item may be absent or present degraded: unknown.
    unknown = train_degraded.any(0) & ~clear_test  # (N, n)
    pairwise, scene_mixture = np.zeros_like(test), np.zeros_like(test)
    for i in range(n):
        rest = np.arange(n) != i
        visible_train = (train.astype(bool) & ~train_degraded)[:, rest].astype(float)
        pairwise[:, i] = LogisticRegression(max_iter=1000).fit(visible_train, train[:, i]).predict_proba(
            clear_test[:, rest].astype(float))[:, 1]
        q = mixture(torch.from_numpy(test), torch.from_numpy(unknown | ~rest))  # q(k | the visible labels)
        scene_mixture[:, i] = q.double().numpy() @ theta[:, i]

    def mean_ap(scores: np.ndarray, skip: np.ndarray) -> float:
        aps = [average_precision_score(test[~skip[:, i], i], scores[~skip[:, i], i])
               for i in range(n) if test[~skip[:, i], i].any()]
        return 100 * float(np.mean(aps)) if aps else float("nan")

    present = test.astype(bool)
    clear_items, degraded_items = present & ~test_degraded, present & test_degraded
    return {
        "degraded_items": int(degraded_items.sum()),
        "visible_context_map_pairwise_degraded": mean_ap(pairwise, clear_items),
        "visible_context_map_scene_mixture_degraded": mean_ap(scene_mixture, clear_items),
        "visible_context_map_pairwise_clear": mean_ap(pairwise, degraded_items),
        "visible_context_map_scene_mixture_clear": mean_ap(scene_mixture, degraded_items),
    }


def summarize(rows: list[dict[str, Any]], settings: list[str]) -> dict[str, dict[str, Any]]:
    """Per setting and metric: mean, sample standard deviation and the seeds' values."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        out[setting] = {}
        for key in METRICS:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                out[setting][key] = {"mean": statistics.fmean(values), "std": spread, "values": values}
    return out


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    names = {"ema_mAP": "EMA mAP", "mAP": "mAP", "ema_scene_entropy": "EMA entropy", "ema_scene_nmi": "EMA NMI",
             "scene_nmi": "NMI", "ema_scene_ari": "EMA ARI", "ema_scene_agreement": "EMA agreement",
             "ema_pair_mAP": "EMA pair mAP", "ema_scene_stability_augment": "EMA stability"}
    print(f"{'setting':<9}" + "".join(f"{names[k]:>18}" for k in METRICS))
    for setting, metrics in summary.items():
        cells = []
        for key in METRICS:
            m = metrics.get(key)
            digits = 2 if "mAP" in key else 3
            cells.append(f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}" if m else "-")
        print(f"{setting:<9}" + "".join(f"{c:>18}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["K4", "K1", "T0", "lambda0"])
    parser.add_argument("--scenes", type=int, default=4, help="true scenes of the mosaic (the T0 / lambda0 settings use it as K)")
    parser.add_argument("--classes-per-scene", type=int, default=4)
    parser.add_argument("--in-scene", type=float, default=0.9)
    parser.add_argument("--items", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the mosaic's scene design and images")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--design", choices=("classes", "context"), default="classes",
                        help="mosaic design: classes (default) or context (a degraded item only scene context "
                             "resolves; --scenes 2, 4, 8 or 16)")
    parser.add_argument("--degrade-px", type=int, default=2, help="context design: degraded item side before upscaling")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--analysis-only", action="store_true", help="the label-only analysis, no training runs")
    parser.add_argument("--out", default="bench_out/scenes.json")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)

    import ray

    from jobs.training.ray_setup import local_instance_env
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    mosaic = MosaicConfig(scenes=args.scenes, classes_per_scene=args.classes_per_scene, in_scene=args.in_scene,
                          min_items=args.items[0], max_items=args.items[1], train=args.train_images,
                          test=args.test_images, seed=args.data_seed, design=args.design, degrade_px=args.degrade_px)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convert_mosaic(root / "mosaic", mosaic, progress=False)
        analysis = label_only_analysis(str(root / "mosaic"), args.scenes)
        print("label-only: scene NMI of the label posterior {label_posterior_scene_nmi:.3f}; a label from the others, "
              "test mAP: no context {context_map_none:.1f}, pairwise {context_map_pairwise:.1f}, "
              "scene mixture {context_map_scene_mixture:.1f}".format(**analysis), flush=True)
        if "degraded_items" in analysis:
            print("label-only, from the clear items' labels ({degraded_items} degraded test items), test mAP on degraded "
                  "items: pairwise {visible_context_map_pairwise_degraded:.1f}, scene mixture "
                  "{visible_context_map_scene_mixture_degraded:.1f}; on clear items: pairwise "
                  "{visible_context_map_pairwise_clear:.1f}, scene mixture {visible_context_map_scene_mixture_clear:.1f}"
                  .format(**analysis), flush=True)
        if args.analysis_only:
            return
        local_instance_env()  # as `salgl train` starts its local Ray
        ray.init(num_cpus=2, log_to_driver=False)
        try:
            for seed in range(args.seeds):
                for setting in args.settings:
                    focus = tuple(mosaic.ambiguous) if args.design == "context" else ()
                    rows.append(run_one(str(root / "mosaic"), root, setting, seed, args.scenes, extra, focus))
        finally:
            ray.shutdown()
    summary = summarize(rows, args.settings)
    print_table(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m tests.bench.scenes " + " ".join(_argv()),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {_cores()} cores",
        "mosaic": mosaic.__dict__, "overrides": extra, "label_only": analysis, "seconds": round(time.perf_counter() - start, 1),
        "summary": summary, "runs": rows,
    }, indent=1))
    print(f"wrote {out}")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
