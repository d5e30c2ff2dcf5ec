"""Every private Ray API salgl uses, each behind one small function.

Ray keeps no promise about ``_internal`` modules and underscore names between releases. Each
function below names the Ray version it was checked against and what breaks when Ray changes it,
so an upgrade has one file to read. Ray is imported inside the functions: importing this module
costs nothing. It lives in ``pipeline`` because the data pipeline needs it too and ``pipeline``
never imports ``jobs``.

Not here, because it is a method override rather than a call: ``jobs.training.interrupt``
overrides ``DataParallelTrainer._register_sigint_handler`` (Ray 2.60.0); read it on an upgrade too.
"""

from __future__ import annotations

from typing import Any


def seed_tuple(seed: int, execution_idx: int | None) -> Any:
    """Ray Data's ``SeedTuple(seed, execution_idx)``: what ``RandomSeedConfig.get_seed_tuple`` returns.

    Checked against Ray 2.60.0 (``ray.data._internal.random_config.SeedTuple``, a frozen dataclass
    of those two fields). If it moves or changes, ``pipeline.seeding.EpochSeed`` fails in the first
    data task of every training run, so no run can start.
    """
    from ray.data._internal.random_config import SeedTuple

    return SeedTuple(seed=seed, execution_idx=execution_idx)


def controller_callback_class() -> type:
    """Ray Train's ``ControllerCallback`` base class, whose ``after_controller_start`` hook runs in
    the Train controller as it starts (there is no public hook there).

    Checked against Ray 2.60.0 (``ray.train.v2._internal.execution.callback.ControllerCallback``,
    a ``@DeveloperAPI`` class that ``RunConfig(callbacks=...)`` accepts). If it moves, building a
    trainer fails with ``ImportError`` (``salgl train`` and every sweep trial); if the hook is
    renamed, the MLflow store is no longer opened early and the first epoch's metrics wait for it.
    """
    from ray.train.v2._internal.execution.callback import ControllerCallback

    return ControllerCallback


def worker_group_callback_class() -> type:
    """Ray Train's ``WorkerGroupCallback`` base class, whose hooks run in the Train controller as a
    worker group starts (``after_worker_group_start(worker_group)``, ``worker_group.get_workers()``)
    and after each poll of its workers (``after_worker_group_poll_status(status)``, ``status.errors``:
    rank -> exception).

    Checked against Ray 2.60.0 (``ray.train.v2._internal.execution.callback.WorkerGroupCallback``,
    a ``@DeveloperAPI`` class that ``RunConfig(callbacks=...)`` accepts). If it moves, building a
    trainer fails with ``ImportError``; if the hooks change, a run no longer says when it lost
    workers and at what size it continued (``jobs.training.worker_watch``).
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return WorkerGroupCallback


def train_report_logger_name() -> str | None:
    """The name of the logger that Ray Train uses to log every report's metrics dict, per rank, at
    INFO (named by its file path, so ``LoggingConfig`` does not reach it); None where it is not found.

    Checked against Ray 2.60.0 (``ray.train.v2._internal.execution.context``, logging through
    ``logging.getLogger(__file__)``). If it changes, the workers' logs repeat each report's metrics
    again; nothing else breaks.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return None
    return context.__file__


RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # in a Ray Train run folder (Ray 2.60.0)


def forget_checkpoints(snapshot: str, dir_names: set[str], *, latest: str | None) -> str:
    """Ray Train's record of a run (the JSON text of ``RAY_SNAPSHOT_FILE``) without the checkpoint
    folders ``dir_names``, so that a resumed run neither fails on their absence nor counts them
    among the ``num_to_keep`` it keeps (where a damaged one with a high score would push a good one
    out); ``latest`` (a folder name, or None) becomes the run's latest checkpoint if it was dropped.

    Checked against Ray 2.60.0: the JSON of
    ``ray.train.v2._internal.execution.checkpoint.checkpoint_manager._CheckpointManagerState``
    (parallel lists ``checkpoint_results`` / ``checkpoint_report_indices`` and
    ``pending_training_results`` / ``pending_validation_specs``, each result naming its
    ``checkpoint_dir_name``). If the layout changes, a resume after a damaged checkpoint fails with
    Ray's ``CheckpointManagerInitializationError`` (a missing folder) instead of continuing.
    """
    import json

    state = json.loads(snapshot)

    def kept(result: dict) -> bool:
        return result["checkpoint_dir_name"] not in dir_names

    results = list(zip(state["checkpoint_results"], state["checkpoint_report_indices"]))
    state["checkpoint_results"] = [r for r, _ in results if kept(r)]
    state["checkpoint_report_indices"] = [i for r, i in results if kept(r)]
    pending = list(zip(state.get("pending_training_results", []), state.get("pending_validation_specs", [])))
    state["pending_training_results"] = [r for r, _ in pending if kept(r)]
    state["pending_validation_specs"] = [s for r, s in pending if kept(r)]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        state[key] = [name for name in state.get(key, []) if name not in dir_names]
    newest = state.get("latest_checkpoint_result")
    if newest is not None and not kept(newest):
        by_name = {r["checkpoint_dir_name"]: r for r in state["checkpoint_results"]}
        state["latest_checkpoint_result"] = by_name.get(latest) if latest else None
    return json.dumps(state)


def files_ray_would_upload(working_dir: Any, excludes: list[str]) -> list[tuple[Any, int]]:
    """(path, size) of every file Ray's job packaging takes from ``working_dir`` with ``excludes``
    and the folder's ``.gitignore`` / ``.rayignore`` files, so a submission can be sized before it
    is zipped and uploaded.

    Checked against Ray 2.60.0 (``ray._private.runtime_env.packaging._dir_travel`` with
    ``_get_excludes``, what ``create_package`` walks). If they change, ``salgl submit`` fails with
    ``ImportError`` or ``TypeError`` before it connects; nothing is uploaded.
    """
    from pathlib import Path

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).resolve()
    found: list[tuple[Any, int]] = []

    def take(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            found.append((path, path.stat().st_size))

    import logging

    quiet = logging.getLogger(__name__ + ".packaging")  # Ray says which ignore files it read; it will again
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, list(excludes))], take, include_gitignore=True, logger=quiet)
    return found
