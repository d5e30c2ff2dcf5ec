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
        "train-preset": ["train", "tiny", "preset=papr", storage],
        "train-resume-preset": ["train", "--resume", nope, "preset=paper", storage],
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


def _generic_source(root: Path) -> Path:
    from tests._data_trees import write_generic_csv

    return write_generic_csv(root / "list.csv", [("a.jpg", "cat"), ("b.jpg", "dog|cat")])


def test_overwrite_replaces_a_dataset_salgl_wrote(tmp_path: Path) -> None:
    """The refusals are rows of tests/test_bad_inputs.py; this is the case --overwrite is for."""
    listing = _generic_source(tmp_path / "src")
    argv = ["prepare", "generic", "--train", str(listing), "--overwrite", "--no-progress", "--out", str(tmp_path / "data")]
    assert main(argv) == 0
    assert main(argv) == 0


def _csv(path: Path, text: str, *, bom: bool = False) -> Path:
    from tests._data_trees import photo_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    for n, line in enumerate(text.splitlines()[1:]):
        (path.parent / line.split(",")[0]).write_bytes(photo_jpeg(n))
    return path


def test_comma_separated_labels_with_the_option_and_a_bom(tmp_path: Path) -> None:
    from pipeline.shards import read_manifest

    listing = _csv(tmp_path / "src" / "list.csv", 'path,labels\na.jpg,"cat,dog"\nb.jpg,cat\n', bom=True)
    argv = ["prepare", "generic", "--train", str(listing), "--out", str(tmp_path / "data"), "--label-sep", ",", "--no-progress"]
    assert main(argv) == 0
    assert read_manifest(tmp_path / "data")["vocabulary"] == ["cat", "dog"]


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
