"""Vocabulary accuracy: is the sparse head's test mAP within the dense head's seed spread? (issue #28, item 5)

    .venv/bin/python -m tests.bench.vocab_accuracy [--out bench_out/vocab_accuracy.json] [--labels 500]
        [--steps 300] [--seeds 0 1 2] [--top-k 16] [--variants dense sparse T0] [--threads 1] [--quick]

What runs: the SALGL head alone (``salgl.head.SALGLHead``; no backbone, no images) trained on
region tokens generated here, once per (variant, seed), on one generated dataset that every run
shares. Variants:

- ``dense``: ``model.head.graph_top_k = 0`` (the full n x n scene graphs);
- ``sparse-k<k>``: ``graph_top_k = k`` for each ``--top-k`` (each row of P^k keeps its k largest
  entries; with soft selection an image's row lists K k entries, each scene's k);
- ``T0``: ``model.head.steps = 0``, no propagation: the reference that says whether the label
  graph adds anything on this data. The head still builds P^I with T = 0 and leaves it unused;
  T0 builds it sparse with k = 1 (``graph_top_k = 1``), which changes no output and saves the
  dense graph's time.

Head: the default recipe's (``salgl`` preset: K = 6, T = 3, soft selection, hard counting,
messages "out", no self loops, no row normalisation, MLP Phi_c, scene targets from the label
mixture, isolated scenes, graph_trains_scenes) with one change the CPU budget forces: the
attention dims d1 = d2 = 64 (preset: 1,024). Loss: the preset's ``salgl_loss`` (ASL gamma- = 2 at
the released scale, plus lambda = 1 times the two entropy terms and the scene-target
cross-entropy), with the targets of a label mixture (``salgl.scenes.fit_label_mixture``, K = 6,
8 restarts, seed 0) fitted once to the training labels and shared by every run, as a training job
fits it once per run. AdamW (weight decay 0.01), one-cycle schedule (pct_start 0.2) to lr 1e-2,
batch 32, 300 steps, no EMA (the live model is tested), float32, 1 thread. The lr is 100x the
paper's 1e-4 (80 epochs from a pretrained backbone) because the budget allows a few hundred steps
from scratch: on the --quick data, 1e-2 reached in 150 steps what 1e-3 did in 600. A seed sets the
model's initialisation and the order of the training batches; the data is the same for every run.

Sizes, and why not the issue's (n = 2,000, k = 16 and 64): n = 500 labels, k = 16, 300 steps of
32. Measured on the 2-core VM while another job loaded it (load 2-3.5), seconds per training
step, 1 thread:

    n = 2,000, B = 16:  dense 4.6   sparse k=16 2.0   k=64 8.6
    n = 2,000, B = 32:  dense 4.9   sparse k=16 4.4   k=64 19.7   T0 (dense graph built, unused) 0.8
    n = 1,000, B = 32:  dense 1.5   sparse k=16 1.7   k=64 7.2    T0 0.1
    n =   500, B = 64:  dense 1.0   sparse k=16 2.0   k=32 4.2    T0 0.1
    n =   500, B = 32:  dense 0.49  sparse k=16 0.88  k=8 0.53    T0 0.05

At n = 2,000 the dense step is mostly the K n^2 graph (nearly the same at B = 16 and 32); the
sparse step grows with B n K k (soft selection lists K k = 6 k entries a row, and argsort and
embedding_bag's backward over them dominate), so on this CPU sparse k = 16 is no faster than
dense below n = 2,000, and k = 64 is 4x slower than dense. Training is the other limit: test mAP
rises late and steeply (T0 at n = 500, batch 64: 12 mAP after 100 steps, 73 after 300), and
defaults tried first sat before that rise, every variant near chance (n = 1,000, 100 steps of 16:
2.2-2.4 mAP; n = 500, 100 steps of 64: 7-8 mAP), which says nothing about the graph. So the
default trades vocabulary and the second k for training: n = 500 (about 6x COCO's 80; a scene
graph's row has some 100 in-pool entries plus clutter, so k = 16 truncates it hard), 300 steps of
32 (T0 there: 62.6 mAP on seed 0), k = 16 only; k = 8 costs as much again as the dense runs and
would take the run past 25 minutes (``--top-k 8 16``). ``--labels 2000 --top-k 16 64 --steps N``
runs the issue's sizes given the time (hours here).

Data (``World``, ``sample``; the data seed fixes everything but the sample seeds): n labels in
groups of 4 (labels that appear together: fork, knife, plate); K_true = 6 latent scenes, each
owning a pool of groups (every group has a home scene, the scenes an equal share, and 20% of
groups also a random second one). An image draws a scene uniformly, then 3 distinct groups from
its pool, each member present with probability 0.7 (the first always), plus with probability 0.5
one label drawn from the whole vocabulary (clutter, no scene): about 9.2 labels an image. Every
label has a fixed random appearance vector (unit norm, d = 64); an image is m = 16 tokens of
Gaussian noise (norm about 0.5), each present label adding its appearance, scaled by its
visibility and a random amplitude in [0.8, 1.2], to one random token. 30% of labels are weakly
visible (visibility 0.15, the rest 1.0): from the tokens alone they are hard to see, while their
group mates and scene, which the label graph carries, say they are likely. A label's frozen
embedding is 0.7 times a fixed random projection of its appearance plus 0.71 times independent
noise (unit norm, d_L = 64), as text embeddings carry some of what a label looks like; with
embeddings unrelated to appearance, the attention could not tell hundreds of labels apart through
a d_L = 64 projection. 6,000 training and 800 test images, drawn with different sample seeds.

Printed: per variant the test mAP (%, ``salgl.metrics.average_precision``, interpolated, over
labels with a test positive) of every seed, mean, sample standard deviation and min-max; the
means over weakly and strongly visible labels apart; the scene NMI of the head's argmax scene
against the true scene on the test set; the training time per run. Then the verdict: each other
variant's mean against the dense seeds' min-max and mean +- 1 std. The JSON (``--out``) holds
every run, the sizes, the head config and the label statistics.

Time on the 2-core VM: the default run 20 minutes with another job loading the machine (load 1-3);
``--quick`` (n = 120, d = 32, k = 4 and 8, 60 steps of 32) about 40 seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DataSpec:
    """The generated dataset (see the module docstring)."""

    labels: int = 500  # n (the issue: a few thousand; see the module docstring for why not)
    scenes: int = 6  # K_true
    group_size: int = 4
    groups_per_image: int = 3
    member_p: float = 0.7  # each member of a drawn group is present with this probability
    second_scene: float = 0.2  # fraction of groups that also belong to a second scene's pool
    clutter: float = 0.5  # probability of one extra label drawn from the whole vocabulary
    weak_fraction: float = 0.3
    weak_visibility: float = 0.15
    regions: int = 16  # m
    token_dim: int = 64  # d
    label_dim: int = 64  # d_L
    noise: float = 0.5  # expected norm of a token's noise (an appearance has norm 1)
    embedding_signal: float = 0.7  # weight of the appearance in a label's embedding
    train_images: int = 6000
    test_images: int = 800
    seed: int = 0  # the data seed: world and both samples


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 300
    batch: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-2
    pct_start: float = 0.2
    attn_dim: int = 64  # d1 = d2 (preset: 1024)
    eval_batch: int = 32
    mixture_restarts: int = 8


QUICK_DATA = DataSpec(labels=120, regions=8, token_dim=32, label_dim=32, train_images=1200, test_images=400)
QUICK_TRAIN = TrainSpec(steps=60, batch=32, attn_dim=32, mixture_restarts=2)


# ---------------------------------------------------------------------------------------------
# Data


class World(NamedTuple):
    """What every image of the dataset shares."""

    groups: Tensor  # (G, g) label indices
    pools: Tensor  # (K_true, G) bool: the groups each scene draws from
    appearance: Tensor  # (n, d) unit norm
    visibility: Tensor  # (n,)
    embeddings: Tensor  # (n, d_L) unit norm, frozen label embeddings


class Sample(NamedTuple):
    scene: Tensor  # (N,) the true scene
    targets: Tensor  # (N, n) float multi-hot
    tokens: Tensor  # (N, m, d)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def make_world(spec: DataSpec) -> World:
    gen = torch.Generator().manual_seed(spec.seed)
    n, g = spec.labels, spec.group_size
    groups = torch.randperm(n, generator=gen)[: (n // g) * g].view(-1, g)  # (G, g)
    num_groups = groups.shape[0]
    home = torch.randperm(num_groups, generator=gen) % spec.scenes  # (G,) equal pools
    second = torch.where(torch.rand(num_groups, generator=gen) < spec.second_scene,
                         torch.randint(spec.scenes, (num_groups,), generator=gen), home)
    pools = torch.zeros(spec.scenes, num_groups, dtype=torch.bool)
    pools[home, torch.arange(num_groups)] = True
    pools[second, torch.arange(num_groups)] = True
    if (pools.sum(1) < spec.groups_per_image).any():
        raise ValueError("a scene's pool holds fewer groups than an image draws: more labels or fewer scenes")
    appearance = _unit(torch.randn(n, spec.token_dim, generator=gen))  # (n, d)
    visibility = torch.where(torch.rand(n, generator=gen) < spec.weak_fraction, spec.weak_visibility, 1.0)
    projection = torch.randn(spec.token_dim, spec.label_dim, generator=gen) / math.sqrt(spec.token_dim)
    related = _unit(appearance @ projection)  # (n, d_L)
    s = spec.embedding_signal
    embeddings = _unit(s * related + math.sqrt(1 - s * s) * _unit(torch.randn(n, spec.label_dim, generator=gen)))
    return World(groups, pools, appearance, visibility, embeddings)


def sample(world: World, spec: DataSpec, count: int, seed: int) -> Sample:
    """``count`` images: a scene each, its labels (scene groups + clutter) and its tokens."""
    gen = torch.Generator().manual_seed(seed)
    n, (num_groups, g) = spec.labels, world.groups.shape
    scene = torch.randint(spec.scenes, (count,), generator=gen)  # (N,)
    # groups_per_image distinct groups of the scene's pool: the top random keys among pool members.
    keys = torch.rand(count, num_groups, generator=gen).masked_fill(~world.pools[scene], -1.0)
    chosen = keys.topk(spec.groups_per_image, dim=1).indices  # (N, c)
    members = world.groups[chosen].reshape(count, -1)  # (N, c g)
    present = torch.rand(members.shape, generator=gen) < spec.member_p
    present[:, 0] = True  # every image has a label
    targets = torch.zeros(count, n)
    rows = torch.arange(count).unsqueeze(1).expand_as(members)
    targets[rows[present], members[present]] = 1.0
    extra = torch.rand(count, generator=gen) < spec.clutter
    targets[torch.arange(count)[extra], torch.randint(n, (count,), generator=gen)[extra]] = 1.0
    # Tokens: noise, plus each present label's appearance in one random region.
    tokens = torch.randn(count, spec.regions, spec.token_dim, generator=gen) * (spec.noise / math.sqrt(spec.token_dim))
    image, label = targets.nonzero(as_tuple=True)
    region = torch.randint(spec.regions, (len(image),), generator=gen)
    amplitude = 0.8 + 0.4 * torch.rand(len(image), generator=gen)
    signal = world.appearance[label] * (world.visibility[label] * amplitude).unsqueeze(1)  # (P, d)
    tokens.view(-1, spec.token_dim).index_add_(0, image * spec.regions + region, signal)
    return Sample(scene, targets, tokens)


def make_data(spec: DataSpec) -> tuple[World, Sample, Sample]:
    world = make_world(spec)
    return world, sample(world, spec, spec.train_images, spec.seed + 1), sample(world, spec, spec.test_images, spec.seed + 2)


# ---------------------------------------------------------------------------------------------
# Model, training, evaluation


def variant_names(top_ks: list[int], wanted: list[str]) -> list[str]:
    names = []
    for kind in wanted:
        names.extend([f"sparse-k{k}" for k in top_ks] if kind == "sparse" else [kind])
    return names


def head_config(variant: str, train: TrainSpec) -> Any:
    """The ``salgl`` preset's head, attention dims at ``train.attn_dim``, and the variant's switch."""
    from salgl.config import preset

    head = replace(preset("salgl").model.head, attn_dim=train.attn_dim, attn_hidden=train.attn_dim)
    if variant == "dense":
        return replace(head, graph_top_k=0)
    if variant == "T0":
        return replace(head, steps=0, graph_top_k=1)
    if variant.startswith("sparse-k"):
        return replace(head, graph_top_k=int(variant[len("sparse-k"):]))
    raise ValueError(f"unknown variant {variant!r}")


def fit_mixture(train_targets: Tensor, num_scenes: int, restarts: int) -> tuple[np.ndarray, np.ndarray]:
    """The label mixture a training job would fit once for the run (sparse rows, seed 0)."""
    from salgl.scenes import fit_label_mixture
    from salgl.sparse_labels import SparseLabels

    fit = fit_label_mixture(SparseLabels.from_dense(train_targets.numpy() > 0), num_scenes, seed=0, restarts=restarts)
    return fit.prior, fit.theta


def train_and_eval(variant: str, seed: int, world: World, train_set: Sample, test_set: Sample, data: DataSpec,
                   train: TrainSpec, mixture: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """One run: build the head (seeded), train ``train.steps`` steps, test. mAP in percent."""
    from salgl.config import preset
    from salgl.head import SALGLHead
    from salgl.losses import salgl_loss

    loss_cfg = preset("salgl").loss
    torch.manual_seed(seed)
    head = SALGLHead(head_config(variant, train), num_labels=data.labels, token_dim=data.token_dim, label_dim=data.label_dim)
    head.label_embeddings.copy_(world.embeddings)
    if head.label_mixture is not None and mixture is not None:
        head.label_mixture.load_fit(*mixture)
    optimizer = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=train.steps, pct_start=train.pct_start)
    order_gen = torch.Generator().manual_seed(10_000 + seed)
    order = torch.empty(0, dtype=torch.long)
    start, cpu = time.perf_counter(), time.process_time()
    head.train()
    losses = []
    for step in range(train.steps):
        if len(order) < train.batch:
            order = torch.cat([order, torch.randperm(len(train_set.targets), generator=order_gen)])
        batch, order = order[: train.batch], order[train.batch:]
        targets = train_set.targets[batch]
        out = head(train_set.tokens[batch], targets)
        terms = salgl_loss(out.logits, out.scene_probs, targets, loss_cfg, scene_targets=head.scene_targets(targets))
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(terms.classification.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{variant} seed {seed}: loss {losses[-1]} at step {step}")
    train_s = time.perf_counter() - start
    result = evaluate(head, world, test_set, train.eval_batch)
    result.update(variant=variant, seed=seed, train_s=train_s, total_s=time.perf_counter() - start,
                  cpu_s=time.process_time() - cpu, final_cls_loss=statistics.fmean(losses[-20:]))
    return result


@torch.no_grad()
def evaluate(head: Any, world: World, test_set: Sample, eval_batch: int) -> dict[str, Any]:
    from salgl.metrics import average_precision

    head.eval()
    logits, scenes = [], []
    for i in range(0, len(test_set.targets), eval_batch):
        out = head(test_set.tokens[i : i + eval_batch])
        logits.append(out.logits)
        scenes.append(out.scene_probs.argmax(-1))
    ap = average_precision(torch.cat(logits).numpy(), test_set.targets.numpy())  # (n,), NaN without a positive
    weak = (world.visibility < 1.0).numpy()
    return {
        "mAP": _percent_mean(ap), "mAP_weak": _percent_mean(ap[weak]), "mAP_strong": _percent_mean(ap[~weak]),
        "labels_scored": int((~np.isnan(ap)).sum()),
        "scene_nmi": scene_nmi(torch.cat(scenes).numpy(), test_set.scene.numpy()),
    }


def _percent_mean(ap: np.ndarray) -> float:
    kept = ap[~np.isnan(ap)]
    return 100.0 * float(kept.mean()) if len(kept) else float("nan")


def scene_nmi(found: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(truth, found))


# ---------------------------------------------------------------------------------------------
# Summary


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in variants:
        mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        out[name] = {"seeds": [r["seed"] for r in mine], "train_s": [r["train_s"] for r in mine],
                     **{key: {"per_seed": [r[key] for r in mine], **spread([r[key] for r in mine])}
                        for key in ("mAP", "mAP_weak", "mAP_strong", "scene_nmi")}}
    return out


def verdicts(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each other variant's mean mAP against the dense seeds: inside their min-max, inside mean +- std."""
    if "dense" not in summary:
        return {}
    dense = summary["dense"]["mAP"]
    out = {}
    for name, row in summary.items():
        if name == "dense":
            continue
        mean = row["mAP"]["mean"]
        out[name] = {"mean_minus_dense_mean": mean - dense["mean"], "within_dense_min_max": dense["min"] <= mean <= dense["max"],
                     "within_dense_mean_pm_std": abs(mean - dense["mean"]) <= dense["std"],
                     "weak_minus_dense_weak": row["mAP_weak"]["mean"] - summary["dense"]["mAP_weak"]["mean"]}
    return out


def print_table(summary: dict[str, Any], verdict: dict[str, dict[str, Any]]) -> None:
    print(f"{'variant':<12} {'mAP per seed':<26} {'mean':>6} {'std':>5} {'min-max':>13} | "
          f"{'weak mean':>9} {'strong mean':>11} | {'scene NMI':>9} | {'train s/run':>11}")
    for name, row in summary.items():
        m = row["mAP"]
        seeds = " ".join(f"{v:.2f}" for v in m["per_seed"])
        print(f"{name:<12} {seeds:<26} {m['mean']:>6.2f} {m['std']:>5.2f} {m['min']:>6.2f}-{m['max']:<6.2f} | "
              f"{row['mAP_weak']['mean']:>9.2f} {row['mAP_strong']['mean']:>11.2f} | {row['scene_nmi']['mean']:>9.3f} | "
              f"{statistics.fmean(row['train_s']):>11.0f}")
    for name, v in verdict.items():
        print(f"{name} vs dense: mean {v['mean_minus_dense_mean']:+.2f} mAP points (weak labels {v['weak_minus_dense_weak']:+.2f}); "
              f"within the dense seeds' min-max: {'yes' if v['within_dense_min_max'] else 'no'}; "
              f"within dense mean +- 1 std: {'yes' if v['within_dense_mean_pm_std'] else 'no'}")


# ---------------------------------------------------------------------------------------------
# Driver


def label_stats(train_set: Sample, test_set: Sample) -> dict[str, float]:
    pos_train = train_set.targets.sum(0)
    return {"labels_per_image": float(train_set.targets.sum(1).mean()),
            "train_positives_per_label_mean": float(pos_train.mean()),
            "train_labels_without_positive": int((pos_train == 0).sum()),
            "test_labels_without_positive": int((test_set.targets.sum(0) == 0).sum())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = QUICK_DATA if args.quick else DataSpec()
    train = QUICK_TRAIN if args.quick else TrainSpec()
    data = replace(data, **({"labels": args.labels} if args.labels else {}))
    train = replace(train, **({"steps": args.steps} if args.steps else {}))
    top_ks = args.top_k or ([4, 8] if args.quick else [16])
    variants = variant_names(top_ks, args.variants)
    torch.set_num_threads(args.threads)
    print(f"data: {data}\ntrain: {train}\nvariants: {variants}, seeds {args.seeds}, threads {args.threads}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    world, train_set, test_set = make_data(data)
    stats = label_stats(train_set, test_set)
    from salgl.config import preset

    num_scenes = preset("salgl").model.head.num_scenes
    mixture = fit_mixture(train_set.targets, num_scenes, train.mixture_restarts)
    mixture_nmi = scene_nmi(mixture_posterior_argmax(mixture, test_set.targets), test_set.scene.numpy())
    setup_s = time.perf_counter() - start
    print(f"data and mixture: {setup_s:.0f} s; {stats}; label-mixture scene NMI on the test labels {mixture_nmi:.3f}",
          file=sys.stderr, flush=True)

    runs = []
    for seed in args.seeds:  # seed-major: an interrupted run still has every variant at the first seeds
        for name in variants:
            row = train_and_eval(name, seed, world, train_set, test_set, data, train, mixture)
            runs.append(row)
            print(f"  {name:<12} seed {seed}: mAP {row['mAP']:.2f} (weak {row['mAP_weak']:.2f}, strong "
                  f"{row['mAP_strong']:.2f}), scene NMI {row['scene_nmi']:.3f}, final ASL {row['final_cls_loss']:.1f}, "
                  f"{row['train_s']:.0f} s train, {row['total_s']:.0f} s total, load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
    summary = summarize(runs, variants)
    verdict = verdicts(summary)
    print_table(summary, verdict)
    wall = time.perf_counter() - start
    print(f"wall time {wall / 60:.1f} min", flush=True)
    return {"data": asdict(data), "train": asdict(train), "head": asdict(head_config("dense", train)), "preset": "salgl",
            "variants": variants, "seeds": args.seeds, "threads": args.threads, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "label_stats": stats, "label_mixture_scene_nmi_test": mixture_nmi,
            "setup_s": setup_s, "wall_s": wall, "load_average_1min_end": os.getloadavg()[0],
            "runs": runs, "summary": summary, "verdict": verdict}


def mixture_posterior_argmax(mixture: tuple[np.ndarray, np.ndarray], targets: Tensor) -> np.ndarray:
    """The fitted mixture's scene for each label set: the best a scene classifier trained on it can find."""
    from salgl.scenes import LabelMixture

    prior, theta = mixture
    module = LabelMixture(len(prior), theta.shape[1])
    module.load_fit(prior, theta)
    return module.posterior(targets).argmax(-1).numpy()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/vocab_accuracy.json")
    parser.add_argument("--labels", type=int, help=f"n (default {DataSpec.labels}; --quick {QUICK_DATA.labels})")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {TrainSpec.steps}; --quick {QUICK_TRAIN.steps})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--top-k", type=int, nargs="+", help="the sparse variants' k (default 16; --quick 4 8)")
    parser.add_argument("--variants", nargs="+", default=["dense", "sparse", "T0"], choices=["dense", "sparse", "T0"])
    parser.add_argument("--threads", type=int, default=1, choices=[1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
