"""How many CPUs this process may use, and how many processes on this node share them: the one place that sizes
worker pools (featurize's decode workers, finetune's). ``os.cpu_count()`` and even ``sched_getaffinity`` count a
host's cores; a container's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) can
allow far fewer, and torchrun's ranks on one node (``LOCAL_WORLD_SIZE``) share them."""
from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_quota(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by this cgroup's CFS quota (e.g. 16.0 for ``1600000 100000``), None when unlimited or unknown.
    cgroup v2 (``root/cpu.max``: ``QUOTA PERIOD`` or ``max PERIOD``) is read first, then v1 (``root/cpu/`` or
    ``root/cpu,cpuacct/``, or ``root`` itself: ``cpu.cfs_quota_us``, -1 for none, and ``cpu.cfs_period_us``)."""
    root = Path(root)
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or 100000) if int(quota) > 0 else None
    except (OSError, ValueError):
        pass
    for d in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cpus(root: str | os.PathLike = "/sys/fs/cgroup", affinity: int | None = None) -> int:
    """CPUs this process may use: the cores it may run on (``sched_getaffinity``), capped by the cgroup's quota
    rounded up (a quota of 1.5 CPUs keeps 2 threads busy part of the time); at least 1."""
    cores = affinity if affinity is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    quota = cgroup_quota(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def local_processes(env: dict | None = None) -> int:
    """Processes of one job on this node that share its CPUs: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside it)."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        return 1


def cpu_share(env: dict | None = None, root: str | os.PathLike = "/sys/fs/cgroup", affinity: int | None = None,
              processes: int | None = None) -> int:
    """This process's share of the node's CPUs: :func:`available_cpus` divided among ``processes`` (default
    :func:`local_processes`) of the job; at least 1."""
    n = processes if processes is not None else local_processes(env)
    return max(1, available_cpus(root, affinity) // max(1, n))
