"""Bad inputs a user can hand to ``salgl``, one row each: the exit code, the one-line message, and
that nothing was lost or half-written (every file under the test's folder is still there, byte for
byte, and no new one appeared).

Cases that need Ray or a signal live beside the code they exercise: a run whose weights stop being
finite (tests/test_train_stops.py), SIGTERM / SIGHUP during ``prepare``
(tests/test_convert_cli.py), a damaged checkpoint set aside on resume
(tests/test_train_integration.py), rows unsafe to read (tests/test_cli_errors.py), and what
``salgl submit`` never uploads (tests/test_submit.py).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from jobs.cli import main
from jobs.training.checkpoints import CONFIG_FILE, STATE_FILE
from tests._data_trees import photo_jpeg, write_generic_csv
from tests._tiny_checkpoint import make_mosaic, write_tiny_checkpoint


@dataclass(frozen=True)
class BadInput:
    make: Callable[[Path], list[str]]  # builds the inputs under a folder, returns the command's arguments
    code: int  # 2: the request cannot run as given; 1: the work failed
    message: str  # the start of what follows "salgl CMD: error: " ({tmp} is the folder)


# ------------------------------------------------------------------------------ inputs


def _listing(tmp: Path) -> Path:
    return write_generic_csv(tmp / "src" / "list.csv", [("a.jpg", "cat"), ("b.jpg", "dog|cat")])


def _csv(tmp: Path, labels: str) -> Path:
    src = tmp / "src"
    src.mkdir(parents=True)
    for n, name in enumerate(["a.jpg", "b.jpg"]):
        (src / name).write_bytes(photo_jpeg(n))
    (src / "list.csv").write_text(f"path,labels\na.jpg,{labels}\nb.jpg,cat\n")
    return src / "list.csv"


def _prepare(listing: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "generic", "--train", str(listing), "--out", str(out), "--no-progress", *extra]


def _foreign_folder(tmp: Path) -> list[str]:
    (tmp / "home" / "notes").mkdir(parents=True)
    (tmp / "home" / "notes" / "keep.txt").write_text("mine")
    return _prepare(_listing(tmp), tmp / "home", "--overwrite")


def _altered_checkpoint(tmp: Path) -> list[str]:
    folder = write_tiny_checkpoint(tmp / "checkpoint", ["a", "b"])
    data = bytearray((folder / STATE_FILE).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(255 - b for b in data[len(data) // 2 : len(data) // 2 + 4096])
    (folder / STATE_FILE).write_bytes(bytes(data))  # same size, other bytes
    (tmp / "img.jpg").write_bytes(photo_jpeg(0))
    return ["predict", str(folder), str(tmp / "img.jpg"), "--out", str(tmp / "predictions.jsonl")]


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _code_in_checkpoint(tmp: Path) -> list[str]:
    import torch

    (tmp / "checkpoint").mkdir()
    torch.save({"model": _Payload(tmp / "ran")}, tmp / "checkpoint" / STATE_FILE, pickle_module=pickle)
    (tmp / "checkpoint" / CONFIG_FILE).write_text('{"config": {}, "vocabulary": ["a"]}')
    return ["inspect", str(tmp / "checkpoint"), "--out", str(tmp / "pictures")]


def _not_a_checkpoint(tmp: Path) -> list[str]:
    (tmp / "checkpoint").mkdir()
    (tmp / "checkpoint" / STATE_FILE).write_bytes(b"not a torch file")
    (tmp / "checkpoint" / CONFIG_FILE).write_text('{"config": {}, "vocabulary": ["a"]}')
    return ["inspect", str(tmp / "checkpoint"), "--out", str(tmp / "pictures")]


def _shard(tmp: Path, damage: Callable[[bytes], bytes]) -> list[str]:
    data = Path(make_mosaic(tmp / "data"))
    shard = next((data / "train").glob("*.parquet"))
    shard.write_bytes(damage(shard.read_bytes()))
    return ["train", "tiny", f"data.path={data}", f"run.storage={tmp / 'runs'}"]


def _flip_one_byte(data: bytes) -> bytes:
    return data[:8] + bytes([data[8] ^ 0xFF]) + data[9:]  # the footer still reads: only the sha256 tells


def _big_upload(tmp: Path) -> list[str]:
    (tmp / "wd" / "checkpoints").mkdir(parents=True)
    (tmp / "wd" / "checkpoints" / "big.pt").write_bytes(b"\0" * (3 << 20))
    (tmp / "wd" / "train.py").write_text("print('hi')")
    return ["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(tmp / "wd"), "--max-upload-mib", "2",
            "--", "train", "tiny"]


def _home_upload(tmp: Path) -> list[str]:
    return ["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(tmp), "--", "train", "tiny"]


CASES: dict[str, BadInput] = {
    # --overwrite replaces only a dataset this project wrote, never its own inputs
    "overwrite-the-inputs-folder": BadInput(
        lambda t: _prepare(_listing(t), t / "src", "--overwrite"), 2, "--out {tmp}/src holds the input"),
    "overwrite-a-folder-above-the-inputs": BadInput(
        lambda t: _prepare(_listing(t), t, "--overwrite"), 2, "--out {tmp} holds the input"),
    "overwrite-a-folder-that-is-no-dataset": BadInput(_foreign_folder, 2, "--overwrite replaces only a dataset"),
    # checkpoints: verified against meta.json, tensors only
    "checkpoint-altered-in-place": BadInput(
        _altered_checkpoint, 1, "checkpoint refused: {tmp}/checkpoint/state.pt differs from the sha256"),
    "checkpoint-that-would-run-code": BadInput(_code_in_checkpoint, 1, "{tmp}/checkpoint/state.pt holds an object of"),
    "checkpoint-that-is-no-torch-file": BadInput(
        _not_a_checkpoint, 1, "{tmp}/checkpoint/state.pt cannot be read as a checkpoint"),
    # numbers: finite and in range, refused before anything starts
    "config-lr-negative": BadInput(lambda t: ["train", "tiny", "optim.lr=-1"], 2, "optim.lr: "),
    "config-lr-inf": BadInput(lambda t: ["train", "tiny", "optim.lr=inf"], 2, "optim.lr: "),
    "config-lr-nan": BadInput(lambda t: ["train", "tiny", "optim.lr=nan"], 2, "optim.lr: "),
    "config-entropy-weight-minus-inf": BadInput(
        lambda t: ["train", "tiny", "loss.entropy_weight=-inf"], 2, "loss.entropy_weight: "),
    "config-epochs-overflow": BadInput(lambda t: ["train", "tiny", "optim.epochs=1e999"], 2, "optim.epochs: "),
    # generic lists
    "labels-comma-separated-in-quotes": BadInput(
        lambda t: _prepare(_csv(t, '"cat,dog"'), t / "data"), 2, "1 inferred label name(s) hold a comma, e.g. 'cat,dog': if the labels are separated by it, pass --label-sep ','"),
    "labels-space-separated": BadInput(lambda t: _prepare(_csv(t, "cat dog"), t / "data"), 2,
        "1 inferred label name(s) hold a space, e.g. 'cat dog': if the labels are separated by it, pass --label-sep space"),
    "list-is-a-folder": BadInput(lambda t: _prepare(t, t / "data"), 2, "{tmp}"),
    "list-not-utf8": BadInput(
        lambda t: (t.joinpath("l.csv").write_bytes("path,labels\nä.jpg,cat\n".encode("latin-1")), _prepare(t / "l.csv", t / "d"))[1],
        2, "{tmp}/l.csv"),
    # shards: checked against the manifest before Ray starts
    "shard-altered": BadInput(lambda t: _shard(t, _flip_one_byte), 1, "{tmp}/data/train/"),
    "shard-truncated": BadInput(lambda t: _shard(t, lambda d: d[: len(d) // 2]), 1, "{tmp}/data/train/"),
    # runs and jobs
    "resume-in-the-storage-given": BadInput(
        lambda t: ["train", "--resume", "a-run", f"run.storage={t / 'elsewhere'}"], 2, "no salgl run named 'a-run' (looked for salgl_run.json in a-run and {tmp}/elsewhere/a-run)"),
    "submit-a-home-folder": BadInput(_home_upload, 2, "the job would upload {tmp}, which holds your home folder"),
    "submit-a-folder-over-the-size-limit": BadInput(
        _big_upload, 2, "the job would upload 3 MiB from {tmp}/wd (largest: checkpoints/big.pt (3 MiB), train.py (0 MiB)), "
        "over --max-upload-mib 2"),
}


# ------------------------------------------------------------------------------ the check


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the cache aside) with the sha256 of its bytes; FIFOs and links as such."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith("cache"):
            continue
        if path.is_file() and not path.is_symlink():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif not path.is_dir():
            out[rel] = "special"
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_one_line_with_its_exit_code_and_loses_nothing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the shard-checksum cache
    monkeypatch.setenv("HOME", str(tmp_path))
    row = CASES[case]
    argv = row.make(tmp_path)
    before = _files(tmp_path)
    capsys.readouterr()

    assert main(argv) == row.code
    err = capsys.readouterr().err
    expected = f"salgl {argv[0]}: error: " + row.message.format(tmp=tmp_path)
    assert err.startswith(expected), f"\n{err}\nexpected to start with\n{expected}"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _files(tmp_path) == before, "a refused request changed or added files"
