"""The config tree: presets, flattening round trip, overrides, errors that name the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from salgl.config import Config, ConfigError, from_flat, load, parse_overrides, preset, to_flat, with_overrides


def test_flat_round_trip_through_json_strings() -> None:
    cfg = preset("official", {"K": 4, "optim.lr": 3e-4})
    flat = to_flat(cfg)
    assert flat["model.head.num_scenes"] == 4 and flat["model.head.message"] == "both"
    as_strings = {k: str(v) for k, v in json.loads(json.dumps(flat)).items()}  # MLflow params are strings
    assert from_flat(as_strings) == cfg


def test_presets_differ_only_in_numbers() -> None:
    paper, official = preset("paper"), preset("official")
    assert paper.model.head.message == "out" and not paper.model.head.self_loops
    assert official.model.head.token_encoder and official.loss.reduction == "released"
    assert official.loss.balance_scale == 100.0
    assert preset("tiny").model.backbone.name == "test_resnet"


def test_aliases_and_cli_overrides() -> None:
    cfg = with_overrides(Config(), parse_overrides(["K=2", "lambda=0.5", "T=0", "model.head.self_loops=true"]))
    assert (cfg.model.head.num_scenes, cfg.loss.entropy_weight, cfg.model.head.steps) == (2, 0.5, 0)
    assert cfg.model.head.self_loops is True


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"K": 0}, "model.head.num_scenes"),
        ({"T": -1}, "model.head.steps"),
        ({"model.backbone.name": "no_such_net"}, "model.backbone.name"),
        ({"model.head.message": "sideways"}, "model.head.message"),
        ({"model.head.selection": "fuzzy"}, "model.head.selection"),
        ({"loss.reduction": "median"}, "loss.reduction"),
        ({"ema.counts": "frozen"}, "ema.counts"),
        ({"model.head.num_scenes": "six"}, "model.head.num_scenes"),
        ({"model.head.nope": 1}, "model.head.nope"),
        ({"model.head": 1}, "model.head"),
        ({"run.device": "gpu"}, "run.device"),
        ({"optim.precision": "fp8"}, "optim.precision"),
    ],
)
def test_invalid_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        with_overrides(Config(), overrides)
    assert str(err.value).startswith(key + ":")


def test_a_retired_key_loads_from_a_stored_config_and_is_refused_as_an_override() -> None:
    """Runs and checkpoints of older versions hold ``optim.amp``; typed today it names its successor."""
    from salgl.config import from_flat

    assert from_flat({"optim.amp": "true", "K": 3}).model.head.num_scenes == 3
    with pytest.raises(ConfigError, match="^optim.amp: no longer exists; use optim.precision="):
        with_overrides(Config(), {"optim.amp": "true"})


def test_yaml_style_tree_with_preset() -> None:
    cfg = load({"preset": "official", "model": {"head": {"num_scenes": 3}}}, {"T": 1})
    assert cfg.model.head.num_scenes == 3 and cfg.model.head.steps == 1 and cfg.model.head.token_encoder
    with pytest.raises(ConfigError, match="^preset:"):
        load({"preset": "nonsense"})


def test_configs_are_frozen() -> None:
    with pytest.raises(Exception):
        Config().model.head.num_scenes = 3  # type: ignore[misc]


@pytest.mark.integration
def test_import_salgl_loads_no_ray_mlflow_or_pyarrow() -> None:
    code = "import sys, salgl, salgl.official, salgl.metrics; print([m for m in ('ray', 'mlflow', 'pyarrow') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_exports_resolve_to_the_defining_modules() -> None:
    import salgl
    import salgl.model

    assert salgl.SALGL is salgl.model.SALGL and "SALGLHead" in dir(salgl)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        salgl.nope  # noqa: B018


@pytest.mark.integration
def test_processes_that_only_build_or_split_data_do_not_import_torch() -> None:
    """Ray Train's controller and dataset manager, the split coordinators and the data tasks
    import these modules in every run; torch and timm there cost seconds per process."""
    code = (
        "import sys, salgl.config, pipeline.ingest, pipeline.transforms, jobs.training.checkpoints, jobs.training.driver, "
        "jobs.training.trainer; "
        "print([m for m in ('torch', 'timm', 'transformers', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_a_known_backbone_is_checked_without_importing_timm_after_the_first_time(tmp_path) -> None:
    """A Tune trial rebuilds its config in a fresh process; importing timm there cost about 2 s.
    The first check asks timm and remembers its architectures; later processes read that list,
    while an unknown name still goes to timm and fails naming the key."""
    code = (
        "import sys\n"
        "from salgl.config import ConfigError, preset\n"
        "preset('tiny')\n"
        "known = 'timm' in sys.modules\n"
        "try:\n"
        "    preset('tiny', {'model.backbone.name': 'no_such_net'})\n"
        "except ConfigError as err:\n"
        "    print(known, err.key)\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}  # an empty ~/.cache
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True) for _ in range(2)]
    assert [r.stdout.strip() for r in runs] == ["True model.backbone.name", "False model.backbone.name"]
    assert list((tmp_path / ".cache" / "salgl").glob("timm-*-architectures.txt"))


@pytest.mark.parametrize("name", ["default", "voc2007", "coco2014", "nuswide", "official", "tiny"])
def test_bundled_run_configs_load(name: str) -> None:
    from jobs.cli.train import load_config_file

    cfg = load(load_config_file(name))
    expected_k = {"voc2007": 3, "coco2014": 6, "nuswide": 2, "official": 6}
    if name in expected_k:
        assert cfg.model.head.num_scenes == expected_k[name]
        assert (cfg.model.backbone.name, cfg.data.img_size, cfg.model.head.steps) == ("resnet101", 448, 3)


def test_sqlite_experiments_keep_artifacts_beside_the_database(tmp_path) -> None:
    from jobs.tracking import default_artifact_location

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert default_artifact_location(uri, "salgl") == (tmp_path / "store" / "mlruns" / "salgl").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000", "salgl") is None


@pytest.mark.integration
def test_a_trial_process_builds_its_trainer_without_the_training_stack(tmp_path) -> None:
    """Every Tune trial runs ``salgl train``'s driver side in a fresh process. Building the
    TorchTrainer imports torch (Ray's TorchTrainer does), but not what only workers need: the
    recipe, timm and the model (about 2 s a trial on 2 cores)."""
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    convert_mosaic(tmp_path / "data", MosaicConfig(train=8, test=4, canvas=32), progress=False)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import jobs.training.trainer\n"
        "from jobs.training.dataset import read_dataset\n"
        "from jobs.resources import plan_resources\n"
        "from salgl.config import preset\n"
        f"root = Path({str(tmp_path)!r})\n"
        "cfg = preset('tiny', {'data.path': str(root / 'data'), 'run.workers': 1})\n"
        "from jobs.storage import Folder\n"
        "jobs.training.trainer.build_trainer(cfg, dataset=read_dataset(str(root / 'data')), run_dir=Folder(str(root / 'run')),\n"
        "              run_name='run',\n"
        "              storage=str(root),\n"
        "              tracking_uri=f'sqlite:///{root}/mlflow.db', mlflow_run_id='0', plan=plan_resources(1, {'CPU': 2.0}))\n"
        "print([m for m in ('jobs.training.recipe', 'timm', 'salgl.model', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_runs_are_compared_by_k_lambda_t_and_preset() -> None:
    from salgl.config import ALIASES, load, short_params

    flat = to_flat(preset("tiny", {"lambda": 0.5}))
    assert short_params(flat) == {"K": 3, "lambda": 0.5, "T": 2, "preset": "tiny"}
    assert set(short_params(flat)) - {"preset"} == set(ALIASES)  # the CLI's aliases, one mapping
    assert load({"preset": "official"}).run.preset == "official" and load().run.preset == "salgl"
    with pytest.raises(ConfigError, match="run.preset"):
        preset("tiny", {"run.preset": "nope"})
