"""`salgl submit` / `salgl jobs` without a cluster: address, token, runtime env, arguments, errors.

The real submission to a 2-node cluster is tests/test_submit_integration.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from jobs.submission import client as sj
from jobs.resources import WORKER_ALLOCATOR_ENV
from jobs.cli import main
from salgl.config import ConfigError, preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("address, env, expected", [
    (None, {}, "http://127.0.0.1:8265"),
    ("http://head:8265/", {}, "http://head:8265"),
    ("head:9000", {}, "http://head:9000"),
    ("ray://head:10001", {}, "http://head:8265"),
    (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "http://10.0.0.5:8265"),
    (None, {"RAY_ADDRESS": "ray://10.0.0.5:10001"}, "http://10.0.0.5:8265"),
    (None, {"RAY_ADDRESS": "https://ray.example.com"}, "https://ray.example.com"),
    (None, {"RAY_ADDRESS": "auto"}, "http://127.0.0.1:8265"),
    (None, {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "b:6379"}, "http://a:1"),
    ("http://x:1", {"RAY_ADDRESS": "b:6379"}, "http://x:1"),
])
def test_dashboard_address(address, env, expected) -> None:
    assert sj.dashboard_address(address, env) == expected


def test_token_lookup_follows_rays_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "t"
    path_file.write_text("from-path")
    explicit = tmp_path / "explicit"
    explicit.write_text("from-flag")
    env = {"HOME": str(home)}
    assert sj.find_token(None, env) == sj.Token("from-home", "~/.ray/auth_token")
    assert sj.find_token(None, {**env, "RAY_AUTH_TOKEN_PATH": str(path_file)}).value == "from-path"
    assert sj.find_token(None, {**env, "RAY_AUTH_TOKEN_PATH": str(path_file), "RAY_AUTH_TOKEN": "x"}).value == "x"
    assert sj.find_token(str(explicit), {**env, "RAY_AUTH_TOKEN": "x"}).value == "from-flag"
    assert sj.find_token(None, {"HOME": str(tmp_path / "nobody")}) is None
    with pytest.raises(sj.SubmitError, match="--token-file"):
        sj.find_token(str(tmp_path / "missing"), env)
    assert sj.auth_headers(sj.Token("abc", "x")) == {"Authorization": "Bearer abc"}
    assert sj.auth_headers(None) == {}


def test_auth_messages_say_where_the_token_came_from_and_how_to_fix_it() -> None:
    missing = sj.auth_failure_message("http://h:8265", None)
    assert "none was found" in missing and "--token-file" in missing and "ray get-auth-token" in missing
    rejected = sj.auth_failure_message("http://h:8265", sj.Token("t", "RAY_AUTH_TOKEN"))
    assert "rejected the token from RAY_AUTH_TOKEN" in rejected


def test_env_forwards_tracking_uri_and_refuses_a_ray_address() -> None:
    env = sj.parse_env(["A=1", "B=x=y"], {"MLFLOW_TRACKING_URI": "http://m:5000", "OTHER": "no"})
    assert env == {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": "http://m:5000", "A": "1", "B": "x=y"}
    assert sj.parse_env(["MLFLOW_TRACKING_URI=http://n:1"], {"MLFLOW_TRACKING_URI": "http://m:5000"})["MLFLOW_TRACKING_URI"] == "http://n:1"
    with pytest.raises(sj.SubmitError, match="KEY=VALUE"):
        sj.parse_env(["novalue"], {})
    with pytest.raises(sj.SubmitError, match="--address"):
        sj.parse_env(["RAY_ADDRESS=h:6379"], {})


def test_runtime_env_uploads_the_project_without_data_and_pip_only_when_asked() -> None:
    env = sj.runtime_env(ROOT, {"K": "V"})
    assert env["working_dir"] == str(ROOT) and env["env_vars"] == {**WORKER_ALLOCATOR_ENV, "K": "V"} and "pip" not in env
    mine = {"MALLOC_TRIM_THRESHOLD_": "0"}
    assert sj.runtime_env(ROOT, mine)["env_vars"]["MALLOC_TRIM_THRESHOLD_"] == "0"  # the user's --env wins
    for pattern in (".venv", ".git", "/data/", "/runs/", "/mlruns/", "*.db"):
        assert pattern in env["excludes"]
    pins = sj.pinned_requirements(ROOT / "pyproject.toml")
    assert "ray[default,data,serve,train,tune]==2.60.0" in pins and "torch==2.14.1" in pins
    assert sj.runtime_env(ROOT, {}, pins)["pip"]["packages"] == pins


def test_requirements_file_skips_comments(tmp_path: Path) -> None:
    file = tmp_path / "req.txt"
    file.write_text("# pins\ntorch==2.14.1  # cpu\n\nmlflow==3.17.2\n")
    assert sj.read_requirements(file) == ["torch==2.14.1", "mlflow==3.17.2"]


def test_a_local_config_travels_relative_to_the_working_dir(tmp_path: Path) -> None:
    tiny = ROOT / "jobs" / "configs" / "tiny.yaml"
    assert sj.localize_config([str(tiny), "a=1"], ROOT) == ["jobs/configs/tiny.yaml", "a=1"]
    assert sj.localize_config(["tiny", "a=1"], ROOT) == ["tiny", "a=1"]  # bundled name: untouched
    assert sj.localize_config(["a=1"], ROOT) == ["a=1"]
    outside = tmp_path / "mine.yaml"
    outside.write_text("preset: tiny\n")
    with pytest.raises(sj.SubmitError, match="outside the uploaded folder"):
        sj.localize_config([str(outside)], ROOT)


def test_relative_storage_paths_are_flagged() -> None:
    warnings = sj.local_path_warnings(["run.storage=runs", "data.path=/shared/d", "run.storage=s3://b/r", "x=y"])
    assert len(warnings) == 1 and warnings[0].startswith("run.storage=runs")


def test_entrypoint_runs_the_uploaded_cli() -> None:
    line = sj.entrypoint("train", ["jobs/configs/tiny.yaml", "run.name=a b"])
    assert line == "python -m jobs.cli train jobs/configs/tiny.yaml 'run.name=a b'"
    with pytest.raises(sj.SubmitError, match="cannot submit"):
        sj.entrypoint("submit", [])
    assert sj.exit_code("SUCCEEDED") == 0 and sj.exit_code("FAILED") == sj.exit_code("STOPPED") == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit"]) == 2
    assert "name what to run" in capsys.readouterr().err
    assert main(["submit", "--", "predict", "x"]) == 2
    assert "cannot submit 'predict'" in capsys.readouterr().err
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["submit", "--address", address, "--", "train", "tiny"]) == 2
    assert f"no Ray dashboard answers at {address}" in capsys.readouterr().err
    assert main(["jobs", "list", "--address", address]) == 2
    assert "no Ray dashboard" in capsys.readouterr().err


def test_placement_strategy_is_validated() -> None:
    assert preset("tiny").run.placement_strategy == "PACK"
    assert preset("tiny", {"run.placement_strategy": "SPREAD"}).run.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="run.placement_strategy"):
        preset("tiny", {"run.placement_strategy": "spread"})


def test_secrets_never_travel_with_the_job(tmp_path: Path) -> None:
    """What Ray's own packaging (ray 2.60.0, ``packaging.create_package``) zips from a working
    directory with the job's excludes: the code, never keys, tokens or env files."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    secrets = [".env", ".env.local", "id_rsa", "id_ed25519.pub", ".ray/auth_token", "certs/server.pem",
               ".aws/credentials", "deploy.key", ".netrc", "creds/credentials.json"]
    kept = ["jobs/configs/tiny.yaml", "salgl/token_encoder.py", "my.yaml", "notes/secret_sauce.md"]
    for name in secrets + kept:
        (tmp_path / "wd" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "wd" / name).write_text("x")
    env = sj.runtime_env(tmp_path / "wd", {})
    create_package(str(tmp_path / "wd"), tmp_path / "job.zip", include_gitignore=True, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(tmp_path / "job.zip").namelist() if not n.endswith("/")}
    assert names == set(kept)


def test_an_installed_salgl_ships_its_packages_not_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a wheel install (no checkout) run in a home folder: the job gets a copy of the installed
    packages and the local config, zipped as Ray zips a working directory (ray 2.60.0)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"x")
    (tmp_path / "my.yaml").write_text("preset: tiny\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sj, "project_root", lambda: None)

    def runtime_env(working_dir: Path, env_vars, pip=()):
        env = real_runtime_env(working_dir, env_vars, pip)
        create_package(str(working_dir), tmp_path / "job.zip", include_gitignore=True, excludes=env["excludes"])
        return env

    def connect(address, token_file):
        raise sj.SubmitError("stop before contacting a cluster")

    real_runtime_env = sj.runtime_env
    monkeypatch.setattr(sj, "runtime_env", runtime_env)
    monkeypatch.setattr(sj, "connect", connect)
    assert main(["submit", "--", "train", "my.yaml", "K=2"]) == 2
    names = {n for n in zipfile.ZipFile(tmp_path / "job.zip").namelist() if not n.endswith("/")}
    assert {"jobs/cli/__init__.py", "salgl/model.py", "pipeline/ingest.py", "my.yaml"} <= names
    assert not {".env", "photos/me.jpg"} & names and not any("__pycache__" in n for n in names)


def test_an_upload_is_sized_as_ray_packages_it(tmp_path: Path) -> None:
    """Files that .rayignore (or the excludes) leave out do not count towards --max-upload-mib."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "state.pt").write_bytes(b"\0" * (2 << 20))  # excluded: /runs/
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "big.bin").write_bytes(b"\0" * (2 << 20))
    excludes = sj.runtime_env(tmp_path, {})["excludes"]
    with pytest.raises(sj.SubmitError, match="largest: scratch/big.bin"):
        sj.check_upload_size(tmp_path, excludes, 1)
    (tmp_path / ".rayignore").write_text("scratch/\n")
    sj.check_upload_size(tmp_path, excludes, 1)
