"""OpenImages (V5/V6) image-level labels as a dataset (SPEC section 4, issue #28).

OpenImages labels are partial: each image lists a few human-verified labels, positive
(``Confidence`` 1) or negative (0); every other label of the vocabulary is *unknown* for that
image. Here positives go to ``labels``, verified negatives to neither (a plain negative), and every
label not listed to ``ignore``, so the ASL loss and the metrics leave it out. A label verified both
ways for one image (two sources disagreeing) counts as unknown.

Files read (the names OpenImages ships them under)::

    <annotations>/oidv6-train-annotations-human-imagelabels.csv   # ImageID,Source,LabelName,Confidence
    <annotations>/validation-annotations-human-imagelabels.csv
    <annotations>/test-annotations-human-imagelabels.csv
    <annotations>/oidv6-class-descriptions.csv                     # LabelName,DisplayName (V5's
                                                                   # class-descriptions.csv: no header)
    <images>/<subset>/<ImageID>.jpg

The labels CSVs are streamed (train is about 2 GB) one image at a time, which needs them grouped by
image: they ship sorted by ImageID, and a file that is not is refused with the line that breaks
the order. Rows keep the file's order. An image verified negative for every class of the
vocabulary has nothing in ``labels`` or ``ignore``: write_dataset rejects it (empty label set).
"""

from __future__ import annotations

import csv
import itertools
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.prepare import MALFORMED, UNKNOWN_LABEL, Example, PrepareResult, write_dataset
from salgl.errors import BadValue, NotFound

PathLike = str | os.PathLike[str]

SUBSETS = ("train", "validation", "test")
LABEL_FILES: dict[str, tuple[str, ...]] = {  # V6 name first, then V5's
    "train": ("oidv6-train-annotations-human-imagelabels.csv", "train-annotations-human-imagelabels.csv"),
    "validation": ("validation-annotations-human-imagelabels.csv",),
    "test": ("test-annotations-human-imagelabels.csv",),
}
CLASS_FILES = ("oidv6-class-descriptions.csv", "class-descriptions.csv")
ANNOTATION_FOLDERS = (".", "annotations", "labels", "metadata")
# The field reports OpenImages on its test subset; validation can stand in (splits={"test": "validation"}).
DEFAULT_SPLITS: Mapping[str, str] = {"train": "train", "test": "test"}
NO_LABEL = "no verified label in the vocabulary"  # dropped: nothing known about the image


@dataclass(frozen=True)
class Vocabulary:
    """The labels kept, in index order: their MIDs and their (unique) display names."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    restricted: bool = False  # a trainable list chose the MIDs: any other MID is skipped, not unknown
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {mid: i for i, mid in enumerate(self.mids)})


def find_annotation(folders: Sequence[Path], names: Sequence[str]) -> Path:
    """The first of ``names`` found in ``folders`` (each name in every folder before the next name)."""
    for name in names:
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
    raise NotFound(f"{' or '.join(names)} not found in {', '.join(map(str, folders))}")


def read_class_descriptions(path: PathLike) -> dict[str, str]:
    """MID -> display name, in file order, from ``LabelName,DisplayName`` (V6, with that header) or
    the same two columns without a header (V5). An empty display name falls back to the MID."""
    descriptions: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or (line == 1 and [c.strip() for c in row[:2]] == ["LabelName", "DisplayName"]):
                continue
            if len(row) < 2:
                raise BadValue(f"{path}:{line}: expected LabelName,DisplayName, got {','.join(row)!r}")
            mid, name = row[0].strip(), row[1].strip()
            if mid in descriptions:
                raise BadValue(f"{path}:{line}: class {mid} described twice")
            descriptions[mid] = name or mid
    if not descriptions:
        raise BadValue(f"{path}: no classes")
    return descriptions


def read_trainable(path: PathLike) -> list[str]:
    """The MIDs of a trainable-classes file (``oidv6-classes-trainable.txt``: one a line), in order."""
    with open(path, encoding="utf-8-sig") as f:
        mids = [line.strip() for line in f if line.strip()]
    repeated = sorted(m for m, n in Counter(mids).items() if n > 1)
    if repeated:
        raise BadValue(f"{path}: repeated class(es) {', '.join(repeated[:5])}")
    if not mids:
        raise BadValue(f"{path}: no classes")
    return mids


def build_vocabulary(descriptions: Mapping[str, str], trainable: Sequence[str] | None = None) -> Vocabulary:
    """The trainable MIDs in their list's order (else every described class in file order), named by
    display name; a name shared by several kept MIDs (OpenImages has such pairs) becomes ``"Name (MID)"``
    for each of them, so names stay unique and still read as the class."""
    mids = list(trainable) if trainable is not None else list(descriptions)
    undescribed = [m for m in mids if m not in descriptions]
    if undescribed:
        raise BadValue(f"{len(undescribed)} trainable class(es) without a description, e.g. "
                       f"{', '.join(undescribed[:5])}: give the class-descriptions file of the same release")
    counts = Counter(descriptions[m] for m in mids)
    names = [descriptions[m] if counts[descriptions[m]] == 1 else f"{descriptions[m]} ({m})" for m in mids]
    if len(set(names)) != len(names):  # "Name (MID)" equal to another class's own name: not in any release
        raise BadValue("class names still repeat after adding the MID to repeated display names")
    return Vocabulary(tuple(mids), tuple(names), restricted=trainable is not None)


def _label_rows(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """(line, ImageID, LabelName, Confidence) of a labels CSV, streamed, ImageIDs non-decreasing."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in ("ImageID", "LabelName", "Confidence") if c not in header]
        if missing:
            raise BadValue(f"{path}: the header must name ImageID, LabelName and Confidence "
                           f"(found {', '.join(header) or 'none'})")
        cols = [header.index(c) for c in ("ImageID", "LabelName", "Confidence")]
        width, previous = max(cols) + 1, ""
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < width:
                raise BadValue(f"{path}:{line}: {len(row)} field(s), expected {len(header)} (a truncated file?)")
            image_id, mid, confidence = (row[c].strip() for c in cols)
            if image_id < previous:
                raise BadValue(f"{path}:{line}: ImageID {image_id} after {previous}: the rows must be sorted by "
                               "ImageID, as OpenImages ships them (sort the file, header kept, then retry)")
            previous = image_id
            yield line, image_id, mid, confidence


def _verdict(confidence: str) -> bool | None:
    """True for a verified positive (1), False for a verified negative (0), None for anything else."""
    try:
        value = float(confidence)
    except ValueError:
        return None
    return {1.0: True, 0.0: False}.get(value)


def _example(image_id: str, rows: Sequence[tuple[str, str]], vocab: Vocabulary, names: np.ndarray,
             image_dir: Path) -> Example:
    """One image's Example from its (LabelName, Confidence) rows: positives in ``labels``, verified
    negatives in neither, everything else (unlisted, or verified both ways) in ``ignore``."""
    path = str(image_dir / f"{image_id}.jpg")
    positive, negative, unknown, malformed = set(), set(), set(), []
    for mid, confidence in rows:
        i = vocab.index.get(mid)
        verdict = _verdict(confidence)
        if i is None:
            if not vocab.restricted:
                unknown.add(mid)
        elif verdict is None:
            malformed.append(f"confidence {confidence!r} for {mid}")
        else:
            (positive if verdict else negative).add(i)
    if unknown:
        return Example(id=image_id, path=path, error=f"{UNKNOWN_LABEL}: " + ", ".join(sorted(unknown)))
    if malformed:
        return Example(id=image_id, path=path, error=f"{MALFORMED}: {'; '.join(malformed)} (expected 1 or 0)")
    disputed = positive & negative
    positive, negative = positive - disputed, negative - disputed
    if not positive and not negative:
        return Example(id=image_id, path=path, dropped=NO_LABEL)
    unlisted = np.ones(len(names), dtype=bool)
    unlisted[list(positive | negative)] = False
    return Example(id=image_id, path=path, labels=[names[i] for i in sorted(positive)],
                   ignore=names[unlisted].tolist())


def _examples(labels_csv: Path, vocab: Vocabulary, image_dir: Path) -> Iterator[Example]:
    """The Examples of one subset, one per ImageID, in file order."""
    names = np.array(vocab.names, dtype=object)
    for image_id, rows in itertools.groupby(_label_rows(labels_csv), key=lambda r: r[1]):
        yield _example(image_id, [(mid, confidence) for _, _, mid, confidence in rows], vocab, names, image_dir)


def _check_splits(splits: Mapping[str, str]) -> None:
    if not splits:
        raise BadValue("give at least one split, e.g. {'train': 'train'}")
    wrong = {s: subset for s, subset in splits.items() if subset not in SUBSETS}
    if wrong:
        raise BadValue(f"OpenImages subset(s) {wrong}: expected one of {', '.join(SUBSETS)}")


def convert_openimages(
    root: PathLike,
    out: PathLike,
    *,
    classes: PathLike | None = None,
    trainable: PathLike | None = None,
    images: PathLike | None = None,
    annotations: PathLike | None = None,
    splits: Mapping[str, str] = DEFAULT_SPLITS,
    **options: Any,
) -> PrepareResult:
    """OpenImages V6 (or V5) image-level human-verified labels: ``train`` = the train subset,
    ``test`` = the test subset (``splits`` maps our split names to subsets; e.g.
    ``{"train": "train", "test": "validation"}``).

    The labels CSVs and class descriptions are looked for in ``annotations`` (default: ``root``,
    ``root/annotations``, ``root/labels``, ``root/metadata``); ``classes`` names the descriptions
    file explicitly. Images are ``<images>/<subset>/<ImageID>.jpg`` (``images`` defaults to ``root``).
    ``trainable``: a classes file (one MID a line, e.g. ``oidv6-classes-trainable.txt``) giving the
    vocabulary and its order; MIDs outside it are skipped. Without it, every described class, in
    file order, and a MID without a description rejects its image (unknown label). Vocabulary names
    are display names (``"Name (MID)"`` where two kept classes share one); the MIDs, index for
    index, are in the manifest's ``source.label_mids``. An image with no verified label left in
    the vocabulary is dropped (counted under ``dropped``); one missing on disk is a reject.
    ``options`` are :func:`~pipeline.prepare.write_dataset`'s keyword arguments.
    """
    _check_splits(splits)
    root = Path(root)
    images = Path(images) if images is not None else root
    folders = [Path(annotations)] if annotations is not None else [root / f for f in ANNOTATION_FOLDERS]
    classes = Path(classes) if classes is not None else find_annotation(folders, CLASS_FILES)
    vocab = build_vocabulary(read_class_descriptions(classes),
                             read_trainable(trainable) if trainable is not None else None)
    files = {split: find_annotation(folders, LABEL_FILES[subset]) for split, subset in splits.items()}
    examples = {split: _examples(files[split], vocab, images / subset) for split, subset in splits.items()}
    return write_dataset(
        out, examples, vocabulary=vocab.names,
        inputs=[root, images, classes, *files.values(), *([trainable] if trainable is not None else [])],
        source={"converter": "openimages", "parameters": {
            "root": str(root), "images": str(images), "splits": dict(splits), "classes": str(classes),
            "trainable": str(trainable) if trainable is not None else None,
            "labels": {split: str(path) for split, path in files.items()}},
            "label_mids": list(vocab.mids)},
        description=(
            "OpenImages image-level human-verified labels ("
            + ", ".join(f"{split}: {subset}" for split, subset in splits.items())
            + f"), {len(vocab.names)} classes in {'trainable list' if trainable else 'class-descriptions'} order. "
            "Confidence 1 is a positive (`labels`), 0 a verified negative; every label not listed for an image is "
            "unknown and in `ignore` (excluded from the loss and from AP). Names are display names, MIDs in "
            "source.label_mids. Images are the original JPEG bytes."
        ),
        **options,
    )
