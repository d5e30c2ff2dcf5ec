"""Small dataset trees in the real on-disk formats, built with real photos, for the converter tests,
and what a converter wrote from them.

The photos are scikit-image's sample images (astronaut, chelsea the cat, coffee, rocket, ...),
cropped and re-encoded as small JPEGs so a tree costs a few kilobytes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from skimage import data as skdata

from pipeline.shards import shard_paths

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat")


@functools.cache
def photo_jpeg(i: int, size: int = 40) -> bytes:
    """A real photo (the ``i``-th sample, cropped differently per ``i``) as small JPEG bytes."""
    pixels: np.ndarray = getattr(skdata, _PHOTOS[i % len(_PHOTOS)])()
    shift = (i // len(_PHOTOS)) * 17 % 100
    img = Image.fromarray(pixels[shift:, shift:]).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def noise_pngs(folder: Path) -> list[Path]:
    """Two PNG files of noise: one square at the tiny model's size (64 px), one that predict must resize."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 64), (90, 50)]):
        paths.append(folder / f"image_{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def truncated_jpeg() -> bytes:
    """A real JPEG cut in half: the header parses, the pixel data does not."""
    data = photo_jpeg(0, size=64)
    return data[: len(data) // 2]


# ------------------------------------------------------------------------------------------- VOC

VocObjects = Sequence[tuple[str, bool]]  # (class name, difficult)


def _voc_xml(image_id: str, objects: VocObjects) -> str:
    parts = [
        "<annotation>",
        "  <folder>VOC2007</folder>",
        f"  <filename>{image_id}.jpg</filename>",
        "  <source><database>The VOC2007 Database</database></source>",
        "  <size><width>40</width><height>40</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for name, difficult in objects:
        parts += [
            "  <object>",
            f"    <name>{name}</name>",
            "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>",
            f"    <difficult>{int(difficult)}</difficult>",
            "    <bndbox><xmin>2</xmin><ymin>3</ymin><xmax>30</xmax><ymax>35</ymax></bndbox>",
            "  </object>",
        ]
    return "\n".join(parts + ["</annotation>", ""])


def make_voc_tree(root: Path, splits: Mapping[str, Mapping[str, VocObjects]]) -> Path:
    """``root/VOCdevkit/VOC2007`` with Annotations, JPEGImages and ImageSets/Main/<split>.txt.

    ``splits`` maps "trainval"/"test" to {image id: objects}; returns the VOC2007 folder.
    """
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for split, images in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
        for image_id, objects in images.items():
            (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, objects))
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(photo_jpeg(n))
            n += 1
    return voc


# ------------------------------------------------------------------------------------------ COCO


def make_coco_tree(
    root: Path,
    categories: Sequence[tuple[int, str]],
    splits: Mapping[str, Sequence[tuple[int, Sequence[int]]]],
) -> Path:
    """``root/annotations/instances_<name>.json`` plus ``root/<name>/COCO_<name>_<id:012d>.jpg``.

    ``splits`` maps "train2014"/"val2014" to [(image id, [category id per annotation])]; the
    categories are written in the order given (the converter must sort them by id).
    """
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name, images in splits.items():
        (root / name).mkdir(exist_ok=True)
        doc = {"info": {"description": "test"}, "images": [], "annotations": [],
               "categories": [{"supercategory": "x", "id": cid, "name": cname} for cid, cname in categories]}
        for image_id, category_ids in images:
            file_name = f"COCO_{name}_{image_id:012d}.jpg"
            (root / name / file_name).write_bytes(photo_jpeg(image_id))
            doc["images"].append({"id": image_id, "file_name": file_name, "width": 40, "height": 40})
            for cid in category_ids:
                doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                           "category_id": cid, "iscrowd": 0, "bbox": [1, 2, 10, 12],
                                           "area": 120.0, "segmentation": [[1, 2, 11, 2, 11, 14]]})
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(doc))
    return root


# -------------------------------------------------------------------------------------- NUS-WIDE


def make_nuswide_tree(
    root: Path, concepts: Sequence[str], splits: Mapping[str, Sequence[tuple[str, Sequence[str]]]]
) -> Path:
    """Official layout: Concepts81.txt, ImageList/{Train,Test}Imagelist.txt (Windows separators),
    Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt and images under Flickr/.

    ``splits`` maps "Train"/"Test" to [(relative path "dir/file.jpg", [concepts])].
    """
    (root / "ImageList").mkdir(parents=True, exist_ok=True)
    labels_dir = root / "Groundtruth" / "TrainTestLabels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    (root / "Concepts81.txt").write_text("".join(f"{c}\r\n" for c in concepts))
    n = 0
    for tag, images in splits.items():
        lines = "".join(rel.replace("/", "\\") + "\r\n" for rel, _ in images)
        (root / "ImageList" / f"{tag}Imagelist.txt").write_text(lines)
        for concept in concepts:
            flags = "".join(f"{int(concept in labels)}\n" for _, labels in images)
            (labels_dir / f"Labels_{concept}_{tag}.txt").write_text(flags)
        for rel, _ in images:
            (root / "Flickr" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "Flickr" / rel).write_bytes(photo_jpeg(n))
            n += 1
    return root


# --------------------------------------------------------------------------------------- generic


def write_generic_csv(path: Path, rows: Sequence[tuple[str, str]], photos: bool = True) -> Path:
    """A CSV with header ``path,labels``; writes a photo at each path (relative to the CSV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    if photos:
        for n, (rel, _) in enumerate(rows):
            (path.parent / rel).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / rel).write_bytes(photo_jpeg(n))
    return path


def write_generic_jsonl(path: Path, records: Sequence[dict], photos: bool = True) -> Path:
    """A JSON-lines list; writes a photo at each path (relative to the list)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if photos:
        for n, record in enumerate(records):
            (path.parent / record["path"]).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / record["path"]).write_bytes(photo_jpeg(n + 3))
    return path


# --------------------------------------------------------------------------------- Fashion-MNIST


def _idx(data: np.ndarray) -> bytes:
    """The idx format: magic 0x000008<ndim>, big-endian dims, uint8 values."""
    header = (0x0800 + data.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in data.shape)
    return header + data.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(folder: Path, train_value: int = 255, test_value: int = 0, per_class: int = 3) -> Path:
    """The four Fashion-MNIST idx.gz files with flat 28x28 items: every train item has intensity
    ``train_value`` and every t10k item ``test_value``, so a mosaic shows which file it drew from."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    for prefix, value in (("train", train_value), ("t10k", test_value)):
        images = np.full((len(labels), 28, 28), value, np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images), mtime=0))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels), mtime=0))
    return folder


def rows(out: Path, split: str) -> list[dict]:
    """A converted split's rows, read back from its parquet shards."""
    return [r for path in shard_paths(out, split) for r in pq.read_table(path).to_pylist()]


def rejects(out: Path) -> list[dict]:
    """The records of ``rejects.jsonl``: what a converter skipped, and why."""
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
