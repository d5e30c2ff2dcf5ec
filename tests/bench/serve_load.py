"""Serving under load: ``salgl serve`` (Ray Serve, batched) against ``mlflow models serve`` (one image per call).

    .venv/bin/python -m tests.bench.serve_load [--requests 300] [--levels 1 4 16 64] [--soak 10000]
                                               [--parts compare batch replicas overload soak] [--out bench_out/serve_load.json]

The model is the default recipe's network (``jobs/configs/default.yaml``: EfficientNet-Lite0 from
its offline ImageNet weights, MiniLM label embeddings, 96 px, the mosaic's 10 labels) with an
untrained head: load depends on the shapes, not the weights. The images are real 96 px mosaic PNGs,
one per request, sent by a bounded asyncio client (aiohttp) on 127.0.0.1: a fixed number of
requests per level, ``concurrency`` of them in flight, each level also cut off after ``--max-level-s``.

Parts (each starts its servers, measures, and stops them):

- ``compare``: both servers at every concurrency level, images/s, p50/p95/p99 latency, error rate,
  and the batch sizes salgl serve's replica formed. salgl serve runs with its defaults and one
  replica holding every CPU (``--cpus-per-replica``, as MLflow's process uses them all);
- ``batch``: ``--max-batch-size`` 1, 8 and 32 (default 16: ``compare``) at the top two levels;
- ``replicas``: 1 replica on every CPU against one replica per CPU;
- ``overload``: 4x the top level's concurrency against the default limits and against none
  (``--max-queued-images`` and ``--max-queued-requests`` off): p99 of the accepted requests, 503s.
  Every client honours ``Retry-After`` (it waits as told after a 503), as HTTP clients that retry do;
- ``soak``: ``--soak`` requests at concurrency 8, RSS of every server process before and after.

RSS is read from /proc for the server command and everything below it (Ray's raylet, GCS, Serve
controller, proxy and replicas; MLflow's uvicorn workers). Not a test: it takes 10 - 20 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tests._servers import free_port, stop_server, wait_until_answering

ROOT = Path(__file__).resolve().parents[2]
LEVELS = (1, 4, 16, 64)


# ---------------------------------------------------------------------------------------------
# The model and images


def default_recipe_checkpoint(folder: Path) -> tuple[Path, Path]:
    """(checkpoint, MLflow model folder) of the default recipe's network on the mosaic's labels."""
    import torch
    import yaml

    from jobs.inference.loading import load_for_inference
    from jobs.inference.pyfunc import save_salgl_model
    from jobs.training.checkpoints import TrainingState, write_checkpoint
    from pipeline.mosaic import FASHION_MNIST_CLASSES
    from salgl.config import load, to_flat
    from salgl.ema import ModelEma
    from salgl.model import create_model

    cfg = load(yaml.safe_load((ROOT / "jobs/configs/default.yaml").read_text()))
    vocabulary = list(FASHION_MNIST_CLASSES)
    torch.manual_seed(0)
    model = create_model(cfg.model, vocabulary).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    checkpoint = write_checkpoint(
        folder / "checkpoint_000001", model=model, ema=ModelEma(model, cfg.ema), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), state=TrainingState(epoch=1, step=1),
        config=to_flat(cfg), vocabulary=vocabulary, metrics={"ema_mAP": 0.0, "epoch": 1})
    save_salgl_model(folder / "model", *load_for_inference(str(checkpoint)))
    return Path(checkpoint), folder / "model"


def mosaic_pngs(folder: Path, count: int = 32, size: int = 96) -> list[bytes]:
    """``count`` encoded mosaic images of ``size`` px (the dataset converter's PNGs)."""
    import pyarrow.parquet as pq

    from pipeline.mosaic import MosaicConfig, convert_mosaic
    from pipeline.shards import shard_paths

    convert_mosaic(folder / "mosaic", MosaicConfig(train=count, test=count, canvas=size), progress=False)
    images = [bytes(b) for path in shard_paths(folder / "mosaic", "test") for b in pq.read_table(path, columns=["image"])["image"].to_pylist()]
    return images[:count]


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    body: Any  # image bytes -> (request body, content type)

    def stop(self) -> None:
        stop_server(self.proc, group=True)


def start_salgl(checkpoint: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "jobs.cli", "serve", str(checkpoint), "--port", str(port), *extra]
    proc = _start(cmd, url, log)
    return Server("salgl serve " + " ".join(extra), proc, url, lambda image: (image, "image/png"))


def start_mlflow(model: Path, log: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    proc = _start(cmd, f"http://127.0.0.1:{port}/ping", log)

    def body(image: bytes) -> tuple[bytes, str]:
        frame = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
        return json.dumps(frame).encode(), "application/json"

    return Server("mlflow models serve", proc, f"http://127.0.0.1:{port}/invocations", body)


def _start(cmd: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    print(f"serve_load: {' '.join(cmd[2:])}", flush=True)
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # uvicorn
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answering(ready_url, proc, timeout=240)
    except (RuntimeError, TimeoutError):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def process_rss(root: int) -> dict[str, float]:
    """RSS in MiB of ``root`` and every process below it, by a short name (summed per name)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    rss: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        name = _short_name(pid, root, cmdline)
        rss[name] = round(rss.get(name, 0.0) + kib / 1024, 1)
    return rss


def _short_name(pid: int, root: int, cmdline: str) -> str:
    for marker in ("ServeReplica", "ProxyActor", "ServeController", "raylet", "gcs_server", "dashboard", "log_monitor",
                   "uvicorn", "runtime_env"):
        if marker in cmdline:
            return marker
    if pid == root:
        return "command"
    return cmdline.split(" ")[0].rsplit("/", 1)[-1][:24] or str(pid)


def replica_status(server: Server, replicas: int) -> list[dict[str, Any]]:
    """Every replica's ``status()`` from GETs (each answered by one replica), until all have answered."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(40 * replicas):
        with urllib.request.urlopen(server.url, timeout=30) as response:
            status = json.loads(response.read())["replica"]
        seen[status["replica"]] = status
        if len(seen) >= replicas:
            break
    return list(seen.values())


def formed_batches(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, int]:
    """Forward passes per batch size between two ``replica_status`` readings, over all replicas."""
    counts: dict[int, int] = {}
    old = {s["replica"]: s["batch_sizes"] for s in before}
    for status in after:
        for size, n in status["batch_sizes"].items():
            counts[int(size)] = counts.get(int(size), 0) + n - old.get(status["replica"], {}).get(size, 0)
    return {str(size): n for size, n in sorted(counts.items()) if n}


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    latencies_ms: list[float] = field(repr=False)  # of the accepted (2xx) requests
    refused_ms: list[float] = field(repr=False)  # of the answered others (503, 4xx): how fast a refusal comes

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        out = {"concurrency": self.concurrency, "requests": self.requests, "ok": self.ok, "errors": self.errors,
               "error_rate": round(1 - self.ok / max(1, self.requests), 4), "seconds": round(self.seconds, 2),
               "images_per_s": round(self.ok / self.seconds, 1),
               **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}}
        if self.refused_ms:
            out.update({f"refused_p{q}_ms": round(float(np.percentile(self.refused_ms, q)), 1) for q in (50, 99)})
        return out


async def _load(server: Server, images: Sequence[bytes], concurrency: int, requests: int, max_s: float) -> LevelResult:
    import aiohttp

    bodies = [server.body(image) for image in images]
    latencies: list[float] = []
    refused: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    deadline = time.monotonic() + max_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            body, content_type = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            retry_after = None
            try:
                async with session.post(server.url, data=body, headers={"Content-Type": content_type}) as response:
                    await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status = type(err).__name__
            (latencies if status == 200 else refused if isinstance(status, int) else []).append((time.perf_counter() - start) * 1000)
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
            if retry_after is not None:  # a client that backs off as told (503 from a full replica)
                await asyncio.sleep(min(float(retry_after), max(0.0, deadline - time.monotonic())))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return LevelResult(concurrency, sent, len(latencies), errors, time.perf_counter() - start, latencies, refused)


def measure(server: Server, images: Sequence[bytes], concurrency: int, requests: int, max_s: float,
            replicas: int = 0) -> dict[str, Any]:
    """One level: a short warm-up at the level's concurrency, then ``requests`` timed requests."""
    asyncio.run(_load(server, images, concurrency, min(requests, 2 * concurrency + 8), max_s))
    before = replica_status(server, replicas) if replicas else []
    result = asyncio.run(_load(server, images, concurrency, requests, max_s)).summary()
    if replicas:
        result["batch_sizes"] = formed_batches(before, replica_status(server, replicas))
    print(f"  {server.name:<48} c={concurrency:<4} {result['images_per_s']:>7.1f} img/s  p50 {result['p50_ms']:>7.1f}  "
          f"p99 {result['p99_ms']:>8.1f} ms  errors {result['errors'] or 0}"
          + (f" (answered in p50 {result['refused_p50_ms']:.0f} / p99 {result['refused_p99_ms']:.0f} ms)" if "refused_p50_ms" in result else "")
          + (f"  batches {result['batch_sizes']}" if replicas else ""), flush=True)
    return result


def run_levels(server: Server, images: Sequence[bytes], levels: Sequence[int], args: argparse.Namespace,
               replicas: int = 0) -> dict[str, Any]:
    rss_before = process_rss(server.proc.pid)
    results = [measure(server, images, c, args.requests, args.max_level_s, replicas) for c in levels]
    return {"server": server.name, "levels": results, "rss_mib_before": rss_before, "rss_mib_after": process_rss(server.proc.pid)}


# ---------------------------------------------------------------------------------------------
# Parts


CPUS = os.cpu_count() or 1
ALL_CPUS = ("--cpus-per-replica", str(CPUS))


def part_compare(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    server = start_mlflow(ctx["model"], ctx["log"])
    try:
        out["mlflow"] = run_levels(server, ctx["images"], args.levels, args)
    finally:
        server.stop()
    server = start_salgl(ctx["checkpoint"], ctx["log"], *ALL_CPUS)
    try:
        out["salgl"] = run_levels(server, ctx["images"], args.levels, args, replicas=1)
        out["salgl"]["replica"] = replica_status(server, 1)[0]
    finally:
        server.stop()
    return out


def part_batch(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for size in (1, 8, 32):
        queue = ("--max-queued-images", str(4 * 16))  # the default batch size's: batching alone differs
        server = start_salgl(ctx["checkpoint"], ctx["log"], *ALL_CPUS, "--max-batch-size", str(size), *queue)
        try:
            out[str(size)] = run_levels(server, ctx["images"], args.levels[-2:], args, replicas=1)
        finally:
            server.stop()
    return out


def part_replicas(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for replicas in sorted({1, CPUS}):
        cpus = ("--cpus-per-replica", str(CPUS // replicas))
        server = start_salgl(ctx["checkpoint"], ctx["log"], *cpus, "--replicas", str(replicas))
        try:
            out[str(replicas)] = run_levels(server, ctx["images"], args.levels[-2:], args, replicas=replicas)
        finally:
            server.stop()
    return out


def part_overload(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    concurrency = 4 * args.levels[-1]
    unbounded = ("--max-queued-images", "1000000", "--max-queued-requests", "-1")
    for queue, extra in (("default", ()), ("unbounded", unbounded)):
        server = start_salgl(ctx["checkpoint"], ctx["log"], *ALL_CPUS, *extra)
        try:
            out[queue] = run_levels(server, ctx["images"], [concurrency], argparse.Namespace(**{**vars(args), "requests": 2 * args.requests}),
                                    replicas=1)
        finally:
            server.stop()
    return out


def part_soak(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    server = start_salgl(ctx["checkpoint"], ctx["log"], *ALL_CPUS)
    try:
        measure(server, ctx["images"], 8, 200, args.max_level_s)  # warm: first allocations are not growth
        before = process_rss(server.proc.pid)
        result = measure(server, ctx["images"], 8, args.soak, 3600)
        after = process_rss(server.proc.pid)
    finally:
        server.stop()
    growth = {name: round(after.get(name, 0.0) - mib, 1) for name, mib in before.items()}
    print(f"  soak RSS growth (MiB): {growth}", flush=True)
    return {"result": result, "rss_mib_before": before, "rss_mib_after": after, "rss_growth_mib": growth}


PARTS = {"compare": part_compare, "batch": part_batch, "replicas": part_replicas, "overload": part_overload, "soak": part_soak}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="timed requests per level (default 300)")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrency levels (default 1 4 16 64)")
    parser.add_argument("--soak", type=int, default=10_000, help="requests of the soak (default 10000)")
    parser.add_argument("--max-level-s", type=float, default=120.0, help="a level stops after this long (default 120 s)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out/serve_load.json")
    args = parser.parse_args(argv)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                              "command": "python -m tests.bench.serve_load " + " ".join(sys.argv[1:] if argv is None else argv),
                              "requests_per_level": args.requests}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp)
        checkpoint, model = default_recipe_checkpoint(folder)
        ctx = {"checkpoint": checkpoint, "model": model, "images": mosaic_pngs(folder), "log": args.out.with_suffix(".log")}
        print(f"serve_load: server output in {ctx['log']}", flush=True)
        for name in args.parts:
            print(f"serve_load: {name}", flush=True)
            report[name] = PARTS[name](ctx, args)
            args.out.write_text(json.dumps(report, indent=2))  # what is measured survives a later part's failure
    print(f"serve_load: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
