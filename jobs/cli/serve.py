"""``salgl serve CHECKPOINT [--replicas N] [--max-batch-size B] [--route-prefix /] [--host H --port P] [--address ADDR]``,
with limits that keep an overloaded or abused server answering: ``--max-queued-requests`` (503 past
it), ``--request-timeout-s`` (408), ``--max-body-mib`` and ``--max-images-per-request`` (413),
``--max-megapixels`` (an error record)."""

from __future__ import annotations

import argparse
import time

from jobs.cli.checkpoint_args import add_checkpoint_arguments, load_from_args
from jobs.inference.options import DEFAULTS
from jobs.inference.serve import MIB, RequestLimits, ServeOptions  # plain Python: no torch or Ray to build the help

SERVE, LIMITS = ServeOptions(), RequestLimits()
MAX_BODY_MIB = LIMITS.max_body_bytes / MIB
MAX_MEGAPIXELS = LIMITS.max_pixels / 1e6


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="answer HTTP POSTs of images with salgl predict's records (Ray Serve)")
    add_checkpoint_arguments(p)
    p.add_argument("--replicas", type=int, default=SERVE.replicas, help=f"model replicas (default {SERVE.replicas})")
    p.add_argument("--max-batch-size", type=int, default=SERVE.max_batch_size,
                   help=f"images of concurrent requests scored together (default {SERVE.max_batch_size})")
    p.add_argument("--batch-wait-ms", type=float, default=SERVE.batch_wait_timeout_s * 1000,
                   help=f"how long a batch waits to fill (default {SERVE.batch_wait_timeout_s * 1000:g} ms)")
    p.add_argument("--batch-regroup-ms", type=float, default=SERVE.batch_regroup_s * 1000,
                   help=f"how long a batch waits to reach the size of the one before it (default {SERVE.batch_regroup_s * 1000:g} ms)")
    p.add_argument("--cpus-per-replica", type=float, default=SERVE.cpus_per_replica,
                   help=f"CPUs each replica holds; torch uses as many threads (default {SERVE.cpus_per_replica:g})")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica holds (default 0: CPU)")
    p.add_argument("--max-queued-images", type=int, default=None,
                   help="images a replica holds (waiting or scored) before new requests get 503 (default: 4 x --max-batch-size)")
    p.add_argument("--max-ongoing-requests", type=int, default=SERVE.max_ongoing_requests,
                   help=f"requests Serve's proxy sends a replica at once (default {SERVE.max_ongoing_requests})")
    p.add_argument("--max-queued-requests", type=int, default=SERVE.max_queued_requests,
                   help=f"requests the proxy holds past those before new ones get 503 (default {SERVE.max_queued_requests}; -1: no limit)")
    p.add_argument("--request-timeout-s", type=float, default=SERVE.request_timeout_s,
                   help=f"a request not answered in this time gets 408 (default {SERVE.request_timeout_s:g}; 0: no limit)")
    p.add_argument("--max-body-mib", type=float, default=MAX_BODY_MIB, help=f"largest request body, 413 past it (default {MAX_BODY_MIB:g})")
    p.add_argument("--max-images-per-request", type=int, default=LIMITS.max_images,
                   help=f"most images in one JSON request, 413 past it (default {LIMITS.max_images})")
    p.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                   help=f"larger images get an error record, undecoded (default {MAX_MEGAPIXELS:g})")
    p.add_argument("--route-prefix", default="/", help="URL path the model answers on (default /)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP proxy address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP proxy port (default 8000)")
    p.add_argument("--address", default=None, help="Ray cluster to deploy on (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                   help=f"default score at which a label is predicted (default {DEFAULTS.threshold})")
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help=f"default number of best labels listed (default {DEFAULTS.top_k})")
    p.set_defaults(func=run)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The options, checked before anything loads or Ray starts."""
    from salgl.errors import BadValue

    if args.replicas < 1 or args.max_batch_size < 1 or args.top_k < 0 or args.batch_wait_ms < 0 or args.gpus_per_replica < 0 or args.batch_regroup_ms < 0:
        raise BadValue("--replicas and --max-batch-size must be >= 1; --top-k, --batch-wait-ms, --batch-regroup-ms and --gpus-per-replica >= 0")
    if args.cpus_per_replica <= 0 or args.max_ongoing_requests < 1 or (args.max_queued_images is not None and args.max_queued_images < 1):
        raise BadValue("--cpus-per-replica must be > 0, --max-ongoing-requests and --max-queued-images >= 1")
    if args.max_queued_requests < -1 or args.max_queued_requests == 0 or args.request_timeout_s < 0:
        raise BadValue("--max-queued-requests must be >= 1 (or -1: no limit) and --request-timeout-s >= 0")
    if args.max_body_mib <= 0 or args.max_images_per_request < 1 or args.max_megapixels <= 0:
        raise BadValue("--max-body-mib and --max-megapixels must be > 0, --max-images-per-request >= 1")
    if not 0 < args.port < 65536:
        raise BadValue(f"--port must be in 1..65535, got {args.port}")
    if not args.route_prefix.startswith("/"):
        raise BadValue(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    limits = RequestLimits(max_body_bytes=int(args.max_body_mib * MIB), max_images=args.max_images_per_request,
                           max_pixels=int(args.max_megapixels * 1e6))
    return ServeOptions(replicas=args.replicas, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                        batch_regroup_s=args.batch_regroup_ms / 1000,
                        route_prefix=args.route_prefix, host=args.host, port=args.port, threshold=args.threshold,
                        top_k=args.top_k, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                        max_queued_images=args.max_queued_images, max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
                        request_timeout_s=args.request_timeout_s or None, limits=limits)


def run(args: argparse.Namespace) -> int:
    import gc
    import os

    import ray

    from jobs.inference.serve import start_serving, stop_serving
    from jobs.training.ray_setup import init_ray

    options = serve_options(args)
    loaded = load_from_args(args)  # in the driver: a bad checkpoint fails here, before Ray starts
    own_instance = not (args.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    init_ray(args.address)
    try:
        url = start_serving(loaded, options)
        del loaded  # the replicas hold their copies (and Serve the one it restarts them from)
        gc.collect()
        print(f"[salgl] serving {args.checkpoint} at {url} (POST an image, or JSON {{\"images\": [base64, ...]}}); Ctrl-C stops", flush=True)
        print(f"[salgl] try: curl --data-binary @image.jpg -H 'Content-Type: image/jpeg' {url}", flush=True)
        while True:  # until Ctrl-C / SIGTERM (jobs.cli raises KeyboardInterrupt for both)
            time.sleep(3600)
    finally:
        stop_serving(whole_instance=own_instance)
        if own_instance:
            ray.shutdown()
