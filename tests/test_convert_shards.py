"""The shard format: writer, manifest helpers, staging (pipeline/shards.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.shards import (
    BASE_SCHEMA,
    ShardWriter,
    dataset_schema,
    file_sha256,
    read_manifest,
    shard_paths,
    staged_output,
    verify_shards,
    write_manifest,
)


def _row(i: int, **extra: object) -> dict:
    return {"image": bytes([i % 256]) * 10, "labels": [i % 3], "id": f"r{i}", "ignore": [], **extra}


def test_shard_writer_splits_rows_into_fixed_size_shards(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", shard_rows=4, row_group_rows=3) as writer:
        for i in range(10):
            writer.write(_row(i))
        shards = writer.close()
    assert [s["file"] for s in shards] == [f"train/part-0000{i}.parquet" for i in range(3)]
    assert [s["rows"] for s in shards] == [4, 4, 2]
    ids = []
    for s in shards:
        f = pq.ParquetFile(tmp_path / s["file"])
        assert f.schema_arrow == BASE_SCHEMA
        assert max(f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)) <= 3
        assert s["sha256"] == file_sha256(tmp_path / s["file"])
        ids += f.read().column("id").to_pylist()
    assert ids == [f"r{i}" for i in range(10)]  # input order kept


def test_shard_writer_is_byte_deterministic(tmp_path: Path) -> None:
    def write(root: Path) -> list[dict]:
        with ShardWriter(root, "test", shard_rows=5, schema=dataset_schema(["scene"])) as writer:
            for i in range(7):
                writer.write(_row(i, scene=i % 2))
            return writer.close()

    assert write(tmp_path / "a") == write(tmp_path / "b")


def test_empty_split_gets_one_empty_shard(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "test") as writer:
        shards = writer.close()
    assert [s["rows"] for s in shards] == [0]
    assert pq.read_table(tmp_path / shards[0]["file"]).schema == BASE_SCHEMA


def test_manifest_round_trip_and_shard_paths(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", shard_rows=2) as writer:
        for i in range(3):
            writer.write(_row(i))
        shards = writer.close()
    write_manifest(tmp_path, {"schema_version": 1, "splits": {"train": {"rows": 3, "shards": shards}}})
    assert read_manifest(tmp_path)["splits"]["train"]["rows"] == 3
    assert shard_paths(tmp_path, "train") == [str(tmp_path.resolve() / s["file"]) for s in shards]
    cache = tmp_path / "cache" / "verified.json"
    assert verify_shards(tmp_path, cache) == 2
    assert verify_shards(tmp_path, cache) == 0  # same size and mtime: not read again
    with pytest.raises(FileNotFoundError, match="not in"):
        shard_paths(tmp_path, "val")
    shard = tmp_path / shards[0]["file"]
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF  # altered in place, in the first page: same size, the footer still reads
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs from the manifest"):
        verify_shards(tmp_path, cache)
    shard.write_bytes(bytes(data[: len(data) // 2]))  # a copy cut short
    with pytest.raises(ValueError, match="not a readable parquet file"):
        verify_shards(tmp_path, cache)


def test_read_manifest_rejects_other_schema_versions(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(ValueError, match="schema_version"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="salgl prepare"):
        read_manifest(tmp_path / "missing")


def test_staged_output_moves_into_place_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with staged_output(out) as staging:
            (staging / "half-written").write_text("x")
            raise RuntimeError("injected")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the staging folder

    with staged_output(out) as staging:
        (staging / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    assert (out / "manifest.json").is_file()
    reference = tmp_path / "reference"
    reference.mkdir()
    assert out.stat().st_mode == reference.stat().st_mode  # the umask's, not mkdtemp's 0700
    reference.rmdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        with staged_output(out):
            pass
    with staged_output(out, overwrite=True) as staging:
        (staging / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
