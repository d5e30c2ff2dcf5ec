"""The OpenImages converter on a small file set in the real V5/V6 formats (pipeline/openimages.py),
and the ignore mask honoured by the ASL loss and the metrics at a few thousand labels (issue #28)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pipeline.openimages import NO_LABEL, build_vocabulary, convert_openimages
from pipeline.shards import read_label_matrices, read_manifest, verify_shards
from salgl.config import LossConfig
from salgl.errors import BadValue, NotFound
from salgl.losses import asymmetric_loss
from salgl.metrics import average_precision, multilabel_metrics
from tests._data_trees import photo_jpeg, rejects, rows

# --------------------------------------------------------------------------- the synthetic file set

CLASSES = [  # (MID, DisplayName), the descriptions file's order
    ("/m/0bt9lr", "Dog"), ("/m/01yrx", "Cat"), ("/m/01h44", "Bat"), ("/m/0gjbg72", "Bat"),
    ("/m/07j7r", "Tree"), ("/m/0k4j", "Car"),
]
TRAINABLE = ["/m/01yrx", "/m/0bt9lr", "/m/01h44", "/m/0gjbg72", "/m/07j7r"]  # no Car; not file order
VOCAB = ["Cat", "Dog", "Bat (/m/01h44)", "Bat (/m/0gjbg72)", "Tree"]
CAT, DOG, BAT_ANIMAL, BAT_SPORT, TREE = range(5)

Rows = Sequence[tuple[str, str, str]]  # (ImageID, LabelName, Confidence)
TRAIN: Rows = [
    ("000002b66c9c498e", "/m/01yrx", "1"), ("000002b66c9c498e", "/m/0bt9lr", "0"),
    ("000002b97e5471a0", "/m/01h44", "1"), ("000002b97e5471a0", "/m/0gjbg72", "1"),
    ("000002b97e5471a0", "/m/0k4j", "1"),  # Car: not trainable, skipped
    ("000002c707c9895e", "/m/0k4j", "1"),  # only Car: dropped
    ("000003d8ad1b1b33", "/m/07j7r", "0"),  # only a verified negative: kept, no positive
    ("0000048549557964", "/m/01yrx", "1"),  # no image on disk: rejected
    ("00000b4dcff7f799", "/m/0bt9lr", "1"), ("00000b4dcff7f799", "/m/0bt9lr", "0"),  # disputed: unknown
    ("00000b4dcff7f799", "/m/01yrx", "0"),
]
TEST: Rows = [
    ("000026e7ee790996", "/m/01yrx", "1"), ("000026e7ee790996", "/m/07j7r", "1"),
    ("000062a39995e348", "/m/0bt9lr", "1"), ("000062a39995e348", "/m/01yrx", "0"),
    ("0000c64e1253d68f", "/m/07j7r", "0.8"),  # not a human verdict: rejected
]
VALIDATION: Rows = [("0001eeaf4aed83f9", "/m/0gjbg72", "1")]
MISSING = {"0000048549557964"}


def _write_labels(path: Path, rows: Rows, images: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "Source", "LabelName", "Confidence"])
        for n, (image_id, mid, confidence) in enumerate(rows):
            writer.writerow([image_id, "verification" if n % 2 else "crowdsource-verification", mid, confidence])
    images.mkdir(parents=True, exist_ok=True)
    for n, image_id in enumerate(sorted({r[0] for r in rows} - MISSING)):
        (images / f"{image_id}.jpg").write_bytes(photo_jpeg(n, size=24))


def _write_descriptions(path: Path, classes: Sequence[tuple[str, str]], header: bool = True) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["LabelName", "DisplayName"])
        writer.writerows(classes)
    return path


def make_openimages_tree(root: Path, subsets: Mapping[str, Rows] | None = None) -> Path:
    """V6 layout: the CSVs at the root, images under <root>/<subset>/<ImageID>.jpg."""
    subsets = subsets if subsets is not None else {"train": TRAIN, "test": TEST, "validation": VALIDATION}
    names = {"train": "oidv6-train-annotations-human-imagelabels.csv",
             "validation": "validation-annotations-human-imagelabels.csv",
             "test": "test-annotations-human-imagelabels.csv"}
    for subset, labels in subsets.items():
        _write_labels(root / names[subset], labels, root / subset)
    _write_descriptions(root / "oidv6-class-descriptions.csv", CLASSES)
    (root / "oidv6-classes-trainable.txt").write_text("\n".join(TRAINABLE) + "\n")
    return root


@pytest.fixture(scope="module")
def oi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openimages_tree(tmp_path_factory.mktemp("openimages"))


def _everything_but(*known: int) -> list[int]:
    return [i for i in range(len(VOCAB)) if i not in known]


# --------------------------------------------------------------------------------- the converter


def test_openimages_labels_ignore_mask_vocabulary_and_rejects(oi_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "oi"
    result = convert_openimages(oi_root, out, trainable=oi_root / "oidv6-classes-trainable.txt", progress=False)
    manifest = read_manifest(out)
    assert manifest["vocabulary"] == VOCAB  # trainable order; the shared name "Bat" carries its MID
    assert manifest["source"]["label_mids"] == TRAINABLE and manifest["source"]["converter"] == "openimages"
    train, test = rows(out, "train"), rows(out, "test")
    assert [r["id"] for r in train] == ["000002b66c9c498e", "000002b97e5471a0", "000003d8ad1b1b33",
                                        "00000b4dcff7f799"]
    assert [(r["labels"], r["ignore"]) for r in train] == [
        ([CAT], _everything_but(CAT, DOG)),  # Dog verified absent: a plain negative
        ([BAT_ANIMAL, BAT_SPORT], [CAT, DOG, TREE]),  # Car skipped: outside the trainable list
        ([], _everything_but(TREE)),
        ([], _everything_but(CAT)),  # Dog both 1 and 0: unknown
    ]
    assert [(r["labels"], r["ignore"]) for r in test] == [([CAT, TREE], _everything_but(CAT, TREE)),
                                                         ([DOG], _everything_but(DOG, CAT))]
    assert train[0]["image"] == (oi_root / "train" / "000002b66c9c498e.jpg").read_bytes()
    labels, ignore = read_label_matrices(out, "test")
    assert labels.shape == ignore.shape == (2, 5) and not (labels & ignore).any()
    assert manifest["dropped"] == {"train": {NO_LABEL: 1}, "test": {}}
    assert manifest["label_frequencies"]["train"] == [1, 0, 1, 1, 0]
    assert {(r["split"], r["id"], r["reason"].split(":")[0]) for r in rejects(out)} == {
        ("train", "0000048549557964", "missing file"), ("test", "0000c64e1253d68f", "malformed record")}
    assert "'0.8' for /m/07j7r" in rejects(out)[1]["reason"] and result.stats["train"].rows == 4
    verify_shards(out, tmp_path / "verified.json")


def test_openimages_mask_feeds_map_over_classes_with_positives(oi_root: Path, tmp_path: Path) -> None:
    convert_openimages(oi_root, tmp_path / "oi", trainable=oi_root / "oidv6-classes-trainable.txt", progress=False)
    labels, ignore = read_label_matrices(tmp_path / "oi", "train")
    scores = np.random.default_rng(0).random(labels.shape)
    m = multilabel_metrics(scores, labels, ignore)
    assert m["classes_without_positives"] == 2  # Dog and Tree: only negatives or unknowns in train
    assert m["ap"][DOG] is None and m["ap"][TREE] is None
    assert m["mAP"] == pytest.approx(np.mean([a for a in m["ap"] if a is not None]))


def test_openimages_v5_headerless_descriptions_and_unknown_mid(tmp_path: Path) -> None:
    root = tmp_path / "v5"
    train = [("00000000000000aa", "/m/01yrx", "1"), ("00000000000000bb", "/m/0unknown", "1"),
             ("00000000000000bb", "/m/0bt9lr", "0")]
    _write_labels(root / "annotations" / "train-annotations-human-imagelabels.csv", train, root / "train")
    v5 = [*CLASSES[:2], ("/m/0hat", "Hat, hard")]  # a display name with a comma, quoted
    _write_descriptions(root / "annotations" / "class-descriptions.csv", v5, header=False)
    convert_openimages(root, tmp_path / "out", splits={"train": "train"}, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["vocabulary"] == ["Dog", "Cat", "Hat, hard"]  # every described class, file order
    assert [(r["labels"], r["ignore"]) for r in rows(tmp_path / "out", "train")] == [([1], [0, 2])]
    assert rejects(tmp_path / "out")[0]["reason"] == "unknown label: /m/0unknown"


def test_openimages_validation_as_test(oi_root: Path, tmp_path: Path) -> None:
    convert_openimages(oi_root, tmp_path / "oi", splits={"test": "validation"}, progress=False)
    manifest = read_manifest(tmp_path / "oi")
    assert list(manifest["splits"]) == ["test"] and len(manifest["vocabulary"]) == len(CLASSES)
    (row,) = rows(tmp_path / "oi", "test")
    assert row["id"] == "0001eeaf4aed83f9"
    assert row["image"] == (oi_root / "validation" / f"{row['id']}.jpg").read_bytes()
    assert manifest["vocabulary"][row["labels"][0]] == "Bat (/m/0gjbg72)"  # no trainable list: Car kept


def test_openimages_refuses_bad_inputs_and_leaves_nothing(oi_root: Path, tmp_path: Path) -> None:
    root = make_openimages_tree(tmp_path / "unsorted", {"train": [TRAIN[2], TRAIN[0]]})
    with pytest.raises(BadValue, match="sorted by ImageID"):
        convert_openimages(root, tmp_path / "out", splits={"train": "train"}, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotFound, match="test-annotations-human-imagelabels.csv"):
        convert_openimages(root, tmp_path / "out", progress=False)
    with pytest.raises(BadValue, match="without a description"):
        convert_openimages(oi_root, tmp_path / "out", trainable=_lines(tmp_path / "t.txt", ["/m/0nope"]),
                           progress=False)
    with pytest.raises(BadValue, match="OpenImages subset"):
        convert_openimages(oi_root, tmp_path / "out", splits={"test": "val"}, progress=False)
    (root / "oidv6-train-annotations-human-imagelabels.csv").write_text("ImageID,Label\nx,/m/01yrx\n")
    with pytest.raises(BadValue, match="header must name"):
        convert_openimages(root, tmp_path / "out", splits={"train": "train"}, progress=False)


def _lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_vocabulary_disambiguates_only_shared_names() -> None:
    descriptions = {"/m/a": "Bat", "/m/b": "Bat", "/m/c": "Ball"}
    assert build_vocabulary(descriptions).names == ("Bat (/m/a)", "Bat (/m/b)", "Ball")
    assert build_vocabulary(descriptions, ["/m/b", "/m/c"]).names == ("Bat", "Ball")  # unique once /m/a is out


def test_prepare_openimages_cli(oi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    out = tmp_path / "cli"
    args = ["prepare", "openimages", str(oi_root), "--out", str(out), "--no-progress",
            "--trainable", str(oi_root / "oidv6-classes-trainable.txt")]
    assert main(args) == 0
    assert "train: 4 rows in 1 shard(s), 1 rejected (missing file: 1), 1 dropped" in capsys.readouterr().out
    assert read_manifest(out)["vocabulary"] == VOCAB
    assert main([*args, "--overwrite", "--test-from", "validation"]) == 0
    assert read_manifest(out)["splits"]["test"]["rows"] == 1
    assert main(["prepare", "openimages", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "oidv6-class-descriptions.csv" in capsys.readouterr().err


# ------------------------------------------------------------ the ignore mask at a few thousand labels

N_IMAGES, N_LABELS = 48, 3000


@pytest.fixture(scope="module")
def partial_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, targets and an OpenImages-like mask: most labels unknown, a few verified per image."""
    rng = np.random.default_rng(0)
    targets = rng.random((N_IMAGES, N_LABELS)) < 0.05
    ignore = rng.random((N_IMAGES, N_LABELS)) < 0.9
    ignore[:, 0] = targets[:, 0]  # label 0: its positives are all unknown -> no AP, not a 0
    return rng.random((N_IMAGES, N_LABELS)), targets, ignore


def _scrambled(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Other scores and targets at the ignored entries only."""
    rng = np.random.default_rng(1)
    return (np.where(ignore, rng.random(scores.shape), scores),
            np.where(ignore, rng.random(targets.shape) < 0.5, targets))


def test_map_ignores_masked_entries_and_averages_classes_with_positives(partial_labels) -> None:
    scores, targets, ignore = partial_labels
    m = multilabel_metrics(scores, targets, ignore)
    other = multilabel_metrics(*_scrambled(scores, targets, ignore), ignore)
    assert other["mAP"] == m["mAP"] and other["mAP_noninterp"] == m["mAP_noninterp"] and other["ap"] == m["ap"]
    has_pos = (targets & ~ignore).any(axis=0)
    assert not has_pos[0] and m["ap"][0] is None and 100 < has_pos.sum() < N_LABELS
    assert m["classes_without_positives"] == int((~has_pos).sum())
    # Each class as if its ignored images were not there at all.
    alone = np.array([average_precision(scores[~ignore[:, c], c:c + 1], targets[~ignore[:, c], c:c + 1])[0]
                      for c in range(N_LABELS)])
    assert np.array_equal(np.isnan(alone), ~has_pos)
    assert m["mAP"] == pytest.approx(100 * alone[has_pos].mean(), rel=1e-12)
    plain = average_precision(scores, targets, ignore, interpolated=False)
    for c in np.flatnonzero(has_pos)[:40]:  # sklearn on the kept entries: the non-interpolated AP
        keep = ~ignore[:, c]
        assert plain[c] == pytest.approx(average_precision_score(targets[keep, c], scores[keep, c]))


@pytest.mark.parametrize("reduction", ["mean", "released"])
def test_asl_ignores_masked_entries(partial_labels, reduction: str) -> None:
    scores, targets, ignore = partial_labels
    cfg = LossConfig(reduction=reduction)
    mask = torch.from_numpy(ignore)
    logits = torch.from_numpy(np.log(scores / (1 - scores))).float().requires_grad_()
    loss = asymmetric_loss(logits, torch.from_numpy(targets), cfg, mask)
    loss.backward()
    assert logits.grad is not None and (logits.grad[mask] == 0).all() and (logits.grad[~mask] != 0).any()
    other_scores, other_targets = _scrambled(scores, targets, ignore)
    other = asymmetric_loss(torch.from_numpy(np.log(other_scores / (1 - other_scores))).float(),
                            torch.from_numpy(other_targets), cfg, mask)
    assert other.item() == loss.item()
    kept = asymmetric_loss(logits.detach()[~mask][None], torch.from_numpy(targets)[~mask][None], cfg)
    scale = ignore.size / (~ignore).sum() if reduction == "released" else 1.0  # released divides by B n
    assert loss.item() == pytest.approx(kept.item() / scale, rel=1e-5)
