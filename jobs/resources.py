"""Size Ray Train workers and Ray Data tasks from what the cluster has.

On 2 cores, two workers at 1 CPU each leave Ray Data nothing and the job hangs without an error
(STACK.md), so workers get a fraction of a CPU there and the data tasks the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    data_cpus: float  # CPUs left for Ray Data's decode / augment tasks
    data_task_cpus: float  # CPUs asked per data task
    torch_threads: int


def plan_resources(num_workers: int, cluster: Mapping[str, float], *, data_share: float = 0.5) -> ResourcePlan:
    """Workers take at most ``1 - data_share`` of the CPUs (never more than what is free), data the rest.

    With GPUs for every worker, each worker gets one GPU and a CPU or two; data tasks get the
    remaining CPUs. Raises when the cluster cannot host the workers at all.
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    if num_workers < 1:
        raise ValueError("run.workers must be >= 1")
    if cpus <= 0:
        raise RuntimeError("the Ray cluster reports no CPUs")
    use_gpu = gpus >= num_workers
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
    )


# glibc's malloc environment for every Ray worker process of a run (read once, at process start).
# glibc adapts its mmap and trim thresholds to a process's history of frees; a Ray worker's
# history leaves them low, so each step's activations come from fresh pages and go back to the
# kernel after it (a step then spends its time in minor page faults, about 10% slower). Both are
# needed: either alone still faults. 32 MiB is glibc's own ceiling for the adaptive mmap
# threshold; up to 1 GiB of freed heap stays with the process for the next step.
WORKER_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
