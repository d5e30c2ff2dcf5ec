"""``jobs.training.run_start`` and ``jobs.training.dataset``: a run reads its dataset's manifest
once as it starts and hands the facts on; the ingest streams built from them read it no more.
No Ray: the cluster is stubbed (the run itself is tests/test_train_integration.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.shards import read_manifest, shards_digest
from salgl.config import preset


def test_the_dataset_facts_are_the_manifest_s(mosaic_dir: str) -> None:
    from jobs.training.dataset import read_dataset

    manifest = read_manifest(mosaic_dir)
    facts = read_dataset(mosaic_dir)
    assert facts.location == mosaic_dir
    assert list(facts.vocabulary) == manifest["vocabulary"] and facts.num_labels == len(manifest["vocabulary"])
    assert facts.train_rows == manifest["splits"]["train"]["rows"]
    assert facts.split_rows == {name: split["rows"] for name, split in manifest["splits"].items()}
    assert facts.digest == shards_digest(manifest)


def test_a_new_run_reads_its_manifest_once_and_its_streams_not_again(
    mosaic_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    import jobs.training.run_start as run_start
    import pipeline.shards as shards
    from jobs.training.run_folder import RUN_FILE, storage_root
    from pipeline.ingest import chunk_table, num_labels

    readers: list[str] = []
    real = shards.read_manifest

    def counted(root):  # the module that asked; pipeline.shards' own checks (verify_shards) aside
        readers.append(sys._getframe(1).f_globals["__name__"])
        return real(root)

    monkeypatch.setattr(shards, "read_manifest", counted)
    monkeypatch.setattr(run_start, "init_ray", lambda address=None: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = preset("tiny", {"data.path": mosaic_dir, "run.storage": str(tmp_path / "runs"),
                          "run.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run.workers": 1})
    run = run_start.start_new_run(cfg, storage_root(cfg), address=None, resource_share=1.0, naming=run_start.MlflowNaming())
    assert [name for name in readers if name != "pipeline.shards"] == ["jobs.training.dataset"]
    assert json.loads(run.run_dir.read_text(RUN_FILE))["data_digest"] == run.dataset.digest

    readers.clear()
    given = {split: chunk_table(mosaic_dir, split, manifest=run.dataset.manifest) for split in ("train", "test")}
    assert num_labels(mosaic_dir, run.dataset.manifest) == run.dataset.num_labels
    from jobs.training.scene_mixture import fit_run_mixture

    fit_run_mixture(mosaic_dir, preset("tiny", {"K": 2, "model.head.mixture_restarts": 1}), run.dataset.manifest)
    assert readers == []  # the streams and the label mixture take the run's manifest
    assert given == {split: chunk_table(mosaic_dir, split) for split in ("train", "test")}
