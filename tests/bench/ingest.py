"""Ingest benchmark: Ray Data vs a torch DataLoader over the same shards and transforms.

    .venv/bin/python tests/bench/ingest.py [--out bench_out/ingest.json] [--rows 1200 2400]

Both sides run ``pipeline.transforms.transform_batch`` (train mode: decode, resize, flip, Cutout,
RandAugment, normalise) over the same parquet shards with 2 CPU processes: Ray Data with two data
tasks at a time, the DataLoader with ``num_workers=2``. Measured per image size (224, 448) and
per dataset size: images/s after a warm-up, peak RSS of the driver plus every process of the
pipeline (Ray workers, DataLoader workers), and the peak of Ray's object store. Two dataset sizes
show whether peak memory grows with the number of images.

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
    """The training ingest as the trainer runs it (``data_config``'s options), one consumer."""
    from pipeline import ingest

    ds = ingest.train_dataset(data_dir, cfg, seed=seed, num_cpus=1, concurrency=2)
    ds.context.execution_options = ingest.execution_options()  # as data_config() gives Train
    return ingest.iter_train_batches(ds.iterator(), batch_size=batch, epoch=0, seed=seed)


class ParquetRowGroups:
    """A torch IterableDataset over the same shards: row groups in a seeded random order, split
    among DataLoader workers, rows permuted within a row group, ``transform_batch`` on chunks of
    ``batch`` rows (the usual hand-written DataLoader pipeline for parquet)."""

    def __init__(self, paths: list[str], cfg: DataConfig, *, num_labels: int, batch: int, seed: int) -> None:
        import pyarrow.parquet as pq

        self.units = [(p, g) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)]
        self.cfg, self.num_labels, self.batch, self.seed = cfg, num_labels, batch, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq
        import torch

        from pipeline.ingest import _collate

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = np.random.default_rng(self.seed).permutation(len(self.units))
        for k in order[worker::workers]:
            path, group = self.units[k]
            table = pq.ParquetFile(path).read_row_group(group)
            table = table.take(np.random.default_rng([self.seed, int(k)]).permutation(table.num_rows))
            for start in range(0, table.num_rows, self.batch):
                chunk = table.slice(start, self.batch)
                cols = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
                out = transform_batch(cols, cfg=self.cfg, num_labels=self.num_labels, train=True, seed=self.seed)
                yield _collate(out)


def loader_batches(data_dir: str, cfg: DataConfig, *, batch: int, seed: int, workers: int = 2) -> Iterator[dict[str, Any]]:
    import torch

    from pipeline.shards import read_manifest, shard_paths

    n = len(read_manifest(data_dir)["vocabulary"])
    dataset = ParquetRowGroups(shard_paths(data_dir, "train"), cfg, num_labels=n, batch=batch, seed=seed)

    class Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(dataset)

    return iter(torch.utils.data.DataLoader(Iterable(), batch_size=None, num_workers=workers, prefetch_factor=2))


# ---------------------------------------------------------------------------------------------
# Measuring


class Peak(threading.Thread):
    """Samples, every ``period`` s, the proportional set size (PSS: shared pages split among the
    processes that map them, so the sum is the real footprint) of this process plus either Ray's
    processes (raylet, GCS, workers; the object store's pages count in the raylet) or the
    DataLoader's workers, and the bytes in Ray's object store."""

    def __init__(self, ray_address: str | None, ray_pids: set[int], period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.ray_address, self.ray_pids, self.period = ray_address, ray_pids, period
        self.pss = self.plasma = 0
        self._stop_event = threading.Event()

    def _processes(self) -> list[Any]:
        import psutil

        me = psutil.Process()
        mine = [p for p in me.children() if (p.pid in self.ray_pids) == bool(self.ray_address)]
        return [me, *mine, *(d for p in mine for d in p.children(recursive=True))]

    def _sample(self) -> None:
        import psutil

        total = 0
        for proc in self._processes():
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.pss = max(self.pss, total)
        if self.ray_address:
            try:
                self.plasma = max(self.plasma, plasma_bytes(self.ray_address))
            except Exception:  # noqa: BLE001 - a sample lost while Ray is busy is not worth a crash
                pass

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def plasma_bytes(address: str) -> int:
    """Bytes in Ray's object store (``ray memory --stats-only``)."""
    import re

    from ray._private.internal_api import memory_summary

    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
    return int(match.group(1)) << 20 if match else 0


def measure(batches: Callable[[], Iterator[dict[str, Any]]], ray_address: str | None, ray_pids: set[int]) -> dict[str, float]:
    """Images/s over the whole pass and from the first batch on (start-up excluded), peak memory."""
    peak = Peak(ray_address, ray_pids)
    peak.start()
    start = time.perf_counter()
    first = None
    images = 0
    for batch in batches():
        if first is None:
            first, first_rows = time.perf_counter(), len(batch["id"])
        images += len(batch["id"])
    end = time.perf_counter()
    peak.stop()
    assert first is not None
    return {
        "images": images,
        "startup_s": round(first - start, 2),
        "seconds": round(end - first, 2),
        "images_per_s": round(images / (end - start), 1),
        "steady_images_per_s": round((images - first_rows) / max(end - first, 1e-9), 1),
        "peak_pss_mb": round(peak.pss / 2**20),
        "peak_object_store_mb": round(peak.plasma / 2**20) if ray_address else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/ingest.json")
    parser.add_argument("--rows", type=int, nargs=2, default=[1000, 2000], help="two dataset sizes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--keep", help="write the datasets here instead of a temporary folder")
    args = parser.parse_args(argv)

    import ray

    from pipeline.transforms import randaugment

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="salgl-bench-"))
    dirs = {}
    t0 = time.perf_counter()
    for rows in args.rows:
        dirs[rows] = str(work / f"rows{rows}")
        if not Path(dirs[rows], shards.MANIFEST_NAME).exists():
            write_synthetic_dataset(dirs[rows], {"train": rows}, shard_rows=512, row_group_rows=128)
    print(f"datasets written in {time.perf_counter() - t0:.0f} s under {work}", flush=True)

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = context.address_info["address"]
    ray.data.DataContext.get_current().issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    import psutil

    ray_pids = {p.pid for p in psutil.Process().children()}  # Ray's processes; later children are the DataLoader's
    for size in args.sizes:
        randaugment(2, 0.5, size)  # import timm before the DataLoader forks its workers
    pipelines = {
        "ray_data": (lambda d, c: ray_batches(d, c, batch=args.batch, seed=0), address),
        "dataloader": (lambda d, c: loader_batches(d, c, batch=args.batch, seed=0), None),
    }
    warm = DataConfig(img_size=min(args.sizes))  # start Ray's workers and import everything once
    for name, (make, addr) in pipelines.items():
        measure(lambda: make(dirs[args.rows[0]], warm), addr, ray_pids)

    results = []
    for size in args.sizes:
        cfg = DataConfig(img_size=size)
        for i, rows in enumerate(args.rows):
            # Alternate which pipeline goes first: the machine may be shared and its load drift.
            for name in list(pipelines)[:: 1 if i % 2 == 0 else -1]:
                make, addr = pipelines[name]
                row = {"pipeline": name, "img_size": size, "rows": rows, **measure(lambda: make(dirs[rows], cfg), addr, ray_pids)}
                results.append(row)
                print(json.dumps(row), flush=True)
    ray.shutdown()

    summary = summarize(results, args.rows)
    print_table(results, summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg(), "batch": args.batch, "processes": 2}
    out.write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def summarize(results: list[dict[str, Any]], rows: list[int]) -> list[dict[str, Any]]:
    """Per image size and dataset size: Ray Data / DataLoader throughput; per pipeline and image
    size: peak memory of the larger dataset over the smaller one."""
    by = {(r["pipeline"], r["img_size"], r["rows"]): r for r in results}
    out = []
    for size in sorted({r["img_size"] for r in results}):
        for n in rows:
            ray_row, dl_row = by[("ray_data", size, n)], by[("dataloader", size, n)]
            out.append({
                "img_size": size,
                "rows": n,
                "throughput_ratio": round(ray_row["images_per_s"] / dl_row["images_per_s"], 2),
                "steady_throughput_ratio": round(ray_row["steady_images_per_s"] / dl_row["steady_images_per_s"], 2),
            })
        for name in ("ray_data", "dataloader"):
            small, large = by[(name, size, rows[0])], by[(name, size, rows[1])]
            out.append({"img_size": size, "pipeline": name, "peak_memory_growth": round(large["peak_pss_mb"] / small["peak_pss_mb"], 2)})
    return out


def print_table(results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    head = f"{'pipeline':<11} {'px':>4} {'rows':>5} {'img/s':>7} {'steady':>7} {'start s':>7} {'peak PSS MB':>11} {'obj store MB':>12}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        store = "-" if r["peak_object_store_mb"] is None else str(r["peak_object_store_mb"])
        print(f"{r['pipeline']:<11} {r['img_size']:>4} {r['rows']:>5} {r['images_per_s']:>7.1f} {r['steady_images_per_s']:>7.1f} {r['startup_s']:>7.1f} {r['peak_pss_mb']:>11} {store:>12}")
    print()
    for s in summary:
        if "throughput_ratio" in s:
            print(f"{s['img_size']} px, {s['rows']} rows: Ray Data / DataLoader throughput = {s['throughput_ratio']:.2f}x (steady state {s['steady_throughput_ratio']:.2f}x)")
        else:
            print(f"{s['img_size']} px, {s['pipeline']}: peak memory larger / smaller dataset = {s['peak_memory_growth']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
