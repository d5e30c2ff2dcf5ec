"""``salgl evaluate CHECKPOINT --data DIR [--split test] [--out FILE.json] [--mlflow]``."""

from __future__ import annotations

import argparse

from jobs.cli.checkpoint_args import add_checkpoint_arguments, load_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="mAP, CP/CR/CF1, OP/OR/OF1 (+top-3), per-class AP and scenes of a checkpoint on a split (Ray Data)")
    add_checkpoint_arguments(p)
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset folder (manifest.json + shards)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--out", metavar="FILE.json", help="write every number as JSON here")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--workers", type=int, help="scoring actors (default: one per GPU, else one per 4 CPUs)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--mlflow", action="store_true", help="log metrics and the JSON into a new MLflow run")
    p.add_argument("--mlflow-run-id", metavar="ID", help="log into this existing MLflow run instead (implies --mlflow)")
    p.add_argument("--experiment", default="salgl", help="MLflow experiment of a new run (default: salgl)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.inference.evaluate import format_report, log_evaluation, probe_scenes, score_split, summarize, write_json
    from jobs.inference.loading import read_vocabulary
    from jobs.training.ray_setup import init_ray

    loaded = load_from_args(args, vocabulary=read_vocabulary(args.data))
    init_ray(args.address)
    scored = score_split(loaded, args.data, split=args.split, batch_size=args.batch_size, workers=args.workers)
    probe = probe_scenes(loaded.model, args.data, loaded.cfg, split=args.split)
    result = {
        "checkpoint": args.checkpoint,
        "which": args.which,
        "data": args.data,
        "split": args.split,
        **summarize(scored, loaded.vocabulary, loaded.cfg.model.head.num_scenes, probe=probe),
    }
    print(f"[salgl] {args.checkpoint} on {args.data} [{args.split}]: {result['images']} images, {len(loaded.vocabulary)} labels")
    print(format_report(result))
    if args.out:
        print(f"[salgl] wrote {write_json(result, args.out)}")
    if args.mlflow or args.mlflow_run_id:
        from jobs.tracking import resolve_tracking_uri, run_page

        uri = resolve_tracking_uri(args.tracking_uri)
        params = {k: result[k] for k in ("checkpoint", "which", "data", "split")}
        run_id = log_evaluation(result, split=args.split, tracking_uri=uri, run_id=args.mlflow_run_id, experiment=args.experiment, params=params)
        print(f"[salgl] MLflow: {run_page(uri, run_id)}")
    return 0
