"""Decoding in worker processes that can be timed out and replaced.

A decoder can hang (holding the GIL) or abort the whole process on some files, whichever backend it is. Every
probe and decode therefore runs in a worker process started with ``spawn``; a :class:`DecodePool` runs N of them
(``--decode-workers``). Jobs are dealt out as workers free up (two at a time per worker, so one is always
waiting); messages come back in the order workers produce them, each job's own messages in order. A worker that
gives no message for ``timeout`` seconds of the parent's waiting is killed, one that died is noted; the job it
was on is reported as failed, the job queued behind it goes back to the others, and a fresh worker takes its
place. The other workers' work is untouched.

Memory stays bounded: each worker decodes ahead of the consumer by at most ``queue_chunks`` chunks (a bounded
queue in the worker, drained into a pipe by a sender thread), so decoding overlaps the backbone's compute.

Frames travel through shared memory, not through the pipe: a worker writes each chunk into one of its
``queue_chunks + 1`` shared blocks and sends only the block's name and the chunk's shape; the parent copies the
chunk out and hands the block back (("free", slot) on the jobs pipe). Pickled through the pipe, two workers'
224 px frames cost the parent 195 ms of CPU per 1000 frames, against 18 ms this way (bench/decode_bench.py), CPU
the decoders need when they share the cores with it. The parent unlinks a
block's name as soon as it maps it, and a retired worker's unmapped blocks by their prefix, so nothing is left in
/dev/shm. Where a block cannot be had (/dev/shm full or too small, e.g. Docker's default 64 MB), the worker sends
frames through the pipe as before.

Messages of a job:
  ("info",  key, info_dict)                       reply to a probe job
  ("start", key, info_dict)                       a decode job opened its video
  ("chunk", key, frames uint8 (k,S,S,3), times float64 (k,))   (from the worker: frames is a shared-block reference)
  ("done",  key, n_frames)                        a decode job finished
  ("error", key, message)                         a job failed (message names the file)
  ("note",  None, message)                        something the user should know (e.g. /dev/shm is full); logged
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

PROBE = "probe"
DECODE = "decode"
TIMES = "times"
FREE = "free"  # parent -> worker: a shared block is copied out and may be written again
SHM_PREFIX = "featseq"  # shared blocks are named featseq_<worker pid>_<slot>_<generation>
JOBS_PER_WORKER = 2  # the one decoding and the next, so a worker never waits for the parent between jobs
START_TIMEOUT = 120.0


def probe_job(key, path: str) -> tuple:
    return (PROBE, key, path)


def decode_job(key, path: str, start: float, end: float | None, fps: float, size: int, policy: str, chunk: int) -> tuple:
    return (DECODE, key, path, start, end, fps, size, policy, chunk)


def times_job(key, path: str, times, size: int, policy: str, chunk: int) -> tuple:
    """Frames shown at explicit times (e.g. cached timestamps a sequence selected), for finetune/predict."""
    return (TIMES, key, path, [float(t) for t in times], size, policy, chunk)


def default_workers(decode_device: str, cnn_device: str) -> int:
    """``--decode-workers`` when not given: the cores minus one for a GPU's CNN (CUDA decoding: 2, NVDEC is one
    engine); two on a CPU that also runs the CNN, one on a single core (bench/decode_bench.py: on 2 cores, ResNet-18
    at 224 px and 1 fps featurized as fast or faster with two workers than with one, now that frames cross in shared
    memory; more would only take cores from the CNN)."""
    cores = len(os.sched_getaffinity(0))
    if decode_device == "cuda":
        return 2
    if cnn_device == "cuda":
        return max(1, cores - 1)
    return min(2, cores)


class _Slots:
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
        that the parent is alive) and return ("shm", slot, name, shape); or return ``frames`` when disabled."""
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
        return ("shm", slot, shm.name, frames.shape)


def _worker_main(jobs_conn, out_conn, backend: str, device: str, queue_chunks: int, shared: bool = True) -> None:
    import numpy as np

    from .decoder import open_decoder, video_info
    from .sampling import frame_at, plan_segment
    from featseq.common.signals import ignore_interrupts

    ignore_interrupts()  # Ctrl-C reaches the whole process group: the parent stops its workers

    # The worker ends itself when its parent is gone (e.g. featurize killed with -9): it checks at least once a
    # second while idle or blocked on a full queue, and a send into a closed pipe ends it too. (Not
    # PR_SET_PDEATHSIG: that fires when the *thread* that started the worker ends, and finetune starts it from a
    # prefetch thread.)
    parent = os.getppid()
    out: queue.Queue = queue.Queue(maxsize=queue_chunks)
    jobs: queue.Queue = queue.Queue()
    slots = _Slots(queue_chunks + 1, enabled=shared)

    def send() -> None:  # pickling and writing happen here, while the main thread decodes the next chunk
        while True:
            msg = out.get()
            try:
                out_conn.send(msg)
            except OSError:  # the parent closed its end
                os._exit(0)
            out.task_done()

    def receive() -> None:  # jobs (and freed blocks) are read as they come, so the parent never blocks on a busy worker
        while True:
            try:
                msg = jobs_conn.recv()
            except (EOFError, OSError):
                jobs.put(None)
                return
            if msg is not None and msg[0] == FREE:
                slots.returned(msg[1])
            else:
                jobs.put(msg)

    def parent_alive() -> None:
        if os.getppid() != parent:
            os._exit(0)

    def put(msg) -> None:
        while True:
            try:
                return out.put(msg, timeout=1.0)
            except queue.Full:
                if os.getppid() != parent:
                    os._exit(0)

    threading.Thread(target=send, daemon=True).start()
    threading.Thread(target=receive, daemon=True).start()
    put(("ready", None, None))
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                os._exit(0)
            continue
        if job is None:
            break
        kind, key = job[0], job[1]
        try:
            if kind == PROBE:
                put(("info", key, dataclasses.asdict(video_info(job[2]))))
                continue
            if kind == TIMES:
                _, _, path, times, size, policy, chunk = job
            else:
                _, _, path, start, end, fps, size, policy, chunk = job
            dec = open_decoder(path, size=size, policy=policy, backend=backend, device=device)
            info = dec.info
            put(("start", key, dataclasses.asdict(info)))
            if kind == TIMES:
                idx = frame_at(np.asarray(times, dtype=np.float64), dec.frame_starts)
                ftimes = dec.frame_starts[idx]
            else:
                plan = plan_segment(dec.frame_starts, info.duration, start, end, fps)
                idx, ftimes = plan.indices, plan.times
            pos = 0
            released = False

            def consumer_busy() -> None:  # a backend that decodes ahead stops while the consumer is busy
                nonlocal released
                if not released:
                    dec.release()
                    released = True
                parent_alive()

            for frames in dec.read(idx, chunk):
                k = len(frames)
                released = False
                if out.full():
                    consumer_busy()
                put(("chunk", key, slots.pack(frames, consumer_busy), ftimes[pos:pos + k]))
                pos += k
                if slots.note:
                    put(("note", None, slots.note))
                    slots.note = ""
            dec.close()
            put(("done", key, pos))
        except Exception as e:  # reported per job; the worker goes on with the next one
            msg = str(e) if str(e).startswith(str(job[2])) else f"{job[2]}: {type(e).__name__}: {e}"
            put(("error", key, msg))
    out.join()  # every message sent before the process ends


class WorkerStartError(RuntimeError):
    """A decode worker process could not start at all (not the fault of any video)."""


def _widen(conn) -> None:
    """Give a pipe the largest buffer an unprivileged process may (Linux: /proc/sys/fs/pipe-max-size, 1 MiB by
    default, against 64 KiB): a chunk of frames then crosses in a few writes instead of ping-ponging the two
    processes through 64 KiB at a time."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as fh:
            fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), int(fh.read()))
    except (OSError, ValueError, ImportError):
        pass  # not Linux, or not allowed: the default buffer works, only slower


def _unlink_blocks(pid: int) -> None:
    """Remove the shared blocks a worker made that the parent never mapped (it was killed or died meanwhile)."""
    from multiprocessing import resource_tracker

    for path in glob.glob(f"/dev/shm/{SHM_PREFIX}_{pid}_*"):
        try:
            os.unlink(path)
        except OSError:
            continue
        resource_tracker.unregister("/" + os.path.basename(path), "shared_memory")


class _Worker:
    def __init__(self, ctx, backend: str, device: str, queue_chunks: int, shared: bool):
        jobs_r, self.jobs = ctx.Pipe(duplex=False)
        self.out, out_w = ctx.Pipe(duplex=False)
        _widen(out_w)
        self.proc = ctx.Process(target=_worker_main, args=(jobs_r, out_w, backend, device, queue_chunks, shared),
                                daemon=True, name="featseq-decoder")
        self.proc.start()
        jobs_r.close()  # the child holds its own ends: EOF reaches it when we go
        out_w.close()
        self.assigned: deque = deque()  # jobs sent and not finished, in order; the first is the one being decoded
        self.ready = False
        self.eof = False  # its pipe reached end-of-file: the process is gone
        self.silent = 0.0  # seconds the parent has waited since this worker's last message
        self.blocks: dict = {}  # slot -> the worker's shared block, mapped here

    def frames(self, ref):
        """The frames of a chunk message: copied out of the shared block it names, which goes back to the worker."""
        if not isinstance(ref, tuple):
            return ref  # sent through the pipe
        import numpy as np
        from multiprocessing.shared_memory import SharedMemory

        _, slot, name, shape = ref
        shm = self.blocks.get(slot)
        if shm is None or shm.name != name:
            if shm is not None:
                shm.close()
            shm = self.blocks[slot] = SharedMemory(name=name)
            shm.unlink()  # the name goes at once: the memory is freed when both sides unmap it, however they end
        frames = np.ndarray(shape, np.uint8, buffer=shm.buf).copy()
        try:
            self.jobs.send((FREE, slot))
        except OSError:  # it died: noticed by the pool
            pass
        return frames

    def stop(self, kill: bool) -> None:
        if not kill and self.proc.is_alive():
            try:
                self.jobs.send(None)
            except OSError:
                pass
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.jobs.close()
        self.out.close()
        for shm in self.blocks.values():
            shm.close()
        self.blocks.clear()
        _unlink_blocks(self.proc.pid)


class DecodePool:
    """Runs probe/decode jobs in ``workers`` replaceable worker processes; see the module docstring.

    Workers are started on first use and kept for later :meth:`run` calls (probe, then decode), so a featurize
    run pays the process start once. Call :meth:`close` (or use ``with``) at the end.
    """

    def __init__(self, timeout: float = 60.0, queue_chunks: int = 4, workers: int = 1, decoder: str = "pyav",
                 decode_device: str = "cpu", shared_memory: bool = True, log=None):
        if workers < 1:
            raise ValueError(f"--decode-workers must be >= 1, got {workers}")
        self.timeout, self.queue_chunks, self.n = timeout, queue_chunks, workers
        self.shared_memory = shared_memory  # False: frames through the pipe (the fallback, and a benchmark's baseline)
        self.chunks = {"shm": 0, "pipe": 0}  # chunks received by each transport
        self.notes: list[str] = []  # the workers' notes, each once (and passed to ``log`` when given)
        self.log = log
        self.decoder, self.decode_device = decoder, decode_device
        self._ctx = mp.get_context("spawn")
        self._w: list[_Worker | None] = [None] * workers
        self.restarts = 0

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._w if w is not None]

    @property
    def worker_pid(self) -> int | None:
        """The first live worker's pid (tests use it to kill or stop one)."""
        return next(iter(self.worker_pids), None)

    def start(self) -> "DecodePool":
        """Start the workers now (e.g. so their start overlaps building a model)."""
        for i, w in enumerate(self._w):
            if w is None:
                self._w[i] = _Worker(self._ctx, self.decoder, self.decode_device, self.queue_chunks, self.shared_memory)
        return self

    def _retire(self, i: int, kill: bool) -> None:
        w, self._w[i] = self._w[i], None
        if w is not None:
            w.stop(kill)

    def close(self, kill: bool = False) -> None:
        """Stop the workers: let them finish (``kill``: at once, e.g. when the run stops on an error or a signal)."""
        for i in range(self.n):
            self._retire(i, kill=kill)

    def __enter__(self) -> "DecodePool":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)

    def _failed(self, w: _Worker) -> str | None:
        """Why a busy worker is declared lost (naming its job's file), or None while it is fine."""
        path = w.assigned[0][2]
        if w.eof or (not w.proc.is_alive() and not w.out.poll()):
            w.proc.join(timeout=5)
            if not w.ready:
                raise WorkerStartError(
                    f"a decode worker process could not start (exit code {w.proc.exitcode}). featseq starts it with "
                    "multiprocessing 'spawn': a script that calls featurize() must do so under "
                    "`if __name__ == \"__main__\":`; see the traceback above for other causes")
            return f"{path}: the decoder process died (exit code {w.proc.exitcode}) while decoding this video"
        if not w.ready and w.silent > START_TIMEOUT:
            raise WorkerStartError(f"a decode worker process gave no sign of life in {START_TIMEOUT:g} s")
        if w.ready and w.silent > self.timeout:
            return f"{path}: the decoder gave no frame for {self.timeout:g} s (hung); it was killed and this video skipped"
        return None

    def run(self, jobs: Iterable[tuple], idle: Callable[[], None] | None = None) -> Iterator[tuple]:
        """Yield the messages of every job as the workers produce them, replacing workers that fail; ``idle`` is
        called whenever half a second passes with no message (the cache writer publishes what it holds).

        Abandoning the iterator early kills the workers (they may hold queued frames); the next call starts new ones.
        """
        pending = deque(jobs)
        complete = False
        try:
            while True:
                for i in range(self.n):  # deal jobs to free workers, starting (re)placements as needed
                    if self._w[i] is None and pending:
                        self._w[i] = _Worker(self._ctx, self.decoder, self.decode_device, self.queue_chunks, self.shared_memory)
                    w = self._w[i]
                    while w is not None and pending and len(w.assigned) < JOBS_PER_WORKER:
                        job = pending.popleft()
                        w.assigned.append(job)
                        try:
                            w.jobs.send(job)
                        except OSError:  # it died: noticed below
                            break
                busy = [w for w in self._w if w is not None and w.assigned]
                if not busy:
                    break
                t = time.monotonic()
                ready = wait([w.out for w in busy], timeout=0.5)
                waited = time.monotonic() - t
                if not ready and idle is not None:
                    idle()
                for w in busy:
                    if w.out not in ready:
                        w.silent += waited
                        continue
                    try:
                        msg = w.out.recv()
                    except (EOFError, OSError):
                        w.eof = True  # died: noticed below
                        continue
                    w.silent = 0.0
                    if msg[0] == "ready":
                        w.ready = True
                        continue
                    if msg[0] == "note":
                        if msg[2] not in self.notes:
                            self.notes.append(msg[2])
                            if self.log is not None:
                                self.log(f"note: {msg[2]}")
                        continue
                    if msg[0] == "chunk":
                        self.chunks["shm" if isinstance(msg[2], tuple) else "pipe"] += 1
                        msg = (msg[0], msg[1], w.frames(msg[2]), msg[3])
                    elif msg[0] in ("info", "done", "error"):
                        w.assigned.popleft()
                    yield msg
                for i, w in enumerate(self._w):
                    if w is None or not w.assigned or (why := self._failed(w)) is None:
                        continue
                    job = w.assigned.popleft()
                    pending.extendleft(reversed(w.assigned))  # its next job goes back to the others
                    self.restarts += 1
                    self._retire(i, kill=True)
                    yield ("error", job[1], why)
            complete = True
        finally:
            if not complete:
                for i in range(self.n):
                    self._retire(i, kill=True)

    def frames_at(self, requests: Iterable[tuple], size: int, policy: str, chunk: int = 64) -> dict:
        """Frames shown at given times: ``requests`` are (key, path, times); returns key -> uint8 (len(times), S, S, 3)
        for every request, or key -> an error message (str, naming the file) for one that failed."""
        import numpy as np

        parts: dict = {}
        out: dict = {}
        for kind, key, *payload in self.run([times_job(k, p, t, size, policy, chunk) for k, p, t in requests]):
            if kind == "chunk":
                parts.setdefault(key, []).append(payload[0])
            elif kind == "done":
                out[key] = np.concatenate(parts.pop(key)) if key in parts else np.zeros((0, size, size, 3), np.uint8)
            elif kind == "error":
                parts.pop(key, None)
                out[key] = payload[0]
        return out

    def probe(self, paths: Iterable[str]) -> dict[str, dict | str]:
        """path -> info dict, or an error message for a file that cannot be opened."""
        out: dict[str, dict | str] = {}
        for _kind, key, payload in self.run([probe_job(p, p) for p in dict.fromkeys(paths)]):
            out[key] = payload
        return out
