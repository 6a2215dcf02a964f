"""torchrun ranks: what a rank is (:func:`torchrun_env`), which GPU it takes (:func:`rank_device`) and its process
group (:func:`process_group`), defined once for sharded featurize (featseq.featurize.shard) and finetune's
DistributedDataParallel (featseq.sequence.ddp)."""
from __future__ import annotations

import os
from contextlib import contextmanager


def torchrun_env(env: dict | None = None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) of a torchrun rank (any launcher that sets both, as torchrun does); None outside one, or
    for a world of one process."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) < 2:
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"])


def rank_device(asked: str, device):
    """The torch device of this process: a torchrun rank that asked for ``auto`` or ``cuda`` and got a GPU takes
    ``cuda:LOCAL_RANK`` (one GPU per rank); otherwise ``device`` (featurize.backbones.resolve_device's) as it is."""
    import torch

    if asked in ("auto", "cuda") and device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return device


@contextmanager
def process_group(backend: str = "gloo", timeout_s: float = 24 * 3600.0):
    """torch.distributed among torchrun's ranks for the block; yields the group to pass to collectives.

    Without a default process group, one is initialized on ``backend`` (rendezvous from torchrun's environment) and
    destroyed after the block; the group yielded is None (the default). Where one exists already (finetune's), a new
    group of every rank on ``backend`` with its own timeout is made instead: a default group cannot be reliably
    initialized twice in one process."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        group = dist.new_group(backend=backend, timeout=timeout)
        try:
            yield group
        finally:
            dist.destroy_process_group(group)
        return
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield None
    finally:
        dist.destroy_process_group()
