"""Count state at vocabulary scale: one step's count update and the cross-worker fingerprint (issue #28, item 2).

    .venv/bin/python -m tests.bench.count_scale [--out bench_out/count_scale.json] [--labels 1000 10000]
        [--scenes 6] [--batch 32] [--labels-per-image 8] [--repeats 3]

At each n, a batch of B images with m labels each (drawn uniformly) and K scene probabilities:

- ``dense``: eq. 7's (K, n, n) float64 delta (``salgl.graph.count_delta``, einsum over the one-hot
  scene weights) added to the counts: what every step did before deltas were built as blocks;
- ``blocks hard`` / ``blocks soft``: ``salgl.graph.count_delta_blocks`` added to the counts, for
  hard (one-hot) and soft (pi) scene weights: what a step does now above
  ``salgl.graph.DENSE_DELTA_BYTES``;
- ``fingerprint``: ``jobs.training.distributed.counts_fingerprint`` of the (K, n, n) float64 counts,
  run every ``run.checksum_every`` steps in a distributed run.

Times are the fastest of ``--repeats`` (wall clock; the machine may be shared, so the JSON also has
the load average). Memory is computed: the dense delta is a K n^2 float64 temporary per step, a
block delta holds sum over scenes of l_k^2 values for l_k distinct labels among scene k's images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from jobs.training.distributed import counts_fingerprint
from salgl.graph import count_delta, count_delta_blocks, scene_weights_for_counting


def fastest(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def batch(n: int, args: argparse.Namespace, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pi = torch.softmax(torch.randn(args.batch, args.scenes, generator=gen), -1)  # (B, K)
    labels = torch.rand(args.batch, n, generator=gen).argsort(-1)[:, : args.labels_per_image]  # (B, m)
    return pi, torch.zeros(args.batch, n, dtype=torch.float64).scatter_(1, labels, 1.0)  # (B, n)


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(n)
    pi, y = batch(n, args, gen)
    hard = scene_weights_for_counting(pi, "hard")
    counts = torch.zeros(args.scenes, n, n, dtype=torch.float64)
    blocks = count_delta_blocks(hard, y)
    row: dict[str, Any] = {
        "labels": n,
        "blocks_hard_s": fastest(lambda: count_delta_blocks(hard, y).add_to(counts), args.repeats),
        "blocks_soft_s": fastest(lambda: count_delta_blocks(pi.double(), y).add_to(counts), args.repeats),
        "fingerprint_s": fastest(lambda: counts_fingerprint(counts), args.repeats),
        "dense_delta_mib": 8 * args.scenes * n * n / 2**20,
        "block_delta_mib_hard": sum(b.values.numel() for b in blocks.blocks) * 8 / 2**20,
        "counts_gib": 8 * args.scenes * n * n / 2**30,
    }
    row["dense_s"] = fastest(lambda: counts.add_(count_delta(hard, y)), args.repeats)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/count_scale.json")
    parser.add_argument("--labels", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--labels-per-image", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    print("| n | dense delta + add, s | blocks hard, s | blocks soft, s | fingerprint, s | dense delta, MiB | block delta (hard), MiB | counts, GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.labels:
        print(f"n = {n}", file=sys.stderr, flush=True)
        r = measure(n, args)
        rows.append(r)
        print(f"| {n:,} | {r['dense_s']:.3f} | {r['blocks_hard_s']:.4f} | {r['blocks_soft_s']:.4f} | {r['fingerprint_s']:.3f} "
              f"| {r['dense_delta_mib']:,.1f} | {r['block_delta_mib_hard']:.3f} | {r['counts_gib']:.2f} |", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "load_average_1min_end": os.getloadavg()[0], "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
