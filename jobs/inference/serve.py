"""``salgl serve``: a Ray Serve deployment that answers an HTTP POST of images with ``salgl predict``'s records.

Two request forms, told apart by the body (an encoded image never starts with ``{``):

- the raw image as the body (``curl --data-binary @img.jpg``): one record; ``threshold`` and
  ``top_k`` may come as query parameters;
- JSON ``{"images": ["<base64>", ...], "threshold": 0.5, "top_k": 5}``: a list of records, in order.

Each record is the one ``predict_chunk`` makes (the MLflow model's and ``salgl predict``'s,
without ``path``); an image that cannot be decoded gets its ``error`` record, a malformed request
a 400. Every image is queued on its own with ``@serve.batch``, so images of concurrent requests
share one forward pass. Ray and Starlette are imported inside functions: the parsing is plain
Python and is tested without them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any, Mapping

from jobs.inference.predict import predict_chunk
from jobs.logs import console_level
from salgl.errors import BadValue

if TYPE_CHECKING:
    from jobs.inference.loading import Loaded

APP_NAME = "salgl"
DEFAULTS: dict[str, Any] = {"threshold": 0.5, "top_k": 5}  # salgl predict's


class BadRequest(BadValue):
    """A request the server cannot read (answered 400 with this message)."""


@dataclass(frozen=True)
class Request:
    images: list[bytes]
    threshold: float
    top_k: int
    single: bool  # the raw-body form: answer one record, not a list


# ---------------------------------------------------------------------------------------------
# Request parsing (no Ray)


def parse_request(body: bytes, query: Mapping[str, str], defaults: Mapping[str, Any] = DEFAULTS) -> Request:
    """The images and options of a POST body: JSON when it starts with ``{``, else one encoded image."""
    if not body:
        raise BadRequest("empty body: POST an image, or JSON {\"images\": [\"<base64>\", ...]}")
    if body.lstrip()[:1] == b"{":
        return _json_request(body, defaults)
    options = {**defaults, **{k: v for k, v in query.items() if k in DEFAULTS}}
    return Request([body], _threshold(options["threshold"]), _top_k(options["top_k"]), single=True)


def _json_request(body: bytes, defaults: Mapping[str, Any]) -> Request:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):  # a body of `{` then garbage is caught above; this is belt and braces
        raise BadRequest("the JSON body must be an object with an \"images\" list")
    unknown = set(payload) - {"images", *DEFAULTS}
    if unknown:
        raise BadRequest(f"unknown key(s) {sorted(unknown)}: the JSON body takes images, threshold, top_k")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise BadRequest("\"images\" must be a non-empty list of base64-encoded images")
    options = {**defaults, **{k: payload[k] for k in DEFAULTS if k in payload}}
    return Request([_base64_image(i, x) for i, x in enumerate(images)], _threshold(options["threshold"]),
                   _top_k(options["top_k"]), single=False)


def _base64_image(index: int, value: Any) -> bytes:
    # Base64 only: unlike the MLflow model in process (pyfunc.image_source), a server never
    # takes a string as the name of a file to read.
    if not isinstance(value, str):
        raise BadRequest(f"images[{index}] must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode("".join(value.split()), validate=True)  # encodebytes wraps lines: join them
    except (binascii.Error, ValueError):
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


class SalglServer:
    """One replica: the network (loaded by the driver, shipped with the deployment) and a batch queue."""

    def __init__(self, loaded: Loaded, *, threshold: float, top_k: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        import torch
        from ray import serve

        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only where the replica was given one
        self.model, self.cfg, self.vocabulary = loaded.model.to(device).eval(), loaded.cfg, loaded.vocabulary
        self.defaults = {"threshold": threshold, "top_k": top_k}
        self.batch_sizes: list[int] = []  # per forward pass, for tests and `batch_sizes()`
        # Decorated here, not on the class, so each deployment takes its own size from the CLI.
        self.score = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(self._score_batch)

    async def _score_batch(self, items: list[tuple[bytes, float, int]]) -> list[dict[str, Any]]:
        """The records of queued images; images that share threshold and top_k share one forward pass."""
        records: dict[int, dict[str, Any]] = {}
        order = sorted(range(len(items)), key=lambda i: items[i][1:])
        for (threshold, top_k), group in groupby(order, key=lambda i: items[i][1:]):
            indices = list(group)
            self.batch_sizes.append(len(indices))
            chunk = predict_chunk(self.model, self.cfg.data, self.vocabulary, [items[i][0] for i in indices],
                                  threshold=threshold, top_k=top_k)
            records.update(zip(indices, chunk))
        return [records[i] for i in range(len(items))]

    async def __call__(self, request: Any) -> Any:
        """POST: records (400 for a request that cannot be read); GET: what is served, for health checks."""
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse({"labels": len(self.vocabulary), **self.defaults})
        try:
            parsed = parse_request(await request.body(), request.query_params, self.defaults)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        records = await asyncio.gather(*(self.score((image, parsed.threshold, parsed.top_k)) for image in parsed.images))
        return JSONResponse(records[0] if parsed.single else list(records))

    def get_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)


@dataclass(frozen=True)
class ServeOptions:
    replicas: int = 1
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    threshold: float = DEFAULTS["threshold"]
    top_k: int = DEFAULTS["top_k"]
    gpus_per_replica: float = 0.0


def start_serving(loaded: Loaded, options: ServeOptions) -> str:
    """Deploy on the connected Ray instance and return the URL to POST to (once replicas are up)."""
    from ray import serve

    logging_config = serve_logging_config()
    serve.start(http_options={"host": options.host, "port": options.port}, logging_config=logging_config)
    deployment = serve.deployment(SalglServer).options(
        num_replicas=options.replicas,
        # A replica must hold a whole batch's requests at once, or batches never fill.
        max_ongoing_requests=max(5, 2 * options.max_batch_size),
        ray_actor_options={"num_gpus": options.gpus_per_replica},
    )
    app = deployment.bind(loaded, threshold=options.threshold, top_k=options.top_k,
                          max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_timeout_s)
    serve.run(app, name=APP_NAME, route_prefix=options.route_prefix, blocking=False, logging_config=logging_config)
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
