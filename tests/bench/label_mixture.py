"""Label-mixture bench: the EM (salgl/scenes.py) on dense against sparse labels (issue #28 item 3).

    .venv/bin/python -m tests.bench.label_mixture [--images 100000] [--labels 5000] [--scenes 6]
        [--iters 5] [--cases dense:all sparse:all sparse:openimages] [--out bench_out/label_mixture.json]

Synthetic labels: each image draws a scene out of ``--scenes`` and 3 positives from that scene's
share of the vocabulary. Masks: ``all`` (every entry observed: COCO, VOC without difficult) and
``openimages`` (3 positives and 5 verified negatives an image, every other label unknown, so
ignored). Each case runs in a process of its own, so its peak resident memory is its own: one
restart of ``--iters`` EM iterations (no early stop). Printed per case: the time to build the
input (the dense matrices, or the sparse rows from per-image lists as the shard reader builds
them), the fit's time and that over ``--iters`` (the fit's set-up and first M step included),
and the peak resident memory above the process's size before the input was built.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

POSITIVES, VERIFIED_NEGATIVES = 3, 5


def _lists(num_images: int, num_labels: int, num_scenes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) positives from each image's scene's share of the labels and (N, 5) verified negatives
    from the next scene's share, distinct within an image."""
    rng = np.random.default_rng(seed)
    share = num_labels // num_scenes
    scenes = rng.integers(num_scenes, size=num_images)[:, None]
    keys = rng.integers(share, size=(num_images, POSITIVES + VERIFIED_NEGATIVES))
    while (repeats := (np.diff(np.sort(keys, 1), axis=1) == 0).any(1)).any():  # redraw rows with a repeat
        keys[repeats] = rng.integers(share, size=(int(repeats.sum()), keys.shape[1]))
    positives = scenes * share + keys[:, :POSITIVES]
    negatives = (scenes + 1) % num_scenes * share + keys[:, POSITIVES:]
    return np.sort(positives, 1), np.sort(negatives, 1)


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def _inputs(mode: str, mask: str, positives: np.ndarray, negatives: np.ndarray, num_labels: int) -> tuple[object, dict]:
    """The fit's arguments: dense (N, n) labels and ignore, or SparseLabels."""
    from salgl.sparse_labels import Csr, SparseLabels

    num_images = len(positives)
    if mode == "dense":
        labels = np.zeros((num_images, num_labels), bool)
        np.put_along_axis(labels, positives, True, 1)
        if mask == "all":
            return labels, {}
        ignore = np.ones((num_images, num_labels), bool)
        np.put_along_axis(ignore, np.concatenate([positives, negatives], 1), False, 1)
        return labels, {"ignore": ignore}
    csr = Csr.from_lists(np.full(num_images, POSITIVES), positives.ravel(), num_labels)
    if mask == "all":
        return SparseLabels.build(csr, None, num_labels), {}
    # Build as the shard reader does: a row group's labels and its (n - 8)-long ignore lists at a time.
    parts = []
    for start in range(0, num_images, 256):
        rows = slice(start, start + 256)
        known = np.zeros((len(positives[rows]), num_labels), bool)
        np.put_along_axis(known, np.concatenate([positives[rows], negatives[rows]], 1), True, 1)
        labels = Csr.from_lists(np.full(len(known), POSITIVES), positives[rows].ravel(), num_labels)
        parts.append(SparseLabels.build(labels, Csr.from_dense(~known), num_labels))
    return SparseLabels.concatenate(parts), {}


def run_case(case: str, num_images: int, num_labels: int, num_scenes: int, iters: int) -> dict:
    """One case in this process: build its input, time the EM, report the peak memory."""
    from salgl.scenes import fit_label_mixture

    mode, mask = case.split(":")
    positives, negatives = _lists(num_images, num_labels, num_scenes)
    base = _rss_mb()
    start = time.perf_counter()
    labels, kwargs = _inputs(mode, mask, positives, negatives, num_labels)
    built = time.perf_counter() - start
    start = time.perf_counter()
    fit = fit_label_mixture(labels, num_scenes, restarts=1, max_iters=iters, tol=-np.inf, **kwargs)
    fitted = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"case": case, "images": num_images, "labels": num_labels, "scenes": num_scenes, "iters": iters,
            "build_s": built, "fit_s": fitted, "em_s_per_iter": fitted / iters, "peak_mb": peak, "log_likelihood": fit.log_likelihood}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=5_000)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=["dense:all", "sparse:all", "sparse:openimages"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: run this case, print its JSON
    parser.add_argument("--out", default="bench_out/label_mixture.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.images, args.labels, args.scenes, args.iters)))
        return
    results = []
    print(f"N = {args.images}, n = {args.labels}, K = {args.scenes}, {POSITIVES} positives an image, {args.iters} EM iterations")
    print(f"{'case':<20} {'build s':>8} {'fit s':>8} {'EM s/iter':>10} {'peak MB':>9} {'log-lik':>10}")
    for case in args.cases:
        cmd = [sys.executable, "-m", "tests.bench.label_mixture", "--one", case, "--images", str(args.images),
               "--labels", str(args.labels), "--scenes", str(args.scenes), "--iters", str(args.iters)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results.append(r)
        print(f"{case:<20} {r['build_s']:>8.2f} {r['fit_s']:>8.2f} {r['em_s_per_iter']:>10.3f} {r['peak_mb']:>9.0f} {r['log_likelihood']:>10.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
