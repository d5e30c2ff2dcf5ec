"""Datasets in an object store: ``salgl prepare ... --out s3://...`` and ``data.path=s3://...``.

Unit tests of the URI handling and of the one-line store errors, then integration tests against
the S3-compatible server on 127.0.0.1 (``s3_endpoint``, moto's server mode): the built-in mosaic
prepared into a bucket is shard for shard the one prepared on disk, a reader never finds a
manifest whose shards are missing, the checksums are verified with one read and remembered, and
Ray Data streams the same rows from the bucket as from the disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.mosaic import MosaicConfig
from pipeline.shards import dataset_location, join, store_error
from salgl.errors import NotFound, UsageError

DATA_BUCKET = "salgl-data"
SMALL = MosaicConfig(train=48, test=16, canvas=32)


# ---------------------------------------------------------------------------------------------
# Unit: no server


def test_a_uri_stays_a_uri_and_a_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_location("s3://b/data/x/") == "s3://b/data/x"
    assert dataset_location("data/x") == str(tmp_path / "data" / "x")
    assert join("s3://b/data/x/", "train/part-00000.parquet") == "s3://b/data/x/train/part-00000.parquet"
    assert join("gs://b/x", "manifest.json") == "gs://b/x/manifest.json"


@pytest.mark.parametrize("message", [
    "When getting information for key 'd/manifest.json' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
    "operation: No response body.",
    "When reading information for key 'd' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) during ListObjectsV2 "
    "operation: InvalidAccessKeyId",
    "google::cloud::Status(UNAUTHENTICATED: Could not create a OAuth2 access token)",
])
def test_a_refused_request_is_one_line_about_credentials(message: str) -> None:
    err = store_error("s3://b/d", OSError(message))
    assert isinstance(err, UsageError) and "credentials" in str(err) and "\n" not in str(err)


def test_a_missing_bucket_is_said_as_such_and_other_failures_pass_through() -> None:
    err = store_error("s3://nope/d", OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation"))
    assert isinstance(err, NotFound) and "bucket does not exist" in str(err)
    assert store_error("s3://b/d", OSError("connection reset")) is None


# ---------------------------------------------------------------------------------------------
# Integration: the S3 server on 127.0.0.1


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    s3_endpoint.create_bucket(Bucket=DATA_BUCKET)
    return f"s3://{DATA_BUCKET}"


@pytest.fixture(scope="module")
def s3_mosaic(bucket: str) -> str:
    """The small mosaic prepared into the bucket with ``salgl prepare``."""
    from jobs.cli import main

    uri = f"{bucket}/data/mosaic"
    assert main(["prepare", "mosaic", "--out", uri, "--train", "48", "--test", "16", "--canvas", "32",
                 "--no-progress"]) == 0
    return uri


def _keys(s3, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=DATA_BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(obj["Key"][len(prefix):] for obj in listed)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_mosaic_prepared_into_a_bucket_is_the_one_prepared_on_disk(
    s3_endpoint, s3_mosaic: str, tmp_path: Path
) -> None:
    from pipeline.mosaic import convert_mosaic
    from pipeline.probe import first_rows
    from pipeline.shards import read_label_matrix, read_manifest, verify_shards

    local = convert_mosaic(tmp_path / "mosaic", SMALL, progress=False).manifest
    remote = read_manifest(s3_mosaic)
    assert remote["splits"] == local["splits"]  # same rows, same shard checksums
    assert _keys(s3_endpoint, "data/mosaic/") == ["manifest.json", "rejects.jsonl", "test/part-00000.parquet",
                                                  "train/part-00000.parquet"]
    assert (read_label_matrix(s3_mosaic, "train") == read_label_matrix(tmp_path / "mosaic", "train")).all()
    assert first_rows(s3_mosaic, "test", 3)["id"].tolist() == first_rows(tmp_path / "mosaic", "test", 3)["id"].tolist()
    assert verify_shards(s3_mosaic) == 2  # one streamed read of each shard
    assert verify_shards(s3_mosaic) == 0  # remembered by URI, size and last-modified time


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_shard_replaced_in_the_bucket_fails_verification(s3_endpoint, bucket: str) -> None:
    from pipeline.mosaic import convert_mosaic
    from pipeline.shards import verify_shards
    from salgl.errors import CorruptFile

    uri = f"{bucket}/data/altered"
    convert_mosaic(uri, SMALL, progress=False)
    assert verify_shards(uri) == 2
    key = "data/altered/train/part-00000.parquet"
    body = s3_endpoint.get_object(Bucket=DATA_BUCKET, Key=key)["Body"].read()
    s3_endpoint.put_object(Bucket=DATA_BUCKET, Key=key, Body=body[:4] + b"\0" * 64 + body[4:])  # footer intact
    with pytest.raises(CorruptFile, match=f"{key}: its sha256 differs"):
        verify_shards(uri)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_interrupted_prepare_leaves_no_manifest_and_no_shards(s3_endpoint, bucket: str) -> None:
    from pipeline.prepare import Example, write_dataset
    from tests._data_trees import photo_jpeg

    seen_during_write: list[list[str]] = []

    def examples():
        for i in range(8):
            yield Example(id=str(i), labels=["a"], image=photo_jpeg(i))
        seen_during_write.append(_keys(s3_endpoint, "data/cut/"))
        raise KeyboardInterrupt  # Ctrl-C halfway

    with pytest.raises(KeyboardInterrupt):
        write_dataset(f"{bucket}/data/cut", {"train": examples()}, vocabulary=["a"], source={"converter": "test"},
                      description="", shard_rows=4, progress=False, workers=1)
    assert "train/part-00000.parquet" in seen_during_write[0]  # shards were written first ...
    assert "manifest.json" not in seen_during_write[0]  # ... and no manifest named them yet
    assert _keys(s3_endpoint, "data/cut/") == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_store_mistakes_are_one_line_errors(s3_mosaic: str, bucket: str) -> None:
    from jobs.cli import main
    from jobs.training.dataset import resolve_data
    from pipeline.mosaic import convert_mosaic
    from salgl.config import preset
    from salgl.errors import AlreadyExists

    with pytest.raises(NotFound, match="the bucket 'no-such-bucket' does not exist"):
        convert_mosaic("s3://no-such-bucket/data/m", SMALL, progress=False)
    with pytest.raises(NotFound, match="the bucket 'no-such-bucket' does not exist"):
        resolve_data(preset("tiny", {"data.path": "s3://no-such-bucket/data/m"}))
    with pytest.raises(NotFound, match=f"data.path='{bucket}/nothing' holds no manifest.json"):
        resolve_data(preset("tiny", {"data.path": f"{bucket}/nothing"}))
    with pytest.raises(AlreadyExists, match="--overwrite"):
        convert_mosaic(s3_mosaic, SMALL, progress=False)
    assert resolve_data(preset("tiny", {"data.path": s3_mosaic + "/"})) == s3_mosaic
    assert main(["prepare", "mosaic", "--out", "s3://no-such-bucket/m", "--no-progress"]) == 2


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_overwrite_replaces_a_dataset_in_the_bucket_and_nothing_else(s3_endpoint, bucket: str) -> None:
    from pipeline.mosaic import convert_mosaic
    from pipeline.shards import read_manifest
    from salgl.errors import BadValue

    uri = f"{bucket}/data/again"
    convert_mosaic(uri, SMALL, progress=False, shard_rows=16)
    again = convert_mosaic(uri, SMALL, progress=False, overwrite=True)
    assert read_manifest(uri)["splits"] == again.manifest["splits"]
    assert _keys(s3_endpoint, "data/again/") == ["manifest.json", "rejects.jsonl", "test/part-00000.parquet",
                                                 "train/part-00000.parquet"]  # the 16-row shards are gone
    s3_endpoint.put_object(Bucket=DATA_BUCKET, Key="data/notes/readme.txt", Body=b"mine")
    with pytest.raises(BadValue, match="replaces only a dataset"):
        convert_mosaic(f"{bucket}/data/notes", SMALL, progress=False, overwrite=True)
    assert _keys(s3_endpoint, "data/notes/") == ["readme.txt"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ray_data_streams_the_same_rows_from_the_bucket_as_from_disk(ray_with_s3, s3_mosaic: str, tmp_path: Path) -> None:
    from jobs.tracking import manifest_dataset
    from pipeline.ingest import eval_dataset, execution_options, iter_eval_batches, train_dataset
    from pipeline.mosaic import convert_mosaic
    from salgl.config import DataConfig

    local = str(convert_mosaic(tmp_path / "mosaic", SMALL, progress=False).out)
    cfg = DataConfig(img_size=32)

    def rows(data_dir: str) -> tuple[list[str], float, list[str]]:
        test, train = eval_dataset(data_dir, cfg, num_workers=1), train_dataset(data_dir, cfg, seed=3)
        for ds in (test, train):
            ds.context.execution_options = execution_options()  # as Train runs them: block order kept
        batches = list(iter_eval_batches(test.iterator(), batch_size=8, normalize=cfg.normalize))
        pixels = float(sum(b["image"].double().sum() for b in batches))
        return [i for b in batches for i in b["id"]], pixels, [i for b in train.iter_batches(batch_size=None) for i in b["id"]]

    assert rows(s3_mosaic) == rows(local)  # the same rows, in the same (seeded) order
    assert manifest_dataset(s3_mosaic).source.to_dict()["uri"] == s3_mosaic


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_salgl_evaluate_scores_a_dataset_in_the_bucket(ray_with_s3, s3_mosaic: str, tmp_path: Path) -> None:
    import json

    from jobs.cli import main
    from jobs.inference.loading import read_vocabulary
    from tests._tiny_checkpoint import write_tiny_checkpoint

    vocabulary = read_vocabulary(s3_mosaic)  # the manifest's, read from the store
    assert len(vocabulary) == 10
    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint_000001", vocabulary)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(checkpoint), "--data", s3_mosaic, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"] == s3_mosaic and result["images"] == SMALL.test
