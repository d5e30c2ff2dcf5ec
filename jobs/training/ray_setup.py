"""Ray for a run: the instance (connected to, or started with local defaults), Ray Data kept quiet,
the controller's poll interval, and the resources the run gets from the cluster (``jobs.resources``)."""

from __future__ import annotations

import os
from typing import Any

from jobs.resources import WORKER_ALLOCATOR_ENV, ResourcePlan, check_precision, elastic_plan, plan_resources, scaling_workers
from jobs.stop_signals import sigterm_handler_kept
from salgl.config import Config


def quiet_ray_data() -> None:
    """One line per epoch is the progress report; Ray Data's per-operator bars would bury it.

    A dataset keeps the ``DataContext`` of the process that builds it: call this there (the driver,
    and the Train controller, which calls the dataset factories of ``build_trainer``).
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def local_instance_env() -> None:
    """Defaults for a Ray instance this process starts (its raylet reads them once, at start; a
    value the user exported wins).

    Ray keeps at most ``num_workers_soft_limit`` worker processes (default: the CPU count) and kills
    idle ones beyond it after a second. One Train run alone has about ten actor processes
    (controller, workers, split coordinators, dataset manager, placement-group cleaner, ...), so on
    2 CPUs the data-task processes, which have imported torch and timm, would be killed between a
    sweep's trials, and each trial's first batch would wait seconds for a new one to import them
    again.

    Ray Train starts a preemption watcher actor with every run, to act on a cluster's node being
    drained (spot instances). A local instance has no nodes to drain, so it is switched off there:
    one process fewer to start per run and per sweep trial.

    The raylet started here, and so every worker, trial and controller process, inherits this
    environment, the allocator settings of ``WORKER_ALLOCATOR_ENV`` included (this process has read
    its own already). On a cluster, ``salgl submit`` passes them in the job's runtime env, and the
    project's image (cluster/Dockerfile) sets them for every process.
    """
    os.environ.setdefault("RAY_num_workers_soft_limit", str(4 * (os.cpu_count() or 1) + 16))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for key, value in WORKER_ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local instance."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        local_instance_env()
    with sigterm_handler_kept():
        ray.init(address=address, log_to_driver=True, configure_logging=False)


# Ray Train's controller polls each worker for its next report every this many seconds (Ray's
# default 2). A worker's report queue holds one report, so an epoch shorter than the interval waits
# for the poll, and the last report waits for it again after training ends: with 2 s, a short
# run would spend seconds between its last step and ``fit()`` returning. A poll is one
# small actor call per worker. Ray propagates the variable from the process that calls ``fit()``
# to the controller; a value the user exported wins.
CONTROLLER_POLL_S = "0.2"


def controller_env_defaults() -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)


def cluster_plan(workers: int, share: float = 1.0, *, device: str = "auto") -> ResourcePlan:
    import ray

    return plan_resources(workers, {k: v * share for k, v in ray.cluster_resources().items()}, device=device)


def run_plan(cfg: Config, share: float = 1.0) -> ResourcePlan:
    """Workers, CPUs and devices for this run, from the cluster (``jobs.resources``); a device or
    precision the cluster cannot give fails here, before the run starts (``salgl.errors``)."""
    plan = cluster_plan(cfg.run.workers, share, device=cfg.run.device)
    check_precision(cfg.optim.precision, use_gpu=plan.use_gpu)
    if isinstance(scaling_workers(cfg.run.min_workers, plan.num_workers, cfg.optim.batch_size), tuple):  # elastic
        import ray

        plan = elastic_plan(plan, [node["Resources"].get("CPU", 0.0) * share for node in ray.nodes() if node["Alive"]])
    return plan


def plan_params(plan: ResourcePlan) -> dict[str, Any]:
    """What the run got, beside what it asked for (``run.device``, ``run.workers``): MLflow params."""
    return {"resources.device": plan.device, "resources.workers": plan.num_workers,
            "resources.gpus_per_worker": plan.gpus_per_worker, "resources.cpus_per_worker": plan.cpus_per_worker}


def start_line(run_name: str, cfg: Config, plan: ResourcePlan) -> str:
    """The run's first line: where it runs and in what precision (and where its data and checkpoints are)."""
    gpus = f" ({plan.gpus_per_worker} GPU each)" if plan.use_gpu else ""
    options = "".join(f", {name}" for name, on in (("channels_last", cfg.run.channels_last), ("compiled backbone", cfg.run.compile)) if on)
    workers = f"{plan.num_workers} worker{'s' if plan.num_workers != 1 else ''}"
    if isinstance(scaling_workers(cfg.run.min_workers, plan.num_workers, cfg.optim.batch_size), tuple):
        workers += f" (elastic: at least {cfg.run.min_workers})"
    return f"run {run_name}: {workers} on {plan.device}{gpus}, precision {cfg.optim.precision}{options}"
