"""Model environment check: does a logged model's own environment install, and serve as ``salgl predict``?

    .venv/bin/python -m tests.bench.model_env [--env-manager uv] [--out bench_out/model_env.json]

Saves the MLflow model of a tiny checkpoint as every run logs it, then serves it the way a user on
another machine would: ``mlflow models serve --env-manager uv`` (or ``virtualenv``, which needs
pyenv) builds a new virtual environment from the model's ``python_env.yaml`` and pinned
``requirements.txt``, from the package index. salgl is not installed there: the model's code is
its own ``code/`` folder. Two images are POSTed; the answers must equal ``salgl predict``'s on the
same files (scores to 1e-5).

Not a test: it downloads and installs several GB (torch and its CUDA libraries) from the package
index. The environment goes into a temporary ``MLFLOW_ENV_ROOT`` and is removed afterwards; the
installer's cache (``~/.cache/uv``) stays. Exit status 0 when the answers are equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests._data_trees import noise_pngs
from tests._servers import free_port, stop_server, wait_until_answering
from tests._tiny_checkpoint import write_tiny_checkpoint

VOCABULARY = [f"label_{i}" for i in range(10)]
PARAMS = {"threshold": 0.505, "top_k": 3}  # not the defaults, so the params travel
SHIPPED = ("salgl", "jobs", "pipeline")
INSTALL_TIMEOUT_S = 1800


def saved_model(folder: Path) -> tuple[Path, Path]:
    """(model folder, checkpoint) of a tiny model, saved as ``salgl train`` logs it."""
    from jobs.inference.loading import load_for_inference
    from jobs.inference.pyfunc import save_salgl_model

    checkpoint = write_tiny_checkpoint(folder / "checkpoint_000001", VOCABULARY)
    save_salgl_model(folder / "model", *load_for_inference(str(checkpoint)))
    return folder / "model", checkpoint


def serve_in_new_environment(model: Path, env_root: Path, env_manager: str, log: Path) -> tuple[subprocess.Popen, str, float]:
    """Start ``mlflow models serve`` in an environment of its own; (process, URL, seconds until it answered)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_ENV_ROOT": str(env_root)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # mlflow and uv of this venv
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", env_manager,
           "--host", "127.0.0.1", "--port", str(port)]
    print(f"model_env: {' '.join(cmd[2:])} (building the environment: minutes; log {log})", flush=True)
    started = time.monotonic()
    server = subprocess.Popen(cmd, cwd=env_root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_answering(f"http://127.0.0.1:{port}/ping", server, timeout=INSTALL_TIMEOUT_S)
    return server, f"http://127.0.0.1:{port}", time.monotonic() - started


def post_images(url: str, images: list[Path]) -> list[dict[str, Any]]:
    rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}, "params": PARAMS}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


def largest_score_difference(served: list[dict], wanted: list[dict]) -> float:
    """The largest score difference; infinite where labels, order or scenes differ."""
    worst = 0.0
    for got, want in zip(served, wanted, strict=True):
        if got["labels"] != want["labels"] or got["scene"] != want["scene"]:
            return float("inf")
        pairs = [*zip(got["scores"], want["scores"]), (got["scene_probability"], want["scene_probability"])]
        worst = max(worst, *(abs(a - b) for a, b in pairs))
    return worst


def environment_facts(env_root: Path) -> dict[str, Any]:
    """Size of the built environment, and whether any of salgl's packages was installed into it."""
    (env,) = [p for p in env_root.iterdir() if p.is_dir() and p.name.startswith("mlflow-")]
    (site,) = env.glob("lib/python*/site-packages")
    size = sum(f.stat().st_size for f in env.rglob("*") if f.is_file() and not f.is_symlink())
    installed = sorted(p.name for p in site.iterdir() if p.name.split("-")[0] in SHIPPED or p.name.startswith("salgl"))
    return {"environment_gib": round(size / 2**30, 2), "salgl_packages_installed": installed}


def run_check(env_manager: str) -> dict[str, Any]:
    from jobs.inference.loading import load_for_inference
    from jobs.inference.predict import predict_files

    here = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if env_manager == "uv" and shutil.which("uv", path=here) is None:
        raise SystemExit("model_env: uv is not installed here (pip install uv, or --env-manager virtualenv with pyenv)")
    with tempfile.TemporaryDirectory(prefix="salgl-model-env-") as tmp:
        folder = Path(tmp)
        model, checkpoint = saved_model(folder)
        images = noise_pngs(folder)
        requirements = (model / "requirements.txt").read_text().split()
        env_root = folder / "envs"
        env_root.mkdir()
        server, url, ready_s = serve_in_new_environment(model, env_root, env_manager, folder / "serve.log")
        try:
            served = post_images(url, images)
        finally:
            stop_server(server, group=True)  # the server and the uvicorn worker it started
        loaded = load_for_inference(str(checkpoint))
        wanted = [{k: v for k, v in r.items() if k != "path"}
                  for r in predict_files(loaded.model, loaded.cfg.data, loaded.vocabulary, images, progress=False, **PARAMS)]
        difference = largest_score_difference(served, wanted)
        return {
            "env_manager": env_manager,
            "python": platform.python_version(),
            "requirements": requirements,
            "seconds_until_serving": round(ready_s, 1),
            **environment_facts(env_root),
            "images": len(images),
            "largest_score_difference": difference,
            "equal_to_salgl_predict": difference <= 1e-5,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-manager", choices=["uv", "virtualenv"], default="uv")
    parser.add_argument("--out", type=Path, default=Path("bench_out/model_env.json"))
    args = parser.parse_args()
    result = run_check(args.env_manager)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'measure':<28} value")
    for key in ("env_manager", "python", "seconds_until_serving", "environment_gib", "salgl_packages_installed",
                "largest_score_difference", "equal_to_salgl_predict"):
        print(f"{key:<28} {result[key]}")
    print(f"model_env: wrote {args.out}")
    return 0 if result["equal_to_salgl_predict"] and not result["salgl_packages_installed"] else 1


if __name__ == "__main__":
    sys.exit(main())
