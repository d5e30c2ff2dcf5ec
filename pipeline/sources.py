"""Converters for the paper's datasets and for a user's own list of images (SPEC section 4).

Each ``convert_*`` function lists its source as :class:`~pipeline.prepare.Example` rows and hands
them to :func:`~pipeline.prepare.write_dataset`. Every converter writes the splits ``train`` and
``test`` (the generic one: the split names it is given), so training code can ask for the same
names whatever the dataset. Image bytes are stored as found on disk, never re-encoded.

Row order is fixed by the source: the order of the official lists (VOC ImageSets, NUS-WIDE
ImageList, the generic file) or ascending image id (COCO, whose JSON order is not meaningful).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import logging
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.prepare import MALFORMED, OUTSIDE_ROOT, UNKNOWN_LABEL, Example, PrepareResult, write_dataset
from pipeline.shards import check_destination
from salgl.errors import BadValue, NotFound

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # alphabetical, the order of the VOC devkit and of every paper's tables


def _non_blank(lines: Iterable[str]) -> Iterator[str]:
    """Stripped, non-empty lines (official lists mix CRLF and trailing blanks)."""
    return (line.strip() for line in lines if line.strip())


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from _non_blank(f)


# --------------------------------------------------------------------------------------- VOC 2007


def _voc_dir(roots: Sequence[PathLike], list_name: str) -> Path:
    """The VOC2007 folder among ``roots`` (or their VOCdevkit/VOC2007) holding the given list.

    The trainval and test archives may be unpacked into one tree or two, so each split looks
    for its own list in every root given.
    """
    for root in map(Path, roots):
        for candidate in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
            if (candidate / "ImageSets" / "Main" / list_name).is_file():
                return candidate
    raise NotFound(
        f"ImageSets/Main/{list_name} not found under {', '.join(map(str, roots))}: "
        "give the VOCdevkit/VOC2007 folder(s) of the trainval and test archives"
    )


def _voc_example(voc: Path, image_id: str) -> Example:
    """Labels: classes with a non-difficult object; ignore: classes whose objects are all difficult."""
    xml_path = voc / "Annotations" / f"{image_id}.xml"
    path = str(voc / "JPEGImages" / f"{image_id}.jpg")
    try:
        objects = ET.parse(xml_path).getroot().findall("object")
    except FileNotFoundError:
        return Example(id=image_id, path=path, error=f"{MALFORMED}: missing annotation {xml_path}")
    except ET.ParseError as exc:
        return Example(id=image_id, path=path, error=f"{MALFORMED}: {xml_path}: {exc}")
    easy, difficult = set(), set()
    for obj in objects:
        name = (obj.findtext("name") or "").strip()
        (difficult if (obj.findtext("difficult") or "0").strip() == "1" else easy).add(name)
    return Example(id=image_id, path=path, labels=sorted(easy), ignore=sorted(difficult - easy))


def convert_voc2007(
    roots: PathLike | Sequence[PathLike], out: PathLike, **options: Any
) -> PrepareResult:
    """Pascal VOC 2007: ``train`` = ImageSets/Main/trainval.txt (5,011), ``test`` = test.txt (4,952).

    The 20 classes in alphabetical order. An image's label set is the classes with at least one
    non-difficult object. A class whose objects in that image are *all* difficult goes in
    ``ignore`` instead, in both splits: at test that is the VOC rule (excluded from AP); at train
    it keeps the label out of the positives, and a trainer may also mask it from the loss with the
    ingest's ignore mask or treat it as negative by not doing so.
    ``options`` are :func:`~pipeline.prepare.write_dataset`'s keyword arguments.
    """
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    splits, totals = {}, {}
    for split, list_name in (("train", "trainval.txt"), ("test", "test.txt")):
        voc = _voc_dir(roots, list_name)
        ids = list(_read_lines(voc / "ImageSets" / "Main" / list_name))  # ~5k short strings
        splits[split] = (_voc_example(voc, i) for i in ids)
        totals[split] = len(ids)
    return write_dataset(
        out, splits, totals=totals, vocabulary=VOC_CLASSES, inputs=roots,
        source={"converter": "voc2007", "parameters": {"roots": [str(r) for r in roots],
                                                       "train": "trainval.txt", "test": "test.txt"}},
        description=(
            "Pascal VOC 2007 classification labels from the detection XML: train = trainval list, "
            "test = test list, 20 classes in alphabetical order. A class present only through "
            "'difficult' objects is in `ignore`, not `labels` (excluded from AP at test). "
            "Images are the original JPEG bytes."
        ),
        **options,
    )


# --------------------------------------------------------------------------------------- COCO 2014


def _coco_split(root: Path, annotations: Path, folder: str) -> tuple[list[Example], list[str]]:
    """Examples of one COCO instances file, in ascending image id, and the category names.

    The JSON (about 450 MB for train2014) is loaded once, then reduced to one small label set per
    image before any image is read; image bytes are streamed later.
    """
    with open(annotations, encoding="utf-8") as f:
        data = json.load(f)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in categories}
    labels: dict[int, set[str]] = defaultdict(set)
    unknown: dict[int, set[int]] = defaultdict(set)
    for ann in data["annotations"]:
        if ann["category_id"] in names:
            labels[ann["image_id"]].add(names[ann["category_id"]])
        else:
            unknown[ann["image_id"]].add(ann["category_id"])
    images = sorted(data["images"], key=lambda im: im["id"])
    del data
    examples = []
    for im in images:
        image_id, path = Path(im["file_name"]).stem, str(root / folder / im["file_name"])
        if im["id"] in unknown:
            error = f"{UNKNOWN_LABEL}: category id(s) {sorted(unknown[im['id']])}"
            examples.append(Example(id=image_id, path=path, error=error))
        elif im["id"] not in labels:
            examples.append(Example(id=image_id, path=path, dropped="no annotations"))
        else:
            examples.append(Example(id=image_id, path=path, labels=sorted(labels[im["id"]])))
    return examples, [c["name"] for c in categories]


def convert_coco2014(root: PathLike, out: PathLike, **options: Any) -> PrepareResult:
    """MS-COCO 2014: ``train`` = train2014 (82,081 annotated), ``test`` = val2014 (40,137).

    ``root`` holds ``annotations/instances_{train,val}2014.json`` (or the JSON files directly) and
    the ``train2014/`` and ``val2014/`` image folders. Labels: the 80 categories in category-id
    order; an image's labels are the categories of all its instance annotations (crowd included).
    Images with no annotation are dropped and counted under ``dropped``, not rejected.
    """
    root = Path(root)
    splits, totals, vocabulary = {}, {}, None
    for split, name in (("train", "train2014"), ("test", "val2014")):
        annotations = _find_file(root, f"instances_{name}.json", ("annotations", "."))
        examples, names = _coco_split(root, annotations, name)
        if vocabulary is not None and names != vocabulary:
            raise BadValue(f"{annotations}: categories differ from the train file's")
        vocabulary, splits[split], totals[split] = names, examples, len(examples)
    return write_dataset(
        out, splits, totals=totals, vocabulary=vocabulary, inputs=[root],
        source={"converter": "coco2014", "parameters": {"root": str(root), "train": "train2014",
                                                        "test": "val2014"}},
        description=(
            "MS-COCO 2014 multi-label classification from the instances annotations: train = "
            "train2014, test = val2014, 80 categories in category-id order; images without any "
            "annotation are dropped (counted under `dropped`). Images are the original JPEG bytes."
        ),
        **options,
    )


def _find_file(root: Path, name: str, folders: Sequence[str]) -> Path:
    for folder in folders:
        if (root / folder / name).is_file():
            return root / folder / name
    raise NotFound(f"{name} not found under {root} (looked in {', '.join(folders)})")


# --------------------------------------------------------------------------------------- NUS-WIDE


def _nuswide_concepts(root: Path) -> list[str]:
    path = _find_file(root, "Concepts81.txt", (".", "ConceptsList", "Groundtruth"))
    concepts = list(_read_lines(path))
    if len(set(concepts)) != len(concepts):
        raise BadValue(f"{path}: repeated concept names")
    return concepts


def _nuswide_examples(root: Path, images: Path, concepts: Sequence[str], split: str) -> Iterator[Example]:
    """Stream one split: the image list and the per-concept 0/1 files, read line by line together."""
    tag = split.capitalize()
    image_list = _find_file(root, f"{tag}Imagelist.txt", ("ImageList", "."))
    label_dir = root / "Groundtruth" / "TrainTestLabels"
    with contextlib.ExitStack() as stack:
        columns = []
        for concept in concepts:
            path = label_dir / f"Labels_{concept}_{tag}.txt"
            if not path.is_file():
                raise NotFound(f"{path} not found (NUS-WIDE Groundtruth/TrainTestLabels)")
            columns.append(_non_blank(stack.enter_context(open(path, encoding="utf-8"))))
        listing = _non_blank(stack.enter_context(open(image_list, encoding="utf-8", errors="replace")))
        # zip(strict=True): a list and label file of different lengths is a broken download, fatal.
        for line, *flags in zip(listing, *columns, strict=True):
            # Official lines look like "actor\0001_2124494179.jpg" (Windows separators).
            rel = line.strip().replace("\\", "/")
            labels = [c for c, flag in zip(concepts, flags) if flag.strip() == "1"]
            dropped = None if labels else "no labels"
            yield Example(id=rel, path=str(images / rel), labels=labels, dropped=dropped)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def convert_nuswide(
    root: PathLike, out: PathLike, *, images: PathLike | None = None, **options: Any
) -> PrepareResult:
    """NUS-WIDE with the official lists: ``train`` (125,449 labelled) and ``test`` (83,898).

    ``root`` holds ``ImageList/{Train,Test}Imagelist.txt``, ``Concepts81.txt`` and
    ``Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt``; the images are under
    ``images`` (default ``root/Flickr``) at the list's relative paths. Labels: the 81 concepts in
    Concepts81.txt order. Images with no positive concept are dropped and counted under
    ``dropped``; listed images missing on disk (common with NUS-WIDE's Flickr URLs) are rejects.
    """
    root = Path(root)
    images = Path(images) if images is not None else root / "Flickr"
    concepts = _nuswide_concepts(root)
    splits = {split: _nuswide_examples(root, images, concepts, split) for split in ("train", "test")}
    totals = {split: _count_lines(_find_file(root, f"{split.capitalize()}Imagelist.txt", ("ImageList", ".")))
              for split in splits}
    return write_dataset(
        out, splits, totals=totals, vocabulary=concepts, inputs=[root, images],
        source={"converter": "nuswide", "parameters": {"root": str(root), "images": str(images)}},
        description=(
            "NUS-WIDE with the official train/test image lists and 81-concept ground truth "
            "(Concepts81.txt order); images without any of the 81 concepts are dropped (counted "
            "under `dropped`). Images are the original Flickr JPEG bytes."
        ),
        **options,
    )


# --------------------------------------------------------------------------------------- generic


# How the names in a CSV labels field are separated: "auto" takes "|" and ";" (and refuses names
# that hold another convention's separator, see check_inferred_names); the others are explicit.
LABEL_SEPARATORS = ("auto", "|", ";", ",", "space")


def _split_names(value: str, separator: str = "auto") -> list[str]:
    if separator == "space":
        return value.split()
    parts = value.replace(";", "|").split("|") if separator == "auto" else value.split(separator)
    return [name.strip() for name in parts if name.strip()]


def check_list_file(listing: Path) -> None:
    """A list file that is there and is a file (a folder or a missing path is a one-line error)."""
    if listing.is_dir():
        raise BadValue(f"{listing} is a folder: give the list file (CSV with path,labels, or JSON lines)")
    if not listing.is_file():
        raise NotFound(f"list file {listing}: no such file")


def _generic_records(listing: Path, separator: str = "auto") -> Iterator[dict[str, Any] | str]:
    """Records of a CSV (header with path,labels[,id][,ignore]) or JSON-lines file, in file order.

    Yields a dict per record, or a string saying why the record is malformed. A UTF-8 byte-order
    mark (Excel's "CSV UTF-8") is accepted; a file that is not UTF-8 is named in the error.
    """
    try:
        yield from _read_generic(listing, separator)
    except UnicodeDecodeError as err:
        raise BadValue(f"{listing}: not UTF-8 text (byte {err.start}: {err.reason}); save the list as UTF-8") from None


def _read_generic(listing: Path, separator: str) -> Iterator[dict[str, Any] | str]:
    if listing.suffix.lower() == ".csv":
        with open(listing, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"path", "labels"} <= set(reader.fieldnames or ()):
                raise BadValue(f"{listing}: the CSV header must name the columns path and labels "
                               f"(found {', '.join(reader.fieldnames or []) or 'none'})")
            for row in reader:
                if not row.get("path"):
                    yield "no path"
                    continue
                yield {"path": row["path"], "labels": _split_names(row.get("labels") or "", separator),
                       "ignore": _split_names(row.get("ignore") or "", separator), "id": row.get("id") or row["path"]}
        return
    with open(listing, encoding="utf-8-sig") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"invalid JSON: {exc}"
                continue
            if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                yield 'expected an object with a "path" string'
            elif not isinstance(record.get("labels", []), list):
                yield '"labels" must be a list of names'
            else:
                yield {"path": record["path"], "labels": [str(n) for n in record.get("labels", [])],
                       "ignore": [str(n) for n in record.get("ignore", [])],
                       "id": str(record.get("id", record["path"]))}


def _generic_examples(
    listing: Path, image_root: Path, separator: str = "auto", allow_outside: bool = False
) -> Iterator[Example]:
    root = image_root.resolve()
    for n, record in enumerate(_generic_records(listing, separator)):
        if isinstance(record, str):
            yield Example(id=f"<record {n}>", error=f"{MALFORMED}: {record}")
            continue
        path = image_root / record["path"]
        if not allow_outside and not path.resolve().is_relative_to(root):  # ../x.jpg, /etc/..., a link out
            yield Example(id=record["id"], path=str(path), error=f"{OUTSIDE_ROOT}: {record['path']} (under {root}; "
                          "--allow-outside-root takes it)")
            continue
        yield Example(id=record["id"], path=str(path), labels=record["labels"], ignore=record["ignore"])


def read_vocabulary(path: PathLike) -> list[str]:
    """A vocabulary file: one label name per line, in label-index order."""
    names = list(_read_lines(Path(path)))
    if len(set(names)) != len(names):
        raise BadValue(f"{path}: repeated label names")
    return names


def infer_vocabulary(lists: Mapping[str, PathLike], separator: str = "auto") -> list[str]:
    """Sorted names of every label used in any of the lists (one streaming pass); logs how many and
    the most frequent, and refuses names that look like several labels (``check_inferred_names``)."""
    counts: Counter[str] = Counter()
    for listing in lists.values():
        for record in _generic_records(Path(listing), separator):
            if isinstance(record, dict):
                counts.update(record["labels"])
                for name in record["ignore"]:  # in the vocabulary, not in the frequencies
                    counts.setdefault(name, 0)
    check_inferred_names(counts, separator)
    common = ", ".join(f"{name} ({n})" for name, n in counts.most_common(8))
    log.info(f"vocabulary inferred from the lists: {len(counts)} labels; most frequent: {common}")
    return sorted(counts)


def check_inferred_names(counts: Mapping[str, int], separator: str) -> None:
    """Refuse inferred names holding another convention's separator (``"cat,dog"``: labels separated
    by commas inside a quoted field; ``"cat dog"``: by spaces), which would otherwise become new
    label names in silence. An explicit ``separator`` says the rest is part of the names."""
    if separator != "auto":
        return
    for mark, option in ((",", "','"), (" ", "space")):
        joined = sorted(name for name in counts if mark in name)
        if joined:
            raise BadValue(
                f"{len(joined)} inferred label name(s) hold {'a comma' if mark == ',' else 'a space'}, e.g. {joined[0]!r}: "
                f"if the labels are separated by it, pass --label-sep {option}; if the names contain it, "
                "give the names with --vocab FILE (one per line)"
            )


def convert_generic(
    lists: Mapping[str, PathLike],
    out: PathLike,
    *,
    vocabulary: PathLike | Sequence[str] | None = None,
    image_root: PathLike | None = None,
    label_separator: str = "auto",
    allow_outside_root: bool = False,
    **options: Any,
) -> PrepareResult:
    """A user's own images: ``lists`` maps split name -> CSV or JSON-lines file.

    CSV: a header with ``path`` and ``labels`` (names separated by ``|`` or ``;``, or by
    ``label_separator``: one of ``LABEL_SEPARATORS``), optional
    ``id`` and ``ignore``. JSON lines: ``{"path": ..., "labels": [...]}``, optional ``id`` and
    ``ignore``. The id defaults to the path as written. Relative paths are taken from
    ``image_root``, else from the list file's folder. ``vocabulary``: a file (one name per line)
    or a list of names, in index order; when omitted, the sorted set of names used in all lists.
    """
    if not lists:
        raise BadValue("give at least one split, e.g. --train FILE")
    if label_separator not in LABEL_SEPARATORS:
        raise BadValue(f"label separator {label_separator!r}: expected one of {', '.join(LABEL_SEPARATORS)}")
    for listing in lists.values():
        check_list_file(Path(listing))
    inputs = [*lists.values(), *([image_root] if image_root else [Path(p).parent for p in lists.values()])]
    check_destination(out, bool(options.get("overwrite")), inputs)  # before reading the lists: refused at once
    if isinstance(vocabulary, (str, os.PathLike)):
        names, vocab_source = read_vocabulary(vocabulary), str(vocabulary)
    elif vocabulary is not None:
        names, vocab_source = list(vocabulary), "given"
    else:
        names, vocab_source = infer_vocabulary(lists, label_separator), "inferred (sorted names used in the lists)"
    splits = {
        split: _generic_examples(Path(listing), Path(image_root) if image_root else Path(listing).parent,
                                 label_separator, allow_outside_root)
        for split, listing in lists.items()
    }
    return write_dataset(
        out, splits, vocabulary=names,
        inputs=inputs,
        source={"converter": "generic", "parameters": {
            "lists": {split: str(p) for split, p in lists.items()}, "vocabulary": vocab_source,
            "image_root": str(image_root) if image_root else None, "label_separator": label_separator}},
        description=(
            "User-supplied images and label names converted from "
            + ", ".join(f"{split}: {Path(p).name}" for split, p in lists.items())
            + ". Images are the original file bytes; labels are as listed, not checked by us."
        ),
        **options,
    )
