"""``salgl predict CHECKPOINT PATHS... --out FILE.jsonl [--threshold 0.5] [--top-k 5] [--batch-size N]``."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from jobs.cli.checkpoint_args import add_checkpoint_arguments, load_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from jobs.inference.options import DEFAULTS

    p = subparsers.add_parser("predict", help="labels, top-k scores and the scene of image files (one JSON line each)")
    add_checkpoint_arguments(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="JSON lines output ('-' for stdout)")
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                   help=f"score at which a label is predicted (default {DEFAULTS.threshold})")
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                   help=f"best labels listed with their scores (default {DEFAULTS.top_k})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"images per model call (default {DEFAULTS.batch_size})")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from jobs.inference.predict import IMAGE_EXTENSIONS, find_images, predict_files
    from salgl.errors import NotFound

    model, cfg, vocabulary = load_from_args(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    paths = find_images(args.paths)
    if not paths:
        raise NotFound(f"no image files in {' '.join(args.paths)} (give files, or folders holding {', '.join(sorted(IMAGE_EXTENSIONS))})")
    predicted = failed = 0
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = nullcontext(sys.stdout) if args.out == "-" else open(args.out, "w", encoding="utf-8")
    with out as stream:
        records = predict_files(model.to(device), cfg.data, vocabulary, paths, batch_size=args.batch_size,
                                threshold=args.threshold, top_k=args.top_k, progress=not args.no_progress)
        for record in records:
            stream.write(json.dumps(record) + "\n")
            if "error" in record:
                failed += 1
                tqdm.write(f"[salgl] skipped {record['path']}: {record['error']}", file=sys.stderr)
            else:
                predicted += 1
    print(f"[salgl] {predicted} image(s) predicted, {failed} skipped -> {args.out}", file=sys.stderr)
    return 0 if predicted else 1
