"""Fine-tuning on several processes, GPUs or nodes: torchrun ranks and DistributedDataParallel.

Under ``torchrun`` every rank runs the same ``featseq finetune`` command; :func:`ranks` joins them in one process group
(nccl on GPUs, gloo on CPUs; what a rank is and which GPU it takes are common.procgroup's :func:`torchrun_env` and
:func:`rank_device`). The training loop (sequence.loop.fit) sees a :class:`Ranks`:

* **Training.** Every rank draws the same permutation of the training part from ``--seed`` (reshuffled every epoch)
  and cuts the same global batches of ``--batch-size`` clips; each rank decodes, embeds and back-propagates only its
  contiguous share of every batch (:meth:`Ranks.share`). Its loss is its share's sum scaled by world / (the whole
  batch's count or class weight), so the gradients DDP averages over ranks are exactly the single process's mean
  over the batch, uneven last batches included. A rank whose share is empty (a last batch smaller than the world)
  runs one clip of the batch with weight 0, so every rank takes part in every gradient averaging.
* **Evaluation** is sharded the same way and the logits are gathered in order (:meth:`Ranks.gather`): no padding, so
  nothing is counted twice and every metric is the single process's.
* **Outputs.** Only rank 0 reads and writes the run folder (:meth:`Ranks.on_main`: the others receive the result, or
  the same error); ``last.pt`` holds no per-rank state, so ``--resume`` works with any number of ranks.

One process (no torchrun) is the world of one, :data:`ONE`, with the same code path.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from featseq.common.errors import UserError
from featseq.common.procgroup import process_group, torchrun_env


class Stopped(BaseException):
    """This rank stopped before the run finished: another rank died, or the launcher or a scheduler ended it (SIGTERM).
    The message says which and how to resume; ``code`` is the exit status (143 after SIGTERM, else 1). A
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# what a collective raises when a peer is gone: gloo "Connection closed by peer", "Connection reset", timeouts, NCCL
_LOST = re.compile(r"connection (closed|reset|refused)|timed? ?out|broken pipe|nccl|gloo|peer", re.IGNORECASE)


def lost_peer(e: BaseException) -> str | None:
    """What happened, in a line, when ``e`` is a collective that failed because another rank is gone (or stopped
    answering); else None."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e).strip()
    if not (isinstance(e, dist_error) or (isinstance(e, RuntimeError) and _LOST.search(text))):
        return None
    line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(e).__name__)  # gloo's [file:line]
    return line.split(". ")[0][:300]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run: ``rank`` of ``world`` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of ``idx`` (sizes differ by at most one, the first ranks take the extra)."""
        return idx if self.world == 1 else np.array_split(idx, self.world)[self.rank]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (CPU tensors, any length along dim 0), concatenated in rank order, on every rank."""
        if self.world == 1:
            return t
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, t)
        return torch.cat(parts)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of every rank's ``values``, added in rank order (the same on every rank)."""
        if self.world == 1:
            return list(values)
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, list(values))
        return [sum(p[i] for p in parts) for i in range(len(values))]

    def on_main(self, fn: Callable[[], object]):
        """``fn()`` run on rank 0 only; every rank returns its result, or raises the UserError it raised."""
        if self.world == 1:
            return fn()
        box: list = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserError as e:
                box[0] = ("error", str(e))
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise UserError(box[0][1])
        return box[0][1]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module that trains: ``model`` itself in one process, else DistributedDataParallel around it (which
        averages gradients over ranks in backward and starts every rank from rank 0's weights). Buffers are not
        broadcast on every forward: BatchNorm is frozen, or synchronised (SyncBatchNorm)."""
        if self.world == 1:
            return model
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # torch renamed broadcast_buffers (the buffers are still synchronised once, at construction)
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                           else {"broadcast_buffers": False})
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_sync)

    @staticmethod
    def no_sync(net: nn.Module):
        """Accumulate gradients locally (no averaging) for a micro-batch that is not the last of a step."""
        return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()


ONE = Ranks()


@contextlib.contextmanager
def ranks(device: torch.device, timeout_s: float):
    """This process's :class:`Ranks` for the block: under torchrun (WORLD_SIZE > 1) in a process group on nccl
    (CUDA) or gloo (CPU) whose collectives give up after ``timeout_s``; else :data:`ONE`."""
    env = torchrun_env()
    if env is None:
        yield ONE
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with process_group(backend, timeout_s), warnings.catch_warnings():
        # the gradient of a 1x1 convolution can come back with strides of another memory format; for a 1x1 kernel
        # both address the same memory, and DDP's warning about it is noise
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        yield Ranks(rank=env[0], world=env[1], backend=backend)
