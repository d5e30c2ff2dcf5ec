"""``salgl serve``: a Ray Serve deployment that answers an HTTP POST of images with ``salgl predict``'s records.

Two request forms, told apart by the body (an encoded image never starts with ``{``):

- the raw image as the body (``curl --data-binary @img.jpg``): one record; ``threshold`` and
  ``top_k`` may come as query parameters;
- JSON ``{"images": ["<base64>", ...], "threshold": 0.5, "top_k": 5}``: a list of records, in order.

Each record is the one ``predict_chunk`` makes (the MLflow model's and ``salgl predict``'s,
without ``path``); an image that cannot be decoded gets its ``error`` record, a malformed request
a 400, a body or batch over the limits a 413 (``RequestLimits``). Every image is queued on its own
(``jobs.inference.batching``), so images of concurrent requests share one forward pass; a replica
holding ``max_queued_images`` answers 503 at once. Ray, Starlette and torch are imported inside
functions: the parsing and options are plain Python, tested (and read by the CLI) without them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from jobs.inference.options import DEFAULTS, decode_base64
from jobs.logs import console_level
from salgl.errors import BadValue

if TYPE_CHECKING:
    from jobs.inference.loading import Loaded

APP_NAME = "salgl"
OPTIONS = ("threshold", "top_k")  # what a request may set, over the server's defaults
SERVER_DEFAULTS: Mapping[str, Any] = {"threshold": DEFAULTS.threshold, "top_k": DEFAULTS.top_k}
MIB = 1 << 20


class BadRequest(BadValue):
    """A request the server cannot read (answered 400 with this message)."""

    status = 400


class TooLarge(BadRequest):
    """A body or batch over the server's limits (answered 413)."""

    status = 413


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold: body bytes, images, and pixels per image (decoded only under it)."""

    max_body_bytes: int = 16 * MIB
    max_images: int = 64
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class Request:
    images: list[bytes]
    threshold: float
    top_k: int
    single: bool  # the raw-body form: answer one record, not a list


# ---------------------------------------------------------------------------------------------
# Request parsing (no Ray)


def parse_request(
    body: bytes, query: Mapping[str, str], defaults: Mapping[str, Any] = SERVER_DEFAULTS, *, max_images: int | None = None,
) -> Request:
    """The images and options of a POST body: JSON when it starts with ``{``, else one encoded image."""
    if not body:
        raise BadRequest("empty body: POST an image, or JSON {\"images\": [\"<base64>\", ...]}")
    if body.lstrip()[:1] == b"{":
        return _json_request(body, defaults, max_images)
    options = {**defaults, **{k: v for k, v in query.items() if k in OPTIONS}}
    return Request([body], _threshold(options["threshold"]), _top_k(options["top_k"]), single=True)


def _json_request(body: bytes, defaults: Mapping[str, Any], max_images: int | None) -> Request:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):  # a body of `{` then garbage is caught above; this is belt and braces
        raise BadRequest("the JSON body must be an object with an \"images\" list")
    unknown = set(payload) - {"images", *OPTIONS}
    if unknown:
        raise BadRequest(f"unknown key(s) {sorted(unknown)}: the JSON body takes images, threshold, top_k")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise BadRequest("\"images\" must be a non-empty list of base64-encoded images")
    if max_images is not None and len(images) > max_images:
        raise TooLarge(f"{len(images)} images in one request, over the limit of {max_images} (--max-images-per-request)")
    options = {**defaults, **{k: payload[k] for k in OPTIONS if k in payload}}
    return Request([_base64_image(i, x) for i, x in enumerate(images)], _threshold(options["threshold"]),
                   _top_k(options["top_k"]), single=False)


def _base64_image(index: int, value: Any) -> bytes:
    # Base64 only: unlike the MLflow model in process (pyfunc.image_source), a server never
    # takes a string as the name of a file to read.
    if not isinstance(value, str):
        raise BadRequest(f"images[{index}] must be a base64 string, got {type(value).__name__}")
    try:
        return decode_base64(value)
    except ValueError:
        raise BadRequest(f"images[{index}] is not valid base64") from None


def _threshold(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"threshold must be a number, got {value!r}") from None


def _top_k(value: Any) -> int:
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"top_k must be a whole number >= 0, got {value!r}") from None
    if top_k < 0 or isinstance(value, bool) or (isinstance(value, float) and value != top_k):
        raise BadRequest(f"top_k must be a whole number >= 0, got {value!r}")
    return top_k


# ---------------------------------------------------------------------------------------------
# The deployment


def replica_device(gpu_ids: Sequence[Any]) -> str:
    """``cuda`` only where Ray gave the replica a GPU (it sets ``CUDA_VISIBLE_DEVICES`` to it, so
    ``cuda`` is that GPU); Ray 2.60 no longer hides GPUs from an actor that asked for none."""
    return "cuda" if len(gpu_ids) > 0 else "cpu"


def torch_threads(cpus: float) -> int:
    """Torch's intra-op threads for a replica holding ``cpus`` CPUs (at least one)."""
    return max(1, math.ceil(cpus))


class SalglServer:
    """One replica: the network (loaded by the driver, shipped with the deployment) and its batcher.

    The event loop only reads requests and queues their images; decoding and the forward pass run
    on one thread of their own (``jobs.inference.batching``), so new requests are taken, and Serve's
    queue-length probes answered, while a batch computes.
    """

    def __init__(self, loaded: Loaded, options: ServeOptions) -> None:
        import ray
        import torch

        from jobs.inference.batching import GreedyBatcher

        self.device = replica_device(ray.get_gpu_ids())
        torch.set_num_threads(torch_threads(options.cpus_per_replica))
        self.model, self.cfg, self.vocabulary = loaded.model.to(self.device).eval(), loaded.cfg, loaded.vocabulary
        self.defaults = {"threshold": options.threshold, "top_k": options.top_k}
        self.limits, self.max_queued_images = options.limits, options.queued_images
        self.pending = 0  # images received and not yet answered
        self.batcher = GreedyBatcher(self._score_now, ThreadPoolExecutor(max_workers=1, thread_name_prefix="salgl-forward"),
                                     max_batch_size=options.max_batch_size, wait_s=options.batch_wait_timeout_s,
                                     regroup_s=options.batch_regroup_s)

    def _score_now(self, items: list[tuple[bytes, float, int]]) -> list[dict[str, Any]]:
        """The records of a batch's images (on the model's thread); images that share threshold and top_k
        share one forward pass."""
        from jobs.inference.predict import predict_chunk

        records: dict[int, dict[str, Any]] = {}
        order = sorted(range(len(items)), key=lambda i: items[i][1:])
        for (threshold, top_k), group in groupby(order, key=lambda i: items[i][1:]):
            indices = list(group)
            chunk = predict_chunk(self.model, self.cfg.data, self.vocabulary, [items[i][0] for i in indices],
                                  threshold=threshold, top_k=top_k, max_pixels=self.limits.max_pixels)
            records.update(zip(indices, chunk))
        return [records[i] for i in range(len(items))]

    async def __call__(self, request: Any) -> Any:
        """POST: records (4xx for a request that cannot be read); GET: what is served and the answering
        replica's ``status()``, for health checks and load tests."""
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse({"labels": len(self.vocabulary), **self.defaults, "replica": self.status()})
        try:
            body = await read_body(request, self.limits.max_body_bytes)
            parsed = parse_request(body, request.query_params, self.defaults, max_images=self.limits.max_images)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        if self.pending and self.pending + len(parsed.images) > self.max_queued_images:
            return JSONResponse({"error": f"busy: {self.pending} images queued on this replica; retry later"},
                                status_code=503, headers={"Retry-After": "1"})
        self.pending += len(parsed.images)
        try:
            records = await asyncio.gather(*(self.batcher.submit((image, parsed.threshold, parsed.top_k)) for image in parsed.images))
        finally:
            self.pending -= len(parsed.images)
        return JSONResponse(records[0] if parsed.single else list(records))

    def status(self) -> dict[str, Any]:
        """This replica's process, device and threads, images in flight and the batch sizes it formed."""
        import os

        import torch
        from ray import serve

        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(), "device": self.device,
                "threads": torch.get_num_threads(), "pending": self.pending, "batch_sizes": dict(self.batcher.batch_sizes)}


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The request's body, refused (413) as soon as it is known to be over ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"the body is {int(declared):,} bytes, over the limit of {max_bytes:,} (--max-body-mib)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"the body is over the limit of {max_bytes:,} bytes (--max-body-mib)")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class ServeOptions:
    replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    batch_regroup_s: float = 0.05  # jobs.inference.batching: wait to reach the previous batch's size
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    threshold: float = DEFAULTS.threshold
    top_k: int = DEFAULTS.top_k
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    # Overload. Each replica holds at most ``queued_images`` images (None: 4 batches) and answers
    # 503 past them, at once. Serve's proxy sends a replica up to ``max_ongoing_requests`` requests
    # and holds up to ``max_queued_requests`` more (-1: no limit) before it answers 503 itself: a
    # request held in the proxy costs CPU while it waits (Serve's router polls the replicas for
    # room), which on 2 cores took throughput at 64 clients from 85 to 16 images/s, so the default
    # lets the replicas take the load and shed it. ``request_timeout_s``: the proxy answers 408.
    max_queued_images: int | None = None
    max_ongoing_requests: int = 256
    max_queued_requests: int = 64
    request_timeout_s: float | None = 60.0
    limits: RequestLimits = RequestLimits()

    @property
    def queued_images(self) -> int:
        return self.max_queued_images or 4 * self.max_batch_size


def start_serving(loaded: Loaded, options: ServeOptions) -> str:
    """Deploy on the connected Ray instance and return the URL to POST to (once replicas are up)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    logging_config = serve_logging_config()
    serve.start(http_options={"host": options.host, "port": options.port, "request_timeout_s": options.request_timeout_s},
                logging_config=logging_config)
    deployment = serve.deployment(SalglServer).options(
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
    )
    serve.run(deployment.bind(loaded, options), name=APP_NAME, route_prefix=options.route_prefix, blocking=False,
              logging_config=logging_config)
    return serve_url(options)


def serve_logging_config() -> Any:
    """Serve's INFO lines (its controller, proxy, replicas' access log, and the driver's "Started
    Serve", "Application is ready") only at ``-v``, like the rest of Ray's: the command says where
    it serves. Serve's driver logger has its own handler, set up as ``ray.serve`` is imported."""
    from ray.serve.schema import LoggingConfig

    level = logging.INFO if console_level() <= logging.DEBUG else logging.WARNING
    logging.getLogger("ray.serve").setLevel(level)
    return LoggingConfig(log_level=level)


def serve_url(options: ServeOptions) -> str:
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    return f"http://{host}:{options.port}{options.route_prefix.rstrip('/') or ''}/"


def stop_serving(*, whole_instance: bool) -> None:
    """Remove this app; shut Serve down too when the Ray instance is our own (others' apps live on a cluster)."""
    from ray import serve

    if whole_instance:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
