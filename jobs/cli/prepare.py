"""``salgl prepare SOURCE ... --out DIR``: convert a dataset into parquet shards plus a manifest.

Thin by design: parse, call the converter in ``pipeline`` (imported only when the command runs,
so ``salgl --help`` stays fast), print the summary. Failures are ``salgl.errors``, reported by
``jobs.cli.main``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SOURCES = ("voc2007", "coco2014", "nuswide", "openimages", "generic", "mosaic")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="dataset folder to create, or an object-store prefix (s3://bucket/data/NAME, gs://, abfs://)")
    parser.add_argument("--shard-rows", type=int, default=2048, help="rows per parquet shard (default 2048)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input row; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--workers", type=int, default=None, help="image-checking threads (default min(8, CPUs))")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-side", type=int, default=None, metavar="PX",
                        help="downsize images whose longer side is larger (aspect kept, re-encoded in their format); "
                             "huge images are then not decoded in full every epoch")


def _split_file(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {value!r}")
    return name, Path(path)


def _add_sources(sources: Any) -> None:
    voc = sources.add_parser("voc2007", help="Pascal VOC 2007 (XML + ImageSets trainval/test)")
    voc.add_argument("roots", nargs="+", type=Path, metavar="ROOT",
                     help="VOCdevkit/VOC2007 folder(s) of the trainval and test archives")
    coco = sources.add_parser("coco2014", help="MS-COCO 2014 (instances JSON, train2014 / val2014 as test)")
    coco.add_argument("root", type=Path, metavar="ROOT", help="folder with annotations/, train2014/, val2014/")
    nus = sources.add_parser("nuswide", help="NUS-WIDE (official lists, 81 concepts)")
    nus.add_argument("root", type=Path, metavar="ROOT", help="folder with ImageList/, Groundtruth/, Concepts81.txt")
    nus.add_argument("--images", type=Path, default=None, help="image folder (default ROOT/Flickr)")
    oi = sources.add_parser("openimages", help="OpenImages V6/V5 human-verified image-level labels (unlisted: ignored)")
    oi.add_argument("root", type=Path, metavar="ROOT",
                    help="folder with the labels CSVs and the train/, validation/, test/ folders of <ImageID>.jpg")
    oi.add_argument("--classes", type=Path, default=None, metavar="FILE",
                    help="class descriptions CSV (default: oidv6-class-descriptions.csv or V5's "
                         "class-descriptions.csv beside the labels CSVs)")
    oi.add_argument("--trainable", type=Path, default=None, metavar="FILE",
                    help="the classes to keep, one MID a line (oidv6-classes-trainable.txt); "
                         "default every described class")
    oi.add_argument("--test-from", choices=("test", "validation"), default="test",
                    help="the OpenImages subset written as the test split (default test)")
    oi.add_argument("--images", type=Path, default=None, metavar="DIR",
                    help="folder of the subset image folders (default ROOT)")
    oi.add_argument("--annotations", type=Path, default=None, metavar="DIR",
                    help="folder of the CSVs (default: ROOT, ROOT/annotations, ROOT/labels or ROOT/metadata)")
    gen = sources.add_parser("generic", help="your own images: CSV (path,labels) or JSON lines per split")
    gen.add_argument("--train", type=Path, help="list file of the train split")
    gen.add_argument("--test", type=Path, help="list file of the test split")
    gen.add_argument("--split", type=_split_file, action="append", default=[], metavar="NAME=FILE",
                     help="list file of another split (repeatable)")
    gen.add_argument("--vocab", type=Path, default=None, help="label names, one a line (default: inferred, sorted)")
    gen.add_argument("--label-sep", choices=("auto", "|", ";", ",", "space"), default="auto",
                     help="what separates a CSV row's label names (default auto: | or ;, refusing names "
                          "that hold a comma or a space)")
    gen.add_argument("--allow-outside-root", action="store_true",
                     help="take rows whose path resolves outside the image root (../x.jpg, absolute paths)")
    gen.add_argument("--image-root", type=Path, default=None,
                     help="base of relative paths (default: the list's folder)")
    mosaic = sources.add_parser("mosaic", help="built-in scene mosaics of real Fashion-MNIST items (offline)")
    mosaic.add_argument("--fashion-mnist", type=Path, default=None,
                        help="folder of the four idx files (default /usr/share/datasets/fashion-mnist)")
    mosaic.add_argument("--scenes", type=int, default=4)
    mosaic.add_argument("--classes-per-scene", type=int, default=4)
    mosaic.add_argument("--items", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"), help="items per image")
    mosaic.add_argument("--canvas", type=int, default=96, help="image side in pixels")
    mosaic.add_argument("--scale", type=float, nargs=2, default=(0.3, 0.5), metavar=("MIN", "MAX"),
                        help="item side as a fraction of the canvas")
    mosaic.add_argument("--in-scene", type=float, default=0.9, help="probability an item comes from the scene")
    mosaic.add_argument("--train", type=int, default=4000, help="train images")
    mosaic.add_argument("--test", type=int, default=1000, help="test images")
    mosaic.add_argument("--seed", type=int, default=0)
    mosaic.add_argument("--format", choices=("png", "jpeg"), default="png", help="image encoding")
    mosaic.add_argument("--scene-cue", choices=("none", "tint"), default="none",
                        help="none (default): the scene shows only in which items co-occur; "
                             "tint: each scene also tints the background, a colour cue that gives it away")
    mosaic.add_argument("--design", choices=("classes", "context"), default="classes",
                        help="classes (default): a scene favours some classes; context: one item per image is "
                             "degraded and only the scene (2^slots of them: --scenes 2, 4, 8 or 16) read from the "
                             "other items tells which of the --ambiguous pair it is (column `degraded`)")
    mosaic.add_argument("--degrade-px", type=int, default=2, metavar="PX",
                        help="context design: side the degraded item is down-sampled to (default 2; 1: a flat patch)")
    mosaic.add_argument("--ambiguous", nargs=2, default=("Pullover", "Coat"), metavar=("CLASS", "CLASS"),
                        help="context design: the confusable pair the degraded item belongs to (Fashion-MNIST class "
                             "names; default Pullover Coat)")
    for parser in (voc, coco, nus, oi, gen, mosaic):
        _common(parser)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare", help="convert a dataset into parquet shards + manifest",
        description="Convert a dataset into parquet shards plus manifest.json (SPEC section 4).",
    )
    _add_sources(parser.add_subparsers(dest="source", metavar="SOURCE", required=True))
    parser.set_defaults(func=run)


def _convert(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    from pipeline import sources

    if args.source == "voc2007":
        return sources.convert_voc2007(args.roots, args.out, **options)
    if args.source == "coco2014":
        return sources.convert_coco2014(args.root, args.out, **options)
    if args.source == "nuswide":
        return sources.convert_nuswide(args.root, args.out, images=args.images, **options)
    if args.source == "openimages":
        from pipeline.openimages import convert_openimages

        return convert_openimages(args.root, args.out, classes=args.classes, trainable=args.trainable,
                                  images=args.images, annotations=args.annotations,
                                  splits={"train": "train", "test": args.test_from}, **options)
    if args.source == "generic":
        lists = {name: path for name, path in (("train", args.train), ("test", args.test)) if path}
        lists.update(args.split)
        return sources.convert_generic(lists, args.out, vocabulary=args.vocab, image_root=args.image_root,
                                       label_separator=args.label_sep, allow_outside_root=args.allow_outside_root,
                                       **options)
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    config = MosaicConfig(
        scenes=args.scenes, classes_per_scene=args.classes_per_scene, min_items=args.items[0],
        max_items=args.items[1], canvas=args.canvas, min_scale=args.scale[0], max_scale=args.scale[1],
        in_scene=args.in_scene, train=args.train, test=args.test, seed=args.seed, image_format=args.format,
        scene_cue=args.scene_cue, design=args.design, degrade_px=args.degrade_px,
        ambiguous=tuple(_class_index(name) for name in args.ambiguous),
    )
    return convert_mosaic(args.out, config, fashion_mnist=args.fashion_mnist, **options)


def _class_index(name: str) -> int:
    from pipeline.mosaic import FASHION_MNIST_CLASSES
    from salgl.errors import BadValue

    if name not in FASHION_MNIST_CLASSES:
        raise BadValue(f"--ambiguous: unknown class {name!r}; one of {', '.join(FASHION_MNIST_CLASSES)}")
    return FASHION_MNIST_CLASSES.index(name)


def run(args: argparse.Namespace) -> int:
    options = dict(shard_rows=args.shard_rows, strict=args.strict, overwrite=args.overwrite, max_side=args.max_side,
                   workers=args.workers, progress=not args.no_progress)
    result = _convert(args, options)  # a missing or bad input raises a salgl.errors one-liner
    print(result.summary())
    return 0
