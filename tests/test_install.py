"""A wheel of the project, installed into a fresh virtual environment, works from any directory:
`salgl --version`, and the bundled run configs resolve as package data (not from a checkout).

No network: the wheel is built without build isolation (this environment's setuptools) and
installed without dependencies; the one dependency the config loader needs, PyYAML, is lent
from this environment through PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_an_installed_wheel_has_its_configs_and_version(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree (build/), not in this checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("salgl", "pipeline", "jobs"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("salgl-*.whl")
    venv.create(tmp_path / "fresh", with_pip=True)
    python = tmp_path / "fresh" / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    lent = tmp_path / "lent"  # PyYAML alone, not this environment's site-packages (which hold the checkout)
    lent.mkdir()
    (lent / "yaml").symlink_to(Path(yaml.__file__).parent)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(lent), "HOME": str(tmp_path)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    from jobs.cli import project_version

    assert _run(tmp_path / "fresh" / "bin" / "salgl", "--version", cwd=elsewhere, env=env).strip() == f"salgl {project_version()}"
    probe = ("import json, jobs.cli.train as t; "
             "print(json.dumps([str(t.DEFAULT_CONFIG), t.load_config_file(None), t.load_config_file('tiny')]))")
    import json

    where, default, tiny = json.loads(_run(python, "-c", probe, cwd=elsewhere, env=env))
    assert str(tmp_path / "fresh") in where and str(ROOT) not in where  # the installed copy, not this checkout
    assert default == yaml.safe_load((ROOT / "jobs" / "configs" / "default.yaml").read_text())
    assert tiny["preset"] == "tiny"
