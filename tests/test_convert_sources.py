"""Converters on small trees in the real on-disk formats, with real photos (pipeline/sources.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._data_trees import make_coco_tree, make_nuswide_tree, make_voc_tree, rejects, rows
from pipeline.shards import read_manifest, verify_shards
from pipeline.sources import VOC_CLASSES, convert_coco2014, convert_nuswide, convert_voc2007


# ------------------------------------------------------------------------------------------- VOC

VOC_SPLITS = {
    "trainval": {
        "000005": [("chair", False), ("chair", True), ("sofa", True)],
        "000007": [("car", False)],
        "000009": [("horse", False), ("person", False), ("person", True)],
        "000012": [("car", True)],  # only difficult objects: kept, label in ignore
    },
    "test": {
        "000001": [("dog", False), ("person", False)],
        "000004": [("car", True), ("car", True), ("bird", False)],  # car all difficult -> ignore
        "000006": [("pottedplant", True), ("diningtable", False), ("pottedplant", False)],
        "000008": [("chair", True)],
    },
}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"), VOC_SPLITS)


def test_voc2007_labels_difficult_rule_and_manifest(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "voc"
    convert_voc2007(voc_root.parent.parent, out, progress=False)  # the VOCdevkit parent works too
    manifest = read_manifest(out)
    c = {name: i for i, name in enumerate(VOC_CLASSES)}
    assert manifest["vocabulary"] == sorted(VOC_CLASSES) and len(VOC_CLASSES) == 20
    train, test = rows(out, "train"), rows(out, "test")
    assert [r["id"] for r in train] == list(VOC_SPLITS["trainval"])  # ImageSets order
    assert [(r["labels"], r["ignore"]) for r in train] == [
        ([c["chair"]], [c["sofa"]]), ([c["car"]], []), ([c["horse"], c["person"]], []), ([], [c["car"]]),
    ]
    assert [(r["labels"], r["ignore"]) for r in test] == [
        ([c["dog"], c["person"]], []), ([c["bird"]], [c["car"]]), ([c["diningtable"], c["pottedplant"]], []),
        ([], [c["chair"]]),
    ]
    assert train[0]["image"] == (voc_root / "JPEGImages" / "000005.jpg").read_bytes()  # bytes as stored
    assert manifest["splits"]["train"]["rows"] == 4 and manifest["splits"]["test"]["rows"] == 4
    freq = manifest["label_frequencies"]["test"]
    assert freq[c["person"]] == 1 and freq[c["car"]] == 0 and sum(freq) == 5
    assert manifest["rejects"] == {"train": 0, "test": 0} and rejects(out) == []
    assert manifest["source"]["converter"] == "voc2007" and manifest["extra_columns"] == []
    assert "difficult" in manifest["description"]
    verify_shards(out, tmp_path / "verified.json")


def test_voc2007_is_byte_deterministic(voc_root: Path, tmp_path: Path) -> None:
    a = convert_voc2007(voc_root, tmp_path / "a", shard_rows=3, progress=False).manifest
    b = convert_voc2007(voc_root, tmp_path / "b", shard_rows=3, progress=False).manifest
    assert a == b
    assert [s["rows"] for s in a["splits"]["train"]["shards"]] == [3, 1]
    for shard in a["splits"]["train"]["shards"] + a["splits"]["test"]["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_voc2007_unknown_class_and_missing_list(tmp_path: Path) -> None:
    voc = make_voc_tree(tmp_path / "src", {"trainval": {"000001": [("unicorn", False), ("dog", False)]},
                                           "test": {"000002": [("cat", False)]}})
    result = convert_voc2007(voc, tmp_path / "out", progress=False)
    assert result.manifest["rejects"] == {"train": 1, "test": 0}
    assert rejects(tmp_path / "out")[0]["reason"] == "unknown label: 'unicorn'"
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        convert_voc2007(voc, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------ COCO

COCO_CATEGORIES = [(18, "dog"), (1, "person"), (17, "cat"), (3, "car")]  # JSON order is not id order


def test_coco2014_category_id_order_drops_unannotated(tmp_path: Path) -> None:
    root = make_coco_tree(tmp_path / "coco", COCO_CATEGORIES, {
        "train2014": [(30, [3]), (9, [1, 1, 18]), (25, []), (12, [17, 1])],
        "val2014": [(42, [18]), (73, []), (74, [99]), (61, [3, 17])],
    })
    out = tmp_path / "out"
    result = convert_coco2014(root, out, progress=False)
    manifest = read_manifest(out)
    assert manifest["vocabulary"] == ["person", "car", "cat", "dog"]  # category id 1, 3, 17, 18
    train = rows(out, "train")
    assert [r["id"] for r in train] == [f"COCO_train2014_{i:012d}" for i in (9, 12, 30)]  # by image id
    assert [r["labels"] for r in train] == [[0, 3], [0, 2], [1]]
    assert [r["id"] for r in rows(out, "test")] == ["COCO_val2014_000000000042", "COCO_val2014_000000000061"]
    assert manifest["dropped"] == {"train": {"no annotations": 1}, "test": {"no annotations": 1}}
    assert manifest["rejects"] == {"train": 0, "test": 1}  # dropped images are not rejects
    (reject,) = rejects(out)
    assert reject["split"] == "test" and reject["id"] == "COCO_val2014_000000000074"
    assert reject["reason"].startswith("unknown label") and "99" in reject["reason"]
    assert "1 dropped (no annotations: 1)" in result.summary()
    assert train[0]["image"] == (root / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes()


# -------------------------------------------------------------------------------------- NUS-WIDE

NUS_CONCEPTS = ["sky", "animal", "water", "beach"]  # Concepts81.txt order is kept, not re-sorted


def test_nuswide_official_lists_drop_unlabeled(tmp_path: Path) -> None:
    root = make_nuswide_tree(tmp_path / "nus", NUS_CONCEPTS, {
        "Train": [("actor/0001_11.jpg", ["sky", "water"]), ("beach/0002_12.jpg", []),
                  ("beach/0003_13.jpg", ["beach"]), ("zoo/0009_19.jpg", ["animal"])],
        "Test": [("zoo/0004_14.jpg", ["animal", "sky"]), ("zoo/0005_15.jpg", [])],
    })
    (root / "Flickr" / "zoo" / "0009_19.jpg").unlink()  # listed but never downloaded
    out = tmp_path / "out"
    convert_nuswide(root, out, progress=False)
    manifest = read_manifest(out)
    assert manifest["vocabulary"] == NUS_CONCEPTS
    train = rows(out, "train")
    assert [(r["id"], r["labels"]) for r in train] == [("actor/0001_11.jpg", [0, 2]), ("beach/0003_13.jpg", [3])]
    assert [(r["id"], r["labels"]) for r in rows(out, "test")] == [("zoo/0004_14.jpg", [0, 1])]
    assert manifest["dropped"] == {"train": {"no labels": 1}, "test": {"no labels": 1}}
    (reject,) = rejects(out)
    assert (reject["split"], reject["row"], reject["id"]) == ("train", 3, "zoo/0009_19.jpg")
    assert reject["reason"].startswith("missing file")
    assert manifest["label_frequencies"]["train"] == [1, 0, 1, 1]


def test_nuswide_label_file_length_mismatch_is_fatal(tmp_path: Path) -> None:
    root = make_nuswide_tree(tmp_path / "nus", NUS_CONCEPTS, {
        "Train": [("a/1.jpg", ["sky"]), ("a/2.jpg", ["sky"])], "Test": [("a/3.jpg", ["sky"])]})
    label_file = root / "Groundtruth" / "TrainTestLabels" / "Labels_water_Train.txt"
    label_file.write_text("0\n")  # one line short
    with pytest.raises(ValueError):
        convert_nuswide(root, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "nus"]  # no dataset, no staging folder
