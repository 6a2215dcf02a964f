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


def rank_device(asked: str, device, env: dict | None = None):
    """The torch device of this process, made current (``torch.cuda.set_device``) when it is a GPU.

    A torchrun rank that asked for ``auto`` or ``cuda`` and got a GPU takes ``cuda:LOCAL_RANK`` when that many GPUs
    are visible; where a rank sees one GPU (a launcher that sets ``CUDA_VISIBLE_DEVICES`` per task, or a 1-GPU box)
    it takes ``cuda:0``; a local rank beyond several visible GPUs is refused with the fix, as is an explicit ``--device cuda:N`` under several local ranks (every rank on one GPU, which nccl refuses).
    Otherwise ``device`` (featurize.backbones.resolve_device's) as it is."""
    import torch

    from .errors import UserError

    env = os.environ if env is None else env
    if device.type == "cuda" and "LOCAL_RANK" in env:
        local_rank, local_world = int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", 1))
        count = torch.cuda.device_count()
        if asked in ("auto", "cuda"):
            if local_rank < count:
                device = torch.device("cuda", local_rank)
            elif count == 1:  # this task sees one GPU: its own (or one the node's ranks share, fine for featurize)
                device = torch.device("cuda", 0)
            else:
                raise UserError(f"--device {asked}: local rank {local_rank} of {local_world} on this node, but "
                                f"{count} GPU(s) are visible; one GPU per rank: start at most {count} ranks per node "
                                f"(torchrun --nproc-per-node {count}), or --device cpu")
        elif local_world > 1:
            raise UserError(f"--device {asked} under torchrun with {local_world} ranks on this node puts every rank "
                            f"on one GPU; pass --device cuda (each rank takes cuda:LOCAL_RANK), or choose the GPUs "
                            f"with CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels, streams and nccl of this process on its own GPU, not cuda:0
    return device


def decode_device(asked: str, device) -> str:
    """The decode workers' device for ``--decode-device``: ``cpu``, or the GPU this process's CNN is on
    (``cuda:N``; :func:`rank_device`'s for a rank whose CNN is on the CPU), so each rank decodes on its own GPU."""
    if asked != "cuda":
        return asked
    import torch

    gpu = device if device.type == "cuda" else rank_device("cuda", torch.device("cuda"))
    return f"cuda:{gpu.index or 0}"


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
