"""``salgl inspect CHECKPOINT --out DIR [--labels a,b,c] [--top-k 10]``."""

from __future__ import annotations

import argparse

from jobs.cli.checkpoint_args import add_checkpoint_arguments, load_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="per-scene co-occurrence heatmaps and label rankings of a checkpoint (PNG)")
    add_checkpoint_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files and top_labels_per_scene.json")
    p.add_argument("--labels", metavar="a,b,c", help="labels of the heatmaps (default: the 20 most counted)")
    p.add_argument("--top-k", type=int, default=10, help="labels per scene ranking (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.inference.inspect import format_rankings, inspect_scenes

    model, _, vocabulary = load_from_args(args)
    labels = [name.strip() for name in args.labels.split(",") if name.strip()] if args.labels else None
    paths = inspect_scenes(model, vocabulary, args.out, labels=labels, top_k=args.top_k)
    print(format_rankings(model, vocabulary))
    print(f"[salgl] wrote {len(paths)} files to {args.out}")
    return 0
