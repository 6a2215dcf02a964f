"""Decoding in worker processes that can be timed out and replaced.

A decoder can hang (holding the GIL) or abort the whole process on some files, whichever backend it is, and so
can a live source. Every probe, decode and stream therefore runs in a worker process started with ``spawn``; a
:class:`DecodePool` runs N of them (``--decode-workers``). Jobs are dealt out as workers free up (two at a time
per worker, so one is always waiting; a video's job to the worker that last opened it: featurize/dealer.py); messages
come back in the order workers produce them, each job's own
messages in order. A worker that gives no message for ``timeout`` seconds of the parent's waiting is killed, one
that died is noted; the job it was on is reported as failed, the job queued behind it goes back to the others,
and a fresh worker takes its place. The other workers' work is untouched.

Memory stays bounded: each worker decodes ahead of the consumer by at most ``queue_chunks`` chunks (a bounded
queue in the worker, drained into a pipe by a sender thread), so decoding overlaps the backbone's compute. Frames
travel through shared memory (featurize/shm.py). The jobs and messages are named records (featurize/messages.py).
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

from .dealer import Dealer
from .messages import (CHUNK, DONE, ERROR, FREE, INFO, NOTE, READY, Error, Free, ShmRef, decode_job, probe_job,
                       stream_job, times_job)
from .shm import Blocks, unlink_blocks
from .worker_process import worker_main

__all__ = ["DecodePool", "WorkerStartError", "decode_job", "default_workers", "probe_job", "stream_job", "times_job"]

JOBS_PER_WORKER = 2  # the one decoding and the next, so a worker never waits for the parent between jobs
START_TIMEOUT = 120.0


def default_workers(decode_device: str, cnn_device: str, cpus: int | None = None) -> int:
    """``--decode-workers`` when not given, from ``cpus``: this process's share of the node's CPUs (default
    featseq.common.cpus.cpu_share: the cores it may run on, capped by a container's CPU quota, divided among the
    torchrun ranks on the node). For a GPU's CNN: that share minus one (the parent's core); CUDA decoding (NVDEC):
    as many as on the CPU, at most 4 per rank (NVDEC engines are several per GPU, 7 on an H100/H200, and each worker
    keeps one CPU thread busy with demuxing). Two on a CPU that also runs the CNN, one on a single core
    (bench/decode_bench.py: on 2 cores, ResNet-18 at 224 px and 1 fps featurized as fast or faster with two workers
    than with one, now that frames cross in shared memory; more would only take cores from the CNN)."""
    if cpus is None:
        from featseq.common.cpus import cpu_share

        cpus = cpu_share()
    if decode_device.startswith("cuda"):
        return max(1, min(4, cpus - 1))
    if cnn_device == "cuda":
        return max(1, cpus - 1)
    return min(2, cpus)


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


class _Worker:
    def __init__(self, ctx, backend: str, device: str, queue_chunks: int, shared: bool):
        jobs_r, self.jobs = ctx.Pipe(duplex=False)
        self.out, out_w = ctx.Pipe(duplex=False)
        _widen(out_w)
        self.proc = ctx.Process(target=worker_main, args=(jobs_r, out_w, backend, device, queue_chunks, shared),
                                daemon=True, name="featseq-decoder")
        self.proc.start()
        jobs_r.close()  # the child holds its own ends: EOF reaches it when we go
        out_w.close()
        self.assigned: deque = deque()  # jobs sent and not finished, in order; the first is the one being decoded
        self.ready = False
        self.eof = False  # its pipe reached end-of-file: the process is gone
        self.silent = 0.0  # seconds the parent has waited since this worker's last message
        self.blocks = Blocks()  # the worker's shared blocks, mapped here
        self.outbox: list = []  # Free messages of blocks copied out, not sent yet

    def frames(self, ref):
        """The frames of a chunk message: copied out of the shared block it names, which goes back to the worker with
        the next jobs the pool sends it (:meth:`send`), at the latest before the pool waits for messages again."""
        if not isinstance(ref, ShmRef):
            return ref  # sent through the pipe
        frames = self.blocks.take(ref)
        self.outbox.append(Free(FREE, ref.slot))
        return frames

    def send(self, jobs: list) -> None:
        """``jobs`` and the blocks freed since the last call, in one write (one wake-up of the worker)."""
        msgs, self.outbox = self.outbox + jobs, []
        if msgs:
            self.jobs.send(msgs if len(msgs) > 1 else msgs[0])

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
        self.blocks.close()
        unlink_blocks(self.proc.pid)


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
        self._opened: dict[str, int] = {}  # video -> pid of the worker that last had a job on it (featurize/dealer.py)
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
        path = w.assigned[0].path
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
        """Yield the messages (featurize.messages records; a Chunk's frames as an array) of every job (job records) as the
        workers produce them, replacing workers that fail; ``idle`` is
        called whenever half a second passes with no message (the cache writer publishes what it holds).

        Abandoning the iterator early kills the workers (they may hold queued frames); the next call starts new ones.
        """
        slots = {w.proc.pid: i for i, w in enumerate(self._w) if w is not None}
        pending = Dealer(jobs, lambda job: slots.get(self._opened.get(job.path)))
        complete = False
        try:
            while True:
                for i in range(self.n):  # deal jobs to free workers, starting (re)placements as needed
                    if self._w[i] is None and pending:
                        self._w[i] = _Worker(self._ctx, self.decoder, self.decode_device, self.queue_chunks, self.shared_memory)
                    w, dealt = self._w[i], []
                    while w is not None and pending and len(w.assigned) < JOBS_PER_WORKER:
                        dealt.append(pending.take(i))
                        w.assigned.append(dealt[-1])
                        self._opened[dealt[-1].path] = w.proc.pid
                    try:
                        if w is not None:
                            w.send(dealt)
                    except OSError:  # it died: noticed below
                        pass
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
                        got = w.out.recv()
                    except (EOFError, OSError):
                        w.eof = True  # died: noticed below
                        continue
                    w.silent = 0.0
                    for msg in got if isinstance(got, list) else [got]:  # a list: messages sent at once
                        if msg.kind == READY:
                            w.ready = True
                            continue
                        if msg.kind == NOTE:
                            if msg.message not in self.notes:
                                self.notes.append(msg.message)
                                if self.log is not None:
                                    self.log(f"note: {msg.message}")
                            continue
                        if msg.kind == CHUNK:
                            self.chunks["shm" if isinstance(msg.frames, ShmRef) else "pipe"] += 1
                            msg = msg._replace(frames=w.frames(msg.frames))
                        elif msg.kind in (INFO, DONE, ERROR):
                            w.assigned.popleft()
                        yield msg
                for i, w in enumerate(self._w):
                    if w is None or not w.assigned or (why := self._failed(w)) is None:
                        continue
                    job = w.assigned.popleft()
                    pending.put_back(list(w.assigned))  # its next job goes back to the others
                    self.restarts += 1
                    self._retire(i, kill=True)
                    yield Error(ERROR, job.key, why)
            complete = True
        finally:
            if not complete:
                for i in range(self.n):
                    self._retire(i, kill=True)

    def frames_at(self, requests: Iterable[tuple], size: int, policy: str, chunk: int = 64, resize_size: str = "",
                  interpolation: str = "bilinear") -> dict:
        """Frames shown at given times: ``requests`` are (key, path, times); returns key -> uint8 (len(times), S, S, 3)
        for every request, or key -> an error message (str, naming the file) for one that failed. The frames are
        made as :func:`times_job` says."""
        import numpy as np

        parts: dict = {}
        out: dict = {}
        for msg in self.run([times_job(k, p, t, size, policy, chunk, resize_size, interpolation)
                             for k, p, t in requests]):
            if msg.kind == CHUNK:
                parts.setdefault(msg.key, []).append(msg.frames)
            elif msg.kind == DONE:
                out[msg.key] = (np.concatenate(parts.pop(msg.key)) if msg.key in parts
                                else np.zeros((0, size, size, 3), np.uint8))
            elif msg.kind == ERROR:
                parts.pop(msg.key, None)
                out[msg.key] = msg.message
        return out

    def probe(self, paths: Iterable[str]) -> dict[str, dict | str]:
        """path -> info dict, or an error message for a file that cannot be opened."""
        out: dict[str, dict | str] = {}
        for msg in self.run([probe_job(p, p) for p in dict.fromkeys(paths)]):
            out[msg.key] = msg.info if msg.kind == INFO else msg.message
        return out
