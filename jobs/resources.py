"""Size Ray Train workers and Ray Data tasks from what the cluster has, GPUs included.

On 2 cores, two workers at 1 CPU each leave Ray Data nothing and the job hangs without an error
(STACK.md), so workers get a fraction of a CPU there and the data tasks the rest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

from salgl.errors import BadValue, UsageError


@dataclass(frozen=True)
class DevicePlan:
    """Where the workers run: ``use_gpu`` (one GPU each), how many, and ``note``, a line for the
    user when the plan differs from what was asked ("" when it does not)."""

    use_gpu: bool
    num_workers: int
    note: str = ""


def plan_devices(*, requested: str, workers: int, cluster_gpus: float) -> DevicePlan:
    """``run.device`` against the cluster's GPUs. Never a silent CPU run on a GPU cluster: with
    fewer whole GPUs than ``workers``, one worker per GPU (the global batch is the same, each worker
    takes a larger share) and a note saying so; ``cuda`` without GPUs is refused with the fix."""
    gpus = math.floor(cluster_gpus + 1e-9)  # a worker needs a whole GPU
    if requested == "cpu" or (requested == "auto" and cluster_gpus <= 0):
        return DevicePlan(use_gpu=False, num_workers=workers)
    if requested == "auto" and gpus < 1:
        return DevicePlan(use_gpu=False, num_workers=workers, note=(
            f"the cluster has {cluster_gpus:g} GPUs, less than one per worker: running on CPUs (run.device=cpu says so quietly)"
        ))
    if gpus < 1:
        raise UsageError(
            f"run.device=cuda but the Ray cluster has {cluster_gpus:g} GPUs: run on a cluster with GPUs "
            "(`ray start --num-gpus N`, or a GPU node), or set run.device=auto (GPUs when there are any) or run.device=cpu"
        )
    if gpus >= workers:
        return DevicePlan(use_gpu=True, num_workers=workers)
    return DevicePlan(use_gpu=True, num_workers=gpus, note=(
        f"run.workers={workers} but the cluster has {gpus} GPU{'s' if gpus > 1 else ''}: running {gpus} "
        f"worker{'s' if gpus > 1 else ''}, one per GPU, with the same global batch (run.device=cpu runs {workers} CPU workers)"
    ))


def check_precision(precision: str, *, use_gpu: bool) -> None:
    """float16 autocast runs on GPUs only: on CPU some ops have no float16 kernel and the rest are
    slower than float32, so a CPU run with it is refused rather than half-working."""
    if precision == "fp16" and not use_gpu:
        raise BadValue("optim.precision=fp16 needs GPUs (this run is on CPUs): use optim.precision=bf16 or fp32 on CPUs")


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    data_cpus: float  # CPUs left for Ray Data's decode / augment tasks
    data_task_cpus: float  # CPUs asked per data task
    torch_threads: int
    note: str = ""  # the device plan's line for the user (``DevicePlan.note``)

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.use_gpu else 0


def plan_resources(
    num_workers: int, cluster: Mapping[str, float], *, device: str = "auto", data_share: float = 0.5
) -> ResourcePlan:
    """Workers take at most ``1 - data_share`` of the CPUs (never more than what is free), data the rest.

    On GPUs (``plan_devices``) each worker gets one GPU and a CPU or two; data tasks get the
    remaining CPUs. Raises when the cluster cannot host the workers at all.
    """
    cpus = float(cluster.get("CPU", 0))
    if num_workers < 1:
        raise ValueError("run.workers must be >= 1")
    if cpus <= 0:
        raise RuntimeError("the Ray cluster reports no CPUs")
    devices = plan_devices(requested=device, workers=num_workers, cluster_gpus=float(cluster.get("GPU", 0)))
    use_gpu, num_workers = devices.use_gpu, devices.num_workers
    worker_budget = cpus * (1.0 - data_share)
    per_worker = min(4.0 if use_gpu else max(1.0, worker_budget // num_workers), worker_budget / num_workers)
    per_worker = max(0.01, round(per_worker, 2) - (0.01 if per_worker < 1 else 0))
    data_cpus = max(0.0, cpus - per_worker * num_workers)
    return ResourcePlan(
        num_workers=num_workers,
        cpus_per_worker=per_worker,
        use_gpu=use_gpu,
        data_cpus=data_cpus,
        data_task_cpus=0.5 if data_cpus < 4 else 1.0,
        torch_threads=max(1, int(cpus // num_workers) if per_worker < 1 else int(per_worker)),
        note=devices.note,
    )


def scaling_workers(min_workers: int, num_workers: int, batch_size: int) -> int | tuple[int, int]:
    """Ray Train's ``ScalingConfig(num_workers=)``: ``num_workers`` for a fixed group, or
    ``(min, max)`` for an elastic one (``run.min_workers`` > 0), which restarts from the last
    checkpoint with however many workers the cluster holds then.

    The global batch (``optim.batch_size``) and so the steps per epoch and the LR schedule stay the
    same at any size only where every size splits the batch evenly: refused otherwise, in one line.
    """
    if min_workers <= 0 or min_workers >= num_workers:
        return num_workers
    uneven = [size for size in range(min_workers, num_workers + 1) if batch_size % size]
    if uneven:
        raise BadValue(
            f"run.min_workers={min_workers}: optim.batch_size={batch_size} must split evenly over every worker count "
            f"from {min_workers} to {num_workers} (not {', '.join(map(str, uneven))}), so that a resized run keeps its "
            "global batch, steps per epoch and LR schedule"
        )
    return (min_workers, num_workers)


def elastic_plan(plan: ResourcePlan, node_cpus: list[float]) -> ResourcePlan:
    """An elastic CPU run's plan, its workers sized so that no node holds more of them than the
    plan puts there: ceil(workers / nodes). Ray Train's elastic policy restarts with as many
    workers as the nodes left hold by ``resources_per_worker``; sized from the whole cluster,
    a worker of a 1-CPU node asks for 0.49 CPU and two would land on the node that survives,
    sharing its CPUs. ``node_cpus``: each alive node's CPUs. GPU runs are sized by their GPUs.
    """
    if plan.use_gpu or not node_cpus:
        return plan
    per_node = math.ceil(plan.num_workers / len(node_cpus))
    smallest = min(node_cpus)
    floor = math.floor(smallest / (per_node + 1) * 100 + 1) / 100  # just above: one more does not fit
    if plan.cpus_per_worker >= floor or floor * per_node > smallest:
        return plan
    return dataclasses.replace(plan, cpus_per_worker=floor,
                               data_cpus=round(max(0.0, plan.data_cpus - (floor - plan.cpus_per_worker) * plan.num_workers), 2))


# glibc's malloc environment for every Ray worker process of a run (read once, at process start).
# glibc adapts its mmap and trim thresholds to a process's history of frees; a Ray worker's
# history leaves them low, so each step's activations come from fresh pages and go back to the
# kernel after it (a step then spends its time in minor page faults, about 10% slower). Both are
# needed: either alone still faults. 32 MiB is glibc's own ceiling for the adaptive mmap
# threshold; up to 1 GiB of freed heap stays with the process for the next step.
WORKER_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
