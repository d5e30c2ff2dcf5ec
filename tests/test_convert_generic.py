"""The generic converter, and the shared rules: rejects, --strict, staging, bounded memory."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.prepare as prepare
from pipeline.prepare import Example, RejectedInput, write_dataset
from pipeline.shards import read_manifest
from pipeline.sources import convert_generic
from tests._data_trees import photo_jpeg, rejects, rows, truncated_jpeg, write_generic_csv, write_generic_jsonl


def test_csv_and_jsonl_with_inferred_sorted_vocabulary(tmp_path: Path) -> None:
    train = write_generic_csv(tmp_path / "train.csv", [("img/a.jpg", "zebra|cat"), ("img/b.jpg", "dog; cat")])
    test = write_generic_jsonl(tmp_path / "test.jsonl", [{"path": "img/c.jpg", "labels": ["dog"]},
                                                         {"path": "img/d.jpg", "labels": ["ant"], "id": "d"}])
    out = tmp_path / "out"
    convert_generic({"train": train, "test": test}, out, progress=False)
    manifest = read_manifest(out)
    assert manifest["vocabulary"] == ["ant", "cat", "dog", "zebra"]
    assert [(r["id"], r["labels"], r["ignore"]) for r in rows(out, "train")] == [
        ("img/a.jpg", [1, 3], []), ("img/b.jpg", [1, 2], [])]
    assert [(r["id"], r["labels"]) for r in rows(out, "test")] == [("img/c.jpg", [2]), ("d", [0])]
    assert rows(out, "test")[0]["image"] == (tmp_path / "img" / "c.jpg").read_bytes()
    assert manifest["label_frequencies"] == {"train": [0, 2, 1, 1], "test": [1, 0, 1, 0]}
    assert manifest["source"]["converter"] == "generic"


def test_vocabulary_file_order_and_unknown_label(tmp_path: Path) -> None:
    train = write_generic_csv(tmp_path / "train.csv", [("a.jpg", "cat"), ("b.jpg", "cat|wolf")])
    (tmp_path / "vocab.txt").write_text("dog\ncat\n")
    out = tmp_path / "out"
    convert_generic({"train": train}, out, vocabulary=tmp_path / "vocab.txt", progress=False)
    assert read_manifest(out)["vocabulary"] == ["dog", "cat"]
    assert [r["labels"] for r in rows(out, "train")] == [[1]]
    assert rejects(out) == [{"split": "train", "row": 1, "id": "b.jpg", "reason": "unknown label: 'wolf'",
                             "path": str(tmp_path / "b.jpg")}]


@pytest.fixture
def bad_lists(tmp_path: Path) -> dict[str, Path]:
    """One good row and one row of every kind of bad input, in both list formats."""
    train = write_generic_csv(tmp_path / "train.csv", [
        ("ok.jpg", "cat"), ("broken.jpg", "cat"), ("gone.jpg", "cat"), ("text.jpg", "dog"),
        ("ok2.jpg", "unicorn"), ("ok3.jpg", ""), ("ok.jpg", "dog"),
    ], photos=False)
    (tmp_path / "ok.jpg").write_bytes(photo_jpeg(0))
    (tmp_path / "ok2.jpg").write_bytes(photo_jpeg(1))
    (tmp_path / "ok3.jpg").write_bytes(photo_jpeg(2))
    (tmp_path / "broken.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "text.jpg").write_text("not an image")
    test = tmp_path / "test.jsonl"
    test.write_text('{"path": "ok.jpg", "labels": ["dog"]}\n{"path": "ok2.jpg", "labels": \n')
    return {"train": train, "test": test}


def test_every_bad_row_is_rejected_with_its_reason(bad_lists: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert_generic(bad_lists, out, vocabulary=["cat", "dog"], progress=False)
    got = [(r["split"], r["row"], r["id"], r["reason"].split(":")[0]) for r in rejects(out)]
    assert got == [
        ("train", 1, "broken.jpg", "corrupt image"),
        ("train", 2, "gone.jpg", "missing file"),
        ("train", 3, "text.jpg", "corrupt image"),
        ("train", 4, "ok2.jpg", "unknown label"),
        ("train", 5, "ok3.jpg", "empty label set"),
        ("train", 6, "ok.jpg", "duplicate id"),
        ("test", 1, "<record 1>", "malformed record"),
    ]
    assert rejects(out)[2]["reason"] == "corrupt image: not a recognised image format"
    assert [r["id"] for r in rows(out, "train")] == ["ok.jpg"]
    assert read_manifest(out)["rejects"] == {"train": 6, "test": 1}
    summary = result.summary()
    assert "train: 1 rows in 1 shard(s), 6 rejected" in summary and "duplicate id: 1" in summary
    assert str(out / "rejects.jsonl") in summary


def test_strict_fails_at_first_bad_row_and_leaves_nothing(bad_lists: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RejectedInput, match="row 1.*corrupt image"):
        convert_generic(bad_lists, out, vocabulary=["cat", "dog"], strict=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train.csv", "test.jsonl", "ok.jpg", "ok2.jpg",
                                                                 "ok3.jpg", "broken.jpg", "text.jpg"])


def test_injected_failure_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [(f"img/{i}.jpg", "cat") for i in range(12)]
    train = write_generic_csv(tmp_path / "lists" / "train.csv", names)
    calls = {"n": 0}
    real_check = prepare.check_image

    def failing_check(data: bytes) -> str | None:
        calls["n"] += 1
        if calls["n"] == 9:  # after several one-row shards are on disk
            raise OSError("disk on fire")
        return real_check(data)

    monkeypatch.setattr(prepare, "check_image", failing_check)
    with pytest.raises(OSError, match="disk on fire"):
        convert_generic({"train": train}, tmp_path / "data" / "out", shard_rows=1, workers=1, progress=False)
    assert list((tmp_path / "data").iterdir()) == []  # no dataset and no staging folder


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    train = write_generic_csv(tmp_path / "train.csv", [("a.jpg", "cat")])
    out = tmp_path / "out"
    convert_generic({"train": train}, out, progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_generic({"train": train}, out, progress=False)
    assert (out / "manifest.json").read_bytes() == before
    write_generic_csv(train, [("a.jpg", "cat"), ("b.jpg", "dog")])
    convert_generic({"train": train}, out, overwrite=True, progress=False)
    assert read_manifest(out)["splits"]["train"]["rows"] == 2


def _noise_png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()  # ~12 KB, incompressible


def test_memory_stays_bounded_while_streaming(tmp_path: Path) -> None:
    """400 distinct 12 KB images (~5 MB) go through while Python holds well under that at once."""
    examples = (Example(id=str(i), image=_noise_png(i), labels=["x"]) for i in range(400))
    tracemalloc.start()
    try:
        write_dataset(tmp_path / "out", {"train": examples}, vocabulary=["x"], source={"converter": "test"},
                      description="", shard_rows=32, workers=2, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read_manifest(tmp_path / "out")["splits"]["train"]["rows"] == 400
    print(f"peak traced memory {peak / 1e6:.2f} MB")
    assert peak < 2.5e6, f"peak {peak / 1e6:.1f} MB: rows are being held, not streamed"
