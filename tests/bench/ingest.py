"""Ingest benchmark: Ray Data vs a torch DataLoader over the same shards and transforms.

    .venv/bin/python tests/bench/ingest.py [--out bench_out/ingest.json] [--rows 1200 2400]
    .venv/bin/python tests/bench/ingest.py --store s3 [--out bench_out/ingest_s3.json]

Both sides run ``pipeline.transforms.transform_batch`` (train mode: decode, resize, flip, Cutout,
RandAugment, normalise) over the same parquet shards with 2 CPU processes: Ray Data with two data
tasks at a time, the DataLoader with ``num_workers=2``. Both end with the same float32 batches on
the consumer: the ingest's data tasks ship uint8 pixels and the consumer's collate thread
normalises them (as training does on a CPU); the DataLoader's workers normalise, as usual.

Measured per image size (224, 448) and per dataset size: images/s of a timed pass after a warm-up
(the dataset's files are read into the page cache first, so neither side pays for the disk), then,
over a second pass (sampling memory costs CPU, so it stays out of the timed one), peak PSS of the
driver plus every process of the pipeline (Ray workers, DataLoader workers) and the peak of Ray's
object store. Two dataset sizes show whether peak memory grows with the number of images.

``--store s3`` measures the training ingest alone, reading the same shards from an S3-compatible
server started here on 127.0.0.1 (moto's server mode, a dev dependency) against reading them from
the local disk (page cache), and reports S3 / local images/s. The server runs on the same cores
as the pipeline, so its CPU counts against the S3 side.

The dataset is synthetic and built here, in the format of ``pipeline.shards``: 640 x 480 JPEGs
(quality 90, about 60-120 KB, like COCO's) cropped, flipped and tinted from scikit-image's sample
photos, with random multi-hot labels and ignore entries.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import shards  # noqa: E402
from pipeline.transforms import transform_batch  # noqa: E402
from salgl.config import DataConfig  # noqa: E402

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle")


# ---------------------------------------------------------------------------------------------
# Synthetic dataset


def _source_photos() -> list[np.ndarray]:
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in SAMPLE_PHOTOS]
    return [np.asarray(p[0] if isinstance(p, tuple) else p)[..., :3] for p in photos]  # stereo: left


def synthetic_jpegs(count: int, width: int, height: int, seed: int) -> list[bytes]:
    """``count`` distinct JPEGs: random crops of real photos, resized, flipped and tinted."""
    rng = np.random.default_rng(seed)
    sources = _source_photos()
    out = []
    for _ in range(count):
        src = sources[rng.integers(len(sources))]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        crop = src[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        tint = rng.uniform(0.8, 1.2, size=3)
        crop = np.clip(crop.astype(np.float32) * tint, 0, 255).astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_synthetic_dataset(
    root: str | os.PathLike[str],
    rows: dict[str, int],
    *,
    num_labels: int = 20,
    width: int = 640,
    height: int = 480,
    unique_images: int = 256,
    shard_rows: int = 512,
    row_group_rows: int = 128,
    scenes: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``root/manifest.json`` and ``root/<split>/part-*.parquet`` and return the manifest.

    Rows cycle through ``unique_images`` distinct JPEGs (encoding thousands is the slow part; the
    decode cost per row is the same). Labels: 1-4 random indices per row; ignore: one label not
    in ``labels`` for about a fifth of the rows; ``scene`` when ``scenes`` > 0.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    jpegs = synthetic_jpegs(min(unique_images, max(rows.values())), width, height, seed)
    extra = ("scene",) if scenes else ()
    schema = shards.dataset_schema(extra)
    splits: dict[str, Any] = {}
    for split, count in rows.items():
        with shards.ShardWriter(root, split, shard_rows=shard_rows, schema=schema, row_group_rows=row_group_rows) as writer:
            for i in range(count):
                labels = sorted(rng.choice(num_labels, size=int(rng.integers(1, 5)), replace=False).tolist())
                others = sorted(set(range(num_labels)) - set(labels))
                ignore = [int(rng.choice(others))] if rng.random() < 0.2 else []
                row = {"image": jpegs[(i * 7 + len(split)) % len(jpegs)], "labels": labels, "id": f"{split}-{i:06d}", "ignore": ignore}
                if scenes:
                    row["scene"] = int(rng.integers(scenes))
                writer.write(row)
            splits[split] = {"rows": count, "shards": writer.close()}
    manifest = {
        "schema_version": shards.SCHEMA_VERSION,
        "source": "synthetic (tests/bench/ingest.py): crops of scikit-image sample photos, random labels",
        "vocabulary": [f"label{i:02d}" for i in range(num_labels)],
        "extra_columns": list(extra),
        "splits": splits,
    }
    shards.write_manifest(root, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# The two pipelines


def ray_batches(data_dir: str, cfg: DataConfig, *, batch: int, seed: int) -> Iterator[dict[str, Any]]:
    """The training ingest as a trainer runs it (``data_config``'s options), one consumer, two
    data tasks at a time."""
    from pipeline import ingest

    ds = ingest.train_dataset(data_dir, cfg, seed=seed, num_cpus=1, concurrency=2)
    ds.context.execution_options = ingest.execution_options()  # what data_config() gives Train
    return ingest.iter_train_batches(ds.iterator(), batch_size=batch, epoch=0, seed=seed, normalize=cfg.normalize)


def loader_batches(data_dir: str, cfg: DataConfig, *, batch: int, seed: int, workers: int = 2) -> Iterator[dict[str, Any]]:
    """The same work with a torch DataLoader: the same chunks in a seeded random order, dealt
    round-robin to ``workers`` processes, each chunk read, decoded and transformed by
    ``transform_batch`` and collated as the ingest collates."""
    import torch

    from pipeline import ingest

    chunks = ingest.chunk_table(data_dir, "train", batch)
    n = ingest.num_labels(data_dir)

    class Chunks(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[dict[str, Any]]:
            info = torch.utils.data.get_worker_info()
            worker, count = (info.id, info.num_workers) if info else (0, 1)
            for k in ingest.epoch_order(len(chunks), seed)[worker::count]:
                table = ingest.read_chunk(chunks[k])
                rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
                yield ingest._collate(transform_batch(rows, cfg=cfg, num_labels=n, train=True, seed=seed))

    return iter(torch.utils.data.DataLoader(Chunks(), batch_size=None, num_workers=workers, prefetch_factor=2))


PIPELINES: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {"ray_data": ray_batches, "dataloader": loader_batches}


# ---------------------------------------------------------------------------------------------
# Measuring (in a child process per measurement, so that each pipeline's processes are counted alone)


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_pss(root: int) -> int:
    """Proportional set size of a process tree (shared pages split among the processes that map
    them, so the sum is the real footprint; Ray's object store pages count too), in bytes."""
    total = 0
    for pid in _tree(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of a process tree, including its reaped children (Ray workers that
    exited count in the raylet, DataLoader workers in this process)."""
    ticks = 0
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def plasma_bytes(address: str) -> int:
    """Bytes in Ray's object store (what ``ray memory --stats-only`` prints)."""
    import re

    from ray._private.internal_api import memory_summary

    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
    return int(match.group(1)) << 20 if match else 0


class Peak(threading.Thread):
    """Peak PSS of this process's tree and peak object-store bytes, sampled every ``period`` s."""

    def __init__(self, ray_address: str | None, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.ray_address, self.period = ray_address, period
        self.pss = self.plasma = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.pss = max(self.pss, tree_pss(os.getpid()))
            if self.ray_address:
                try:
                    self.plasma = max(self.plasma, plasma_bytes(self.ray_address))
                except Exception:  # noqa: BLE001 - a lost sample is not worth the run
                    pass
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure_throughput(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Images/s over the whole pass (the time to the first batch, included, is also reported
    alone: it is what the pipeline needs to fill), and images per CPU-second of the pipeline's
    processes (insensitive to other load on a shared machine). Nothing samples memory during this
    pass: reading PSS walks every process's page tables, and Ray's processes map the object store,
    so at 448 px a sample every 0.5 s cost 3 CPU-seconds of a 12 s pass (-14% images/s)."""
    cpu0 = tree_cpu_seconds(os.getpid())
    start = time.perf_counter()
    first, images = None, 0
    for batch in batches:
        first = first or time.perf_counter()
        images += len(batch["id"])
    end = time.perf_counter()
    del batches  # a DataLoader joins its workers here, so their CPU time is counted
    time.sleep(1.0)
    cpu = tree_cpu_seconds(os.getpid()) - cpu0
    assert first is not None, "no batch"
    return {
        "images": images,
        "startup_s": round(first - start, 2),
        "seconds": round(end - start, 2),
        "images_per_s": round(images / (end - start), 1),
        "cpu_s": round(cpu, 1),
        "images_per_cpu_s": round(images / cpu, 1),
    }


def measure_memory(batches: Iterator[dict[str, Any]], ray_address: str | None) -> dict[str, Any]:
    """Peak PSS of the pipeline's processes and peak object-store bytes over a second pass."""
    peak = Peak(ray_address)
    peak.start()
    for _ in batches:
        pass
    del batches
    peak.stop()
    return {"peak_pss_mb": round(peak.pss / 2**20), "peak_object_store_mb": round(peak.plasma / 2**20) if ray_address else None}


def child(pipeline: str, data_dir: str, warm_dir: str, size: int, batch: int) -> dict[str, Any]:
    """One measurement: start the pipeline's processes, one warm-up pass over a small dataset
    (worker start-up and imports are not ingest throughput), a timed pass, then a pass with
    memory sampling."""
    cfg = DataConfig(img_size=size)
    address = None
    if pipeline == "ray_data":
        import ray

        address = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False).address_info["address"]
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    else:
        from pipeline.transforms import randaugment

        randaugment(2, 0.5, size)  # import timm before the DataLoader forks its workers
    make = PIPELINES[pipeline]
    for _ in make(warm_dir, cfg, batch=batch, seed=1):
        pass
    result = measure_throughput(make(data_dir, cfg, batch=batch, seed=0))
    return {**result, **measure_memory(make(data_dir, cfg, batch=batch, seed=2), address)}


# ---------------------------------------------------------------------------------------------
# Driver


def read_through(data_dir: str) -> int:
    """Read every file of a dataset once, so that it sits in the page cache: otherwise whichever
    pipeline reads a dataset first also pays for the disk (the warm-up pass reads another one)."""
    total = 0
    for path in sorted(Path(data_dir).rglob("*.parquet")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


BUCKET = "salgl-bench"


def start_s3(dirs: dict[int, str]) -> tuple[Any, dict[int, str]]:
    """An S3 server on 127.0.0.1 holding a copy of every dataset of ``dirs``; its address in
    ``os.environ`` (the children inherit it). Returns the server process and the datasets' URIs."""
    import boto3
    import pyarrow.fs

    from tests._servers import free_port, start_server

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                        endpoint + "/moto-api/", timeout=60, name="moto server")
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint})
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}")
    uris = {}
    for n, d in dirs.items():
        pyarrow.fs.copy_files(d, f"{BUCKET}/rows{n}", destination_filesystem=fs)
        uris[n] = f"s3://{BUCKET}/rows{n}"
    return proc, uris


def measure_stores(dirs: dict[int, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Ray Data's images/s from the S3 server and from the local disk, per image and dataset size
    (alternating which goes first)."""
    from tests._servers import stop_server

    proc, uris = start_s3(dirs)
    results = []
    try:
        for size in args.sizes:
            for i, n in enumerate(args.rows):
                for store in ("local", "s3")[:: 1 if i % 2 == 0 else -1]:
                    read_through(dirs[n])
                    where = {"local": dirs, "s3": uris}[store]
                    row = {"pipeline": "ray_data", "store": store, "img_size": size, "rows": n,
                           **run_child("ray_data", where[n], where[128], size, args.batch)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        stop_server(proc)
    return results


def summarize_stores(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per image size and dataset size: images/s from S3 over images/s from the local disk."""
    by = {(r["store"], r["img_size"], r["rows"]): r for r in results}
    return [{"img_size": size, "rows": n, "s3_over_local": round(by[("s3", size, n)]["images_per_s"] / by[("local", size, n)]["images_per_s"], 2)}
            for (store, size, n) in by if store == "s3"]


def run_child(pipeline: str, data_dir: str, warm_dir: str, size: int, batch: int) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, __file__, "--child", pipeline, data_dir, warm_dir, str(size), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{pipeline} at {size} px failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(results: list[dict[str, Any]], rows: list[int]) -> list[dict[str, Any]]:
    """Per image size and dataset size: Ray Data / DataLoader throughput; per pipeline and image
    size: peak memory of the larger dataset over the smaller one."""
    by = {(r["pipeline"], r["img_size"], r["rows"]): r for r in results}
    out: list[dict[str, Any]] = []
    for size in sorted({r["img_size"] for r in results}):
        for n in rows:
            ray_row, dl_row = by[("ray_data", size, n)], by[("dataloader", size, n)]
            out.append({
                "img_size": size,
                "rows": n,
                "throughput_ratio": round(ray_row["images_per_s"] / dl_row["images_per_s"], 2),
                "cpu_efficiency_ratio": round(ray_row["images_per_cpu_s"] / dl_row["images_per_cpu_s"], 2),
            })
        for name in PIPELINES:
            small, large = by[(name, size, rows[0])], by[(name, size, rows[1])]
            out.append({"img_size": size, "pipeline": name, "peak_memory_growth": round(large["peak_pss_mb"] / small["peak_pss_mb"], 2)})
    return out


def print_table(results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    head = f"{'pipeline':<14} {'px':>4} {'rows':>5} {'img/s':>7} {'img/cpu-s':>9} {'first batch s':>13} {'peak PSS MB':>11} {'obj store MB':>12}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        store = "-" if r["peak_object_store_mb"] is None else str(r["peak_object_store_mb"])
        print(
            f"{r['pipeline'] + ('/' + r['store'] if 'store' in r else ''):<14} {r['img_size']:>4} {r['rows']:>5} {r['images_per_s']:>7.1f} {r['images_per_cpu_s']:>9.1f}"
            f" {r['startup_s']:>13.1f} {r['peak_pss_mb']:>11} {store:>12}"
        )
    print()
    for s in summary:
        if "s3_over_local" in s:
            print(f"{s['img_size']} px, {s['rows']} rows: Ray Data from S3 / from local disk = {s['s3_over_local']:.2f}x")
        elif "throughput_ratio" in s:
            print(
                f"{s['img_size']} px, {s['rows']} rows: Ray Data / DataLoader throughput = {s['throughput_ratio']:.2f}x,"
                f" images per CPU-second = {s['cpu_efficiency_ratio']:.2f}x"
            )
        else:
            print(f"{s['img_size']} px, {s['pipeline']}: peak memory, larger / smaller dataset = {s['peak_memory_growth']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default bench_out/ingest.json (--store s3: bench_out/ingest_s3.json)")
    parser.add_argument("--rows", type=int, nargs=2, default=[1000, 2000], help="the two dataset sizes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--store", choices=("local", "s3"), default="local",
                        help="s3: Ray Data reading from an S3 server on 127.0.0.1 against the local disk "
                             "(instead of Ray Data against a DataLoader)")
    parser.add_argument("--keep", help="write (or reuse) the datasets here instead of a temporary folder")
    parser.add_argument("--child", nargs=5, metavar=("PIPELINE", "DATA", "WARM", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or f"bench_out/ingest{'_s3' if args.store == 's3' else ''}.json"
    if args.child:
        pipeline, data_dir, warm_dir, size, batch = args.child
        print("RESULT " + json.dumps(child(pipeline, data_dir, warm_dir, int(size), int(batch))), flush=True)
        return 0

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="salgl-bench-"))
    t0 = time.perf_counter()
    dirs = {n: str(work / f"rows{n}") for n in [*args.rows, 128]}
    for n, d in dirs.items():
        if not Path(d, shards.MANIFEST_NAME).exists():
            write_synthetic_dataset(d, {"train": n}, shard_rows=512, row_group_rows=128, seed=n)
    print(f"datasets written in {time.perf_counter() - t0:.0f} s under {work}", flush=True)

    if args.store == "s3":
        results = measure_stores(dirs, args)
        summary = summarize_stores(results)
        return finish(results, summary, args, t0)
    results = []
    for size in args.sizes:
        for i, n in enumerate(args.rows):
            # Alternate which pipeline goes first: on a shared machine the load drifts.
            for name in list(PIPELINES)[:: 1 if i % 2 == 0 else -1]:
                read_through(dirs[n])
                row = {"pipeline": name, "img_size": size, "rows": n, **run_child(name, dirs[n], dirs[128], size, args.batch)}
                results.append(row)
                print(json.dumps(row), flush=True)

    return finish(results, summarize(results, args.rows), args, t0)


def finish(results: list[dict[str, Any]], summary: list[dict[str, Any]], args: argparse.Namespace, t0: float) -> int:
    print_table(results, summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "batch": args.batch, "processes": 2,
            "store": args.store, "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0)}
    out.write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=2) + "\n")
    print(f"wrote {out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
