"""``salgl serve CHECKPOINT [--replicas N] [--max-batch-size B] [--route-prefix /] [--host H --port P] [--address ADDR]``."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from jobs.cli.checkpoint_args import add_checkpoint_arguments, load_from_args

if TYPE_CHECKING:
    from jobs.inference.serve import ServeOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="answer HTTP POSTs of images with salgl predict's records (Ray Serve)")
    add_checkpoint_arguments(p)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="images of concurrent requests scored together (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (default 10 ms)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica holds (default 0: CPU)")
    p.add_argument("--route-prefix", default="/", help="URL path the model answers on (default /)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP proxy address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP proxy port (default 8000)")
    p.add_argument("--address", default=None, help="Ray cluster to deploy on (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--threshold", type=float, default=0.5, help="default score at which a label is predicted (default 0.5)")
    p.add_argument("--top-k", type=int, default=5, help="default number of best labels listed (default 5)")
    p.set_defaults(func=run)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The options, checked before anything loads or Ray starts."""
    from jobs.inference.serve import ServeOptions
    from salgl.errors import BadValue

    if args.replicas < 1 or args.max_batch_size < 1 or args.top_k < 0 or args.batch_wait_ms < 0 or args.gpus_per_replica < 0:
        raise BadValue("--replicas and --max-batch-size must be >= 1; --top-k, --batch-wait-ms and --gpus-per-replica >= 0")
    if not 0 < args.port < 65536:
        raise BadValue(f"--port must be in 1..65535, got {args.port}")
    if not args.route_prefix.startswith("/"):
        raise BadValue(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    return ServeOptions(replicas=args.replicas, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                        route_prefix=args.route_prefix, host=args.host, port=args.port, threshold=args.threshold,
                        top_k=args.top_k, gpus_per_replica=args.gpus_per_replica)


def run(args: argparse.Namespace) -> int:
    import os

    import ray

    from jobs.inference.serve import start_serving, stop_serving
    from jobs.training.driver import init_ray

    options = serve_options(args)
    loaded = load_from_args(args)  # in the driver: a bad checkpoint fails here, before Ray starts
    own_instance = not (args.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    init_ray(args.address)
    try:
        url = start_serving(loaded, options)
        print(f"[salgl] serving {args.checkpoint} at {url} (POST an image, or JSON {{\"images\": [base64, ...]}}); Ctrl-C stops", flush=True)
        print(f"[salgl] try: curl --data-binary @image.jpg -H 'Content-Type: image/jpeg' {url}", flush=True)
        while True:  # until Ctrl-C / SIGTERM (jobs.cli raises KeyboardInterrupt for both)
            time.sleep(3600)
    finally:
        stop_serving(whole_instance=own_instance)
        if own_instance:
            ray.shutdown()
