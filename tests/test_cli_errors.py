"""One error path for every subcommand: usage errors exit 2, runtime failures 1, each as one line
``salgl CMD: error: ...`` and no traceback unless ``--debug``. None of these start Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import main


def _usage_errors(tmp: Path) -> dict[str, list[str]]:
    """One request per subcommand that names something that is not there."""
    nope = str(tmp / "nope")
    storage = f"run.storage={tmp / 'runs'}"
    return {
        "train-config": ["train", f"{nope}.yaml"],
        "train-dataset": ["train", "tiny", f"data.path={nope}", storage],
        "tune-config": ["tune", f"{nope}.yaml", "--samples", "1"],
        "tune-dataset": ["tune", "tiny", f"data.path={nope}", storage, "--samples", "1"],
        "tune-resume": ["tune", "--resume", nope],
        "evaluate-checkpoint": ["evaluate", nope, "--data", nope],
        "predict-checkpoint": ["predict", nope, nope, "--out", str(tmp / "p.jsonl")],
        "inspect-checkpoint": ["inspect", nope, "--out", str(tmp / "pictures")],
        "prepare-list": ["prepare", "generic", "--train", f"{nope}.csv", "--out", str(tmp / "data")],
        "submit-nothing": ["submit", "--address", "http://127.0.0.1:9", "--"],
    }


@pytest.mark.parametrize("case", sorted(_usage_errors(Path("/x"))))
def test_usage_errors_exit_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _usage_errors(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"salgl {argv[0]}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope"), "--out", str(tmp_path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("salgl inspect: error: checkpoint")


def test_a_corrupt_checkpoint_is_a_runtime_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.training.checkpoints import STATE_FILE

    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    (tmp_path / "config.json").write_text('{"config": {}, "vocabulary": ["a"]}')
    assert main(["inspect", str(tmp_path), "--out", str(tmp_path / "pictures")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"salgl inspect: error: {tmp_path / STATE_FILE} cannot be read as a checkpoint") and err.count("\n") == 1


def test_a_bad_config_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("salgl train: error: optim.lr")


def test_a_truncated_shard_is_named_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests._tiny_checkpoint import make_mosaic

    data = Path(make_mosaic(tmp_path / "data"))
    shard = next((data / "train").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["train", "tiny", f"data.path={data}", f"run.storage={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"salgl train: error: {shard}: not a readable parquet file") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # refused before a run (or an MLflow record) began


def test_resume_looks_for_the_run_in_the_storage_given_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "elsewhere"
    assert main(["train", "--resume", "a-run", f"run.storage={storage}"]) == 2
    assert f"{storage}/a-run" in capsys.readouterr().err


def _generic_source(root: Path) -> Path:
    from tests._data_trees import write_generic_csv

    return write_generic_csv(root / "list.csv", [("a.jpg", "cat"), ("b.jpg", "dog|cat")])


@pytest.mark.parametrize("where", ["the list's folder", "a folder above it"])
def test_overwrite_never_deletes_the_inputs(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = _generic_source(tmp_path / "src")
    out = listing.parent if where == "the list's folder" else tmp_path
    before = sorted(p.name for p in listing.parent.iterdir())
    assert main(["prepare", "generic", "--train", str(listing), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in listing.parent.iterdir()) == before


def test_overwrite_replaces_only_a_dataset_salgl_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = _generic_source(tmp_path / "src")
    other = tmp_path / "home"
    (other / "notes").mkdir(parents=True)
    (other / "notes" / "keep.txt").write_text("mine")
    argv = ["prepare", "generic", "--train", str(listing), "--overwrite", "--no-progress", "--out"]
    assert main([*argv, str(other)]) == 2
    assert "replaces only a dataset" in capsys.readouterr().err
    assert (other / "notes" / "keep.txt").read_text() == "mine"

    dataset = tmp_path / "data"
    assert main([*argv, str(dataset)]) == 0
    assert main([*argv, str(dataset)]) == 0  # a dataset of ours: replaced


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "loss.entropy_weight=-inf", "optim.epochs=1e999"])
def test_non_finite_numbers_are_refused_before_anything_starts(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny", override]) == 2
    assert capsys.readouterr().err.startswith(f"salgl train: error: {override.split('=')[0]}: ")


def test_a_checkpoint_that_would_run_code_is_refused_unopened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    import torch

    from jobs.training.checkpoints import STATE_FILE

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": Payload()}, tmp_path / STATE_FILE, pickle_module=pickle)
    (tmp_path / "config.json").write_text('{"config": {}, "vocabulary": ["a"]}')
    assert main(["inspect", str(tmp_path), "--out", str(tmp_path / "pictures")]) == 1
    assert "not only tensors and numbers; refused unopened" in capsys.readouterr().err
    assert not marker.exists()


def test_an_altered_shard_is_named_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tests._tiny_checkpoint import make_mosaic

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = Path(make_mosaic(tmp_path / "data"))
    shard = next((data / "test").glob("*.parquet"))
    altered = bytearray(shard.read_bytes())
    altered[8] ^= 0xFF  # same size, readable footer: only the sha256 tells
    shard.write_bytes(bytes(altered))
    assert main(["train", "tiny", f"data.path={data}", f"run.storage={tmp_path / 'runs'}"]) == 1
    assert capsys.readouterr().err.startswith(f"salgl train: error: {shard.resolve()}: its sha256 differs from the manifest")
    assert not (tmp_path / "runs").exists()


def _csv(path: Path, text: str, *, bom: bool = False) -> Path:
    from tests._data_trees import photo_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    for n, line in enumerate(text.splitlines()[1:]):
        (path.parent / line.split(",")[0]).write_bytes(photo_jpeg(n))
    return path


@pytest.mark.parametrize(("labels", "hint"), [('"cat,dog"', "--label-sep ','"), ("cat dog", "--label-sep space")])
def test_names_holding_another_separator_are_refused_not_invented(labels: str, hint: str, tmp_path: Path, capsys) -> None:
    listing = _csv(tmp_path / "src" / "list.csv", f"path,labels\na.jpg,{labels}\nb.jpg,cat\n")
    assert main(["prepare", "generic", "--train", str(listing), "--out", str(tmp_path / "data"), "--no-progress"]) == 2
    assert hint in capsys.readouterr().err and not (tmp_path / "data").exists()


def test_comma_separated_labels_with_the_option_and_a_bom(tmp_path: Path) -> None:
    from pipeline.shards import read_manifest

    listing = _csv(tmp_path / "src" / "list.csv", 'path,labels\na.jpg,"cat,dog"\nb.jpg,cat\n', bom=True)
    argv = ["prepare", "generic", "--train", str(listing), "--out", str(tmp_path / "data"), "--label-sep", ",", "--no-progress"]
    assert main(argv) == 0
    assert read_manifest(tmp_path / "data")["vocabulary"] == ["cat", "dog"]


@pytest.mark.parametrize("case", ["folder", "latin-1"])
def test_a_list_that_cannot_be_read_is_one_line_naming_it(case: str, tmp_path: Path, capsys) -> None:
    listing = tmp_path / "src"
    listing.mkdir()
    if case == "latin-1":
        listing = listing / "list.csv"
        listing.write_bytes("path,labels\nä.jpg,cat\n".encode("latin-1"))
    assert main(["prepare", "generic", "--train", str(listing), "--out", str(tmp_path / "data"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"salgl prepare: error: {listing}") and err.count("\n") == 1


def test_rows_that_are_unsafe_to_read_are_rejected_with_a_reason(tmp_path: Path) -> None:
    import json
    import os

    from PIL import Image

    src = tmp_path / "src"
    listing = _csv(src / "list.csv", "path,labels\nok.jpg,cat\n")
    (tmp_path / "outside.jpg").write_bytes((src / "ok.jpg").read_bytes())
    os.mkfifo(src / "fifo.jpg")  # reading it would hang
    os.symlink("/dev/zero", src / "zero.jpg")  # reading it would never end
    Image.new("1", (8001, 8001)).save(src / "huge.png")  # 64 M pixels, a 10 kB file
    rows = ["ok.jpg", "../outside.jpg", str(tmp_path / "outside.jpg"), "fifo.jpg", "zero.jpg", "huge.png"]
    listing.write_text("path,labels\n" + "".join(f"{row},cat\n" for row in rows))
    out = tmp_path / "data"
    assert main(["prepare", "generic", "--train", str(listing), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    reasons = {r["path"].rsplit("/", 1)[-1] + ("@" + str(r["row"])): r["reason"].split(":")[0]
               for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert reasons == {"outside.jpg@1": "outside the image root", "outside.jpg@2": "outside the image root",
                       "fifo.jpg@3": "not a regular file", "zero.jpg@4": "outside the image root",
                       "huge.png@5": "image too large"}
