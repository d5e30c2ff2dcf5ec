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
