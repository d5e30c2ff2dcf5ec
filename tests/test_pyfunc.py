"""The MLflow model of a trained network (``jobs.inference.pyfunc``): it answers as ``salgl predict``.

Unit tests (seconds, in process): a model saved to a folder loads with ``mlflow.pyfunc.load_model``
and predicts bytes, base64 and file paths as ``predict_files`` does; ``load_for_inference`` reads
it back; a pickled model of the older format is refused without the opt-in. Integration tests
(subprocesses): the model loads where the checkout is not on the path, with the code it ships, and
``mlflow models serve`` answers an HTTP request with what ``salgl predict`` writes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.cli import main
from jobs.inference.loading import ALLOW_PICKLED_ENV, load_for_inference, score_images
from jobs.inference.predict import predict_files
from jobs.inference.pyfunc import REQUIREMENTS, log_checkpoint_model, save_salgl_model
from salgl.errors import UsageError
from tests._servers import free_port, stop_server, wait_until_answering
from tests._tiny_checkpoint import write_tiny_checkpoint
from tests._data_trees import noise_pngs

VOCABULARY = [f"label_{i}" for i in range(10)]
ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"threshold": 0.505, "top_k": 3}  # not the defaults; the tiny model scores 0.48-0.52, so it splits the labels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", VOCABULARY))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return noise_pngs(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory, checkpoint: str) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model"
    save_salgl_model(path, *load_for_inference(checkpoint))
    return path


def expected_records(checkpoint: str, paths: list[Path]) -> list[dict]:
    """What ``salgl predict`` computes for the files (its own function, from the checkpoint)."""
    model, cfg, vocabulary = load_for_inference(checkpoint)
    return list(predict_files(model, cfg.data, vocabulary, paths, progress=False, **PARAMS))


def without_path(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "path"}


# ---------------------------------------------------------------------------------------------
# Unit


def test_loaded_model_predicts_bytes_base64_and_paths_as_predict_does(saved_model: Path, checkpoint: str, images: list[Path]) -> None:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(saved_model))
    data = [images[0].read_bytes(), base64.b64encode(images[1].read_bytes()).decode(), str(images[1]), "bm90IGFuIGltYWdl"]
    got = model.predict(pd.DataFrame({"image": data}), params=PARAMS)
    expected = expected_records(checkpoint, images)
    assert got[:2] == [without_path(r) for r in expected]  # same code, same tensors: the same rounded numbers
    assert got[2] == expected[1] and got[2]["path"] == str(images[1])
    assert got[3] == {"error": "UnidentifiedImageError: cannot identify image file"}  # base64 of "not an image"
    assert got[0]["labels"] and len(got[0]["labels"]) < len(VOCABULARY)  # the threshold splits the labels
    assert all(s >= PARAMS["threshold"] for s in got[0]["scores"]) and got[0]["scores"] == sorted(got[0]["scores"], reverse=True)


def test_saved_model_carries_code_weights_and_pinned_requirements(saved_model: Path) -> None:
    from mlflow.models import Model

    meta = Model.load(str(saved_model))
    flavor = meta.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code: no cloudpickle
    assert not list(saved_model.rglob("*.pkl")) and not list(saved_model.rglob("*.pt"))
    assert sorted(flavor["artifacts"]) == ["config", "weights"]
    assert {p.name for p in (saved_model / "code").iterdir()} == {"salgl", "pipeline", "jobs"}
    assert not list((saved_model / "code").rglob("__pycache__"))
    assert [c.name for c in meta.signature.inputs.inputs] == ["image"] and meta.signature.params is not None
    assert (saved_model / "serving_input_example.json").is_file()
    requirements = (saved_model / "requirements.txt").read_text().split()
    assert not any(r.split("==")[0] == "salgl" for r in requirements)
    from importlib.metadata import version

    assert {f"{name}=={version(name)}" for name in (*REQUIREMENTS, "mlflow")} <= set(requirements)


def test_salgl_commands_load_the_saved_folder_with_its_config(saved_model: Path, checkpoint: str) -> None:
    reference, cfg, vocabulary = load_for_inference(checkpoint)
    loaded, loaded_cfg, loaded_vocabulary = load_for_inference(str(saved_model))
    assert loaded_vocabulary == vocabulary and loaded_cfg == cfg
    batch = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
    for got, want in zip(score_images(loaded, batch), score_images(reference, batch)):
        np.testing.assert_array_equal(got, want)
    torch.testing.assert_close(loaded.head.counts, reference.head.counts, rtol=0, atol=0)


def test_pickled_model_needs_the_opt_in(tmp_path: Path, checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    model, _, vocabulary = load_for_inference(checkpoint)
    old = tmp_path / "old_model"  # the format salgl logged before the pyfunc
    mlflow.pytorch.save_model(model, str(old), serialization_format="pickle", pip_requirements=["torch"],
                              metadata={"vocabulary": vocabulary})
    monkeypatch.delenv(ALLOW_PICKLED_ENV, raising=False)
    with pytest.raises(UsageError, match=f"{ALLOW_PICKLED_ENV}=1"):
        load_for_inference(str(old))
    assert main(["predict", str(old), str(tmp_path), "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 2
    monkeypatch.setenv(ALLOW_PICKLED_ENV, "1")
    with pytest.warns(UserWarning, match="unpickling"):
        loaded, _, loaded_vocabulary = load_for_inference(str(old))
    assert loaded_vocabulary == vocabulary
    torch.testing.assert_close(loaded.head.counts, model.head.counts, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Integration

PROBE = """
import json, sys
sys.path.append(sys.argv[2])  # the environment's packages, without its .pth files (the editable checkout)
try:
    import salgl
    sys.exit("salgl is importable before the model loads: " + salgl.__file__)
except ImportError:
    pass
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import jobs.inference.pyfunc, pipeline.transforms, salgl.model
files = [m.__file__ for m in (salgl.model, pipeline.transforms, jobs.inference.pyfunc)]
images = [open(p, "rb").read() for p in sys.argv[3:]]
print(json.dumps({"files": files, "records": model.predict(pd.DataFrame({"image": images}), params=json.loads(%r))}))
"""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_model_loads_with_its_own_code_where_salgl_is_not_installed(saved_model: Path, checkpoint: str, images: list[Path], tmp_path: Path) -> None:
    """``-I -S``: no current directory, PYTHONPATH, user site or .pth files, so the editable install
    of this checkout is invisible; the environment's site-packages give torch, mlflow and the rest."""
    site = sysconfig.get_paths()["purelib"]
    probe = PROBE % json.dumps(PARAMS)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(saved_model), site, *map(str, images)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(saved_model / "code") for f in out["files"]), out["files"]
    assert out["records"] == [without_path(r) for r in expected_records(checkpoint, images)]


@pytest.fixture
def logged_run(tmp_path: Path, checkpoint: str) -> tuple[str, str]:
    """(tracking URI, run id) of a sqlite store whose run logged the checkpoint's model as training does."""
    from jobs.tracking import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "salgl-serve-test", run_name="train", params={}, artifact_root=str(tmp_path / "mlruns"))
    log_checkpoint_model(checkpoint, uri, run_id)
    return uri, run_id


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_served_model_answers_as_salgl_predict(logged_run: tuple[str, str], checkpoint: str, images: list[Path], tmp_path: Path) -> None:
    uri, run_id = logged_run
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": uri}
    # The server runs `uvicorn` by name: this environment's scripts first, as an activated venv has them.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the model's own code and artifacts only
    elsewhere.mkdir()
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", server, timeout=240)
        rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}, "params": PARAMS}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    except Exception:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-5000:])
        raise
    finally:
        stop_server(server, group=True)  # the server and the uvicorn worker it started
        log.close()

    out = tmp_path / "predictions.jsonl"
    args = ["predict", checkpoint, *map(str, images), "--out", str(out), "--threshold", str(PARAMS["threshold"]),
            "--top-k", str(PARAMS["top_k"]), "--no-progress"]
    assert main(args) == 0
    expected = [without_path(json.loads(line)) for line in out.read_text().splitlines()]
    assert len(served) == len(expected) == 2
    for got, want in zip(served, expected):
        assert got["labels"] == want["labels"] and got["scene"] == want["scene"]
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        np.testing.assert_allclose([t["score"] for t in got["top_k"]], [t["score"] for t in want["top_k"]], atol=1e-5)
        assert got["scene_probability"] == pytest.approx(want["scene_probability"], abs=1e-5)
