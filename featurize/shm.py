"""Frames from a decode worker to its parent through shared memory, not through the pipe.

A worker writes each chunk into one of its ``queue_chunks + 1`` shared blocks (:class:`Slots`, in the worker) and
sends only the block's name and the chunk's shape (a ShmRef); the parent copies the chunk out (:class:`Blocks`) and
hands the block back (a Free message on the jobs pipe). Pickling frames through the pipe costs the parent CPU the
decoders need when they share the cores with it (bench/decode_bench.py measures both ways). The parent unlinks a
block's name as soon as it maps it, and a retired worker's unmapped blocks by their prefix (:func:`unlink_blocks`),
so nothing is left in /dev/shm. Where a block cannot be had (/dev/shm full or too small, e.g. Docker's default
64 MB), the worker sends frames through the pipe and says so once (a Note).
"""
from __future__ import annotations

import errno
import glob
import os
import queue

from .messages import ShmRef

SHM_PREFIX = "featseq"  # shared blocks are named featseq_<worker pid>_<slot>_<generation>


class Slots:
    """A worker's shared blocks (see the module docstring): at most ``n``, made as needed, a block remade larger
    when a chunk does not fit. :meth:`pack` returns what a chunk message carries: a reference to the block the
    frames were copied into, or the frames themselves when shared memory cannot be had (then for good)."""

    def __init__(self, n: int, enabled: bool = True):
        self.n, self.enabled = n, enabled
        self.blocks: list = []  # slot -> SharedMemory
        self.made = 0
        self.free: queue.Queue = queue.Queue()  # slots the parent has handed back
        self.note = ""  # why shared memory was given up, until the worker has sent it on

    def returned(self, slot: int) -> None:
        self.free.put(slot)

    def _make(self, slot: int, nbytes: int):
        """A new block of ``nbytes``, its pages reserved: a full /dev/shm fails here (OSError), rather than with
        SIGBUS while frames are copied. The block is sized and reserved before SharedMemory maps it (and registers it
        with the resource tracker, which removes it if every process dies): SharedMemory's own error path would
        unregister a name it never registered, and the tracker prints a traceback."""
        import _posixshmem
        from multiprocessing.shared_memory import SharedMemory

        for _ in range(100):  # a name left by a dead process of the same pid is skipped
            name = f"{SHM_PREFIX}_{os.getpid()}_{slot}_{self.made}"
            self.made += 1
            try:
                fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "no free name for a shared block")
        try:
            os.ftruncate(fd, nbytes)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except AttributeError:  # no posix_fallocate (macOS): nothing to reserve ahead
                pass
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            return SharedMemory(name=name)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            raise
        finally:
            os.close(fd)

    def pack(self, frames, wait_for_free):
        """Copy ``frames`` into a free block (calling ``wait_for_free()`` repeatedly while none is, e.g. to check
        that the parent is alive) and return its ShmRef; or return ``frames`` when disabled."""
        import numpy as np

        if not self.enabled or frames.nbytes == 0:
            return frames
        try:
            slot = self.free.get_nowait()
        except queue.Empty:
            if len(self.blocks) < self.n:
                self.blocks.append(None)
                slot = len(self.blocks) - 1
            else:
                slot = None
                while slot is None:
                    wait_for_free()
                    try:
                        slot = self.free.get(timeout=1.0)
                    except queue.Empty:
                        pass
        shm = self.blocks[slot]
        if shm is None or shm.size < frames.nbytes:
            if shm is not None:
                shm.close()  # the parent unlinked its name when it first mapped it
            try:
                shm = self.blocks[slot] = self._make(slot, frames.nbytes)
            except OSError as e:
                self.enabled = False  # e.g. /dev/shm is full or missing: frames go through the pipe from now on
                self.blocks[slot] = None
                self.note = (f"a decode worker cannot have shared memory for its frames ({e}; it needs "
                             f"{self.n} blocks of one chunk each), so its frames go through a pipe instead, which costs this process CPU "
                             "time; give it more shared memory (a container: docker run --shm-size=2g, or a larger "
                             "/dev/shm), or lower --batch-size")
                return frames
        np.ndarray(frames.shape, np.uint8, buffer=shm.buf)[...] = frames
        return ShmRef("shm", slot, shm.name, frames.shape)


def unlink_blocks(pid: int) -> None:
    """Remove the shared blocks a worker made that the parent never mapped (it was killed or died meanwhile)."""
    from multiprocessing import resource_tracker

    for path in glob.glob(f"/dev/shm/{SHM_PREFIX}_{pid}_*"):
        try:
            os.unlink(path)
        except OSError:
            continue
        resource_tracker.unregister("/" + os.path.basename(path), "shared_memory")


class Blocks:
    """The parent's side: a worker's shared blocks, mapped once each (and their names unlinked at once, so the
    memory is freed when both sides unmap it, however they end)."""

    def __init__(self):
        self.mapped: dict = {}  # slot -> SharedMemory

    def take(self, ref: ShmRef):
        """A copy of the frames ``ref`` names; the block may be written again once this returns."""
        import numpy as np
        from multiprocessing.shared_memory import SharedMemory

        shm = self.mapped.get(ref.slot)
        if shm is None or shm.name != ref.name:
            if shm is not None:
                shm.close()
            shm = self.mapped[ref.slot] = SharedMemory(name=ref.name)
            shm.unlink()
        return np.ndarray(ref.shape, np.uint8, buffer=shm.buf).copy()

    def close(self) -> None:
        for shm in self.mapped.values():
            shm.close()
        self.mapped.clear()
