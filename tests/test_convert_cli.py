"""`salgl prepare ...` through the real entry point (jobs/cli/__init__.py -> jobs/cli/prepare.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.shards import read_manifest
from tests._data_trees import make_voc_tree, truncated_jpeg, write_fake_fashion_mnist, write_generic_csv

TINY = ["--train", "24", "--test", "8", "--canvas", "32", "--no-progress"]


def test_prepare_mosaic_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = write_fake_fashion_mnist(tmp_path / "fm")
    out = tmp_path / "mosaic"
    args = ["prepare", "mosaic", "--out", str(out), "--fashion-mnist", str(fake), "--shard-rows", "10", *TINY]
    assert main(args) == 0
    assert "train: 24 rows in 3 shard(s), 0 rejected" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["extra_columns"] == ["scene"] and manifest["source"]["parameters"]["canvas"] == 32

    assert main(args) == 2  # exists: refused (a usage error)
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--seed", "3"]) == 0
    assert read_manifest(out)["source"]["parameters"]["seed"] == 3


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed")
def test_prepare_mosaic_default_location(tmp_path: Path) -> None:
    assert main(["prepare", "mosaic", "--out", str(tmp_path / "m"), *TINY]) == 0
    assert read_manifest(tmp_path / "m")["splits"]["test"]["rows"] == 8


def test_prepare_mosaic_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prepare", "mosaic", "--out", str(tmp_path / "m"), "--fashion-mnist", str(tmp_path), *TINY])
    assert code == 2  # a usage error: the inputs are not there
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_prepare_voc_strict_fails_and_default_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    voc = make_voc_tree(tmp_path / "src", {"trainval": {"000001": [("dog", False)], "000002": [("cat", False)]},
                                           "test": {"000003": [("cat", False)]}})
    (voc / "JPEGImages" / "000002.jpg").write_bytes(truncated_jpeg())
    out = tmp_path / "voc"
    assert main(["prepare", "voc2007", str(voc), "--out", str(out), "--strict", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "row 1" in err and "'000002'" in err and "corrupt image" in err
    assert not out.exists()
    assert main(["prepare", "voc2007", str(voc), "--out", str(out), "--no-progress"]) == 0
    assert "train: 1 rows in 1 shard(s), 1 rejected (corrupt image: 1)" in capsys.readouterr().out
    assert read_manifest(out)["rejects"] == {"train": 1, "test": 0}


def test_prepare_generic_named_splits(tmp_path: Path) -> None:
    train = write_generic_csv(tmp_path / "train.csv", [("a.jpg", "cat|dog")])
    val = write_generic_csv(tmp_path / "val" / "val.csv", [("b.jpg", "dog")])
    (tmp_path / "vocab.txt").write_text("dog\ncat\n")
    out = tmp_path / "out"
    code = main(["prepare", "generic", "--train", str(train), "--split", f"val={val}",
                 "--vocab", str(tmp_path / "vocab.txt"), "--out", str(out), "--no-progress"])
    assert code == 0
    manifest = read_manifest(out)
    assert list(manifest["splits"]) == ["train", "val"] and manifest["vocabulary"] == ["dog", "cat"]
    with pytest.raises(SystemExit):  # argparse: malformed NAME=FILE
        main(["prepare", "generic", "--split", "nofile", "--out", str(tmp_path / "x")])


@pytest.mark.integration
@pytest.mark.timeout(300)
def _terminal_signals() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stopped_prepare_leaves_no_temporary_folder(stop: str, tmp_path: Path) -> None:
    """SIGTERM (timeout, schedulers), SIGHUP and Ctrl-C all remove the staging folder, and exit 130."""
    import signal
    import subprocess
    import sys

    fake = write_fake_fashion_mnist(tmp_path / "fm")
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "prepare", "mosaic", "--out", str(data / "m"), "--fashion-mnist", str(fake),
         "--train", "100000", "--test", "10", "--canvas", "32", "--shard-rows", "16", "--no-progress"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C and hang-up as in a terminal: a test run in the background hands its children
        # SIGINT ignored (and under nohup SIGHUP too), and an ignored signal stays ignored.
        preexec_fn=_terminal_signals,
    )
    while not list(data.glob(".m.tmp-*/train/*")):  # stop it once it is writing shards
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)  # polling a child's progress, not synchronising the test
    proc.send_signal(getattr(signal, stop))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "salgl prepare: interrupted" in err
    assert list(data.iterdir()) == []


def test_a_temporary_folder_left_by_a_killed_process_is_removed_on_the_next_run(tmp_path: Path) -> None:
    import socket
    import subprocess

    fake = write_fake_fashion_mnist(tmp_path / "fm")
    data = tmp_path / "data"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = data / f".m.tmp-{socket.gethostname()}-{dead.pid}-0badc0de"
    (stale / "train").mkdir(parents=True)
    elsewhere = data / ".m.tmp-another-host-1-0badc0de"  # maybe alive on another host: kept
    elsewhere.mkdir()
    assert main(["prepare", "mosaic", "--out", str(data / "m"), "--fashion-mnist", str(fake), *TINY]) == 0
    assert sorted(p.name for p in data.iterdir()) == sorted(["m", elsewhere.name])


def test_max_side_downsizes_large_images_only(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from tests._data_trees import rows

    listing = write_generic_csv(tmp_path / "src" / "list.csv", [("big.jpg", "cat"), ("small.jpg", "dog")])
    Image.new("RGB", (300, 200), (200, 30, 30)).save(listing.parent / "big.jpg", quality=95)
    small = (listing.parent / "small.jpg").read_bytes()
    out = tmp_path / "data"
    argv = ["prepare", "generic", "--train", str(listing), "--out", str(out), "--max-side", "100", "--no-progress"]
    assert main(argv) == 0
    stored = {row["id"]: row["image"] for row in rows(out, "train")}
    with Image.open(io.BytesIO(stored["big.jpg"])) as img:
        assert (img.format, img.size) == ("JPEG", (100, 67))
    assert stored["small.jpg"] == small  # already small enough: the original bytes
    assert read_manifest(out)["max_side"] == 100
