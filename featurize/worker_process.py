"""The decode worker process's side of featurize.worker's pipes: it reads jobs, decodes, and sends messages back
(the pool's side, and what the pipes carry, are in featurize/worker.py's docstring).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Callable

from .messages import (CHUNK, DONE, ERROR, FREE, INFO, NOTE, PROBE, READY, START, STREAM, TIMES, Chunk, Done, Error,
                       Info, Note, Ready, Start)
from .shm import Slots


class WorkerProcess:
    """A decode worker's side of the pipes: a receiver thread reads jobs (and freed blocks) as they come, so the
    parent never blocks on a busy worker; the main thread decodes; a sender thread pickles and writes messages
    from a bounded queue while the next chunk decodes.

    The worker ends itself when its parent is gone (e.g. featurize killed with -9): it checks at least once a second
    while idle or blocked on a full queue, and a send into a closed pipe ends it too. (Not PR_SET_PDEATHSIG: that
    fires when the *thread* that started the worker ends, and finetune starts it from a prefetch thread.)"""

    def __init__(self, jobs_conn, out_conn, backend: str, device: str, queue_chunks: int, shared: bool):
        self.jobs_conn, self.out_conn, self.backend, self.device = jobs_conn, out_conn, backend, device
        self.parent = os.getppid()
        self.out: queue.Queue = queue.Queue(maxsize=queue_chunks)
        self.jobs: queue.Queue = queue.Queue()
        self.slots = Slots(queue_chunks + 1, enabled=shared)
        from .keep_open import OpenDecoders

        self.decoders = OpenDecoders(backend, device)  # a video's segments reuse one decoder (featurize/keep_open.py)

    def _send(self) -> None:
        """Send each message, or the messages already queued behind it up to the next chunk as one list (at most one
        chunk in flight beside the queue, as before): a tiny clip's end and the next one's start and frames in one
        write, one wake-up of the parent."""
        while True:
            msgs = [self.out.get()]
            while msgs[-1].kind != CHUNK and not self.out.empty():
                msgs.append(self.out.get_nowait())  # (only this thread takes from the queue)
            try:
                self.out_conn.send(msgs if len(msgs) > 1 else msgs[0])
            except OSError:  # the parent closed its end
                os._exit(0)
            for _ in msgs:
                self.out.task_done()

    def _receive(self) -> None:
        while True:
            try:
                msg = self.jobs_conn.recv()
            except (EOFError, OSError):
                self.jobs.put(None)
                return
            for m in msg if isinstance(msg, list) else [msg]:  # a list: freed blocks and jobs sent at once
                if m is not None and m.kind == FREE:
                    self.slots.returned(m.slot)
                else:
                    self.jobs.put(m)

    def parent_alive(self) -> None:
        if os.getppid() != self.parent:
            os._exit(0)

    def put(self, msg) -> None:
        while True:
            try:
                return self.out.put(msg, timeout=1.0)
            except queue.Full:
                self.parent_alive()

    def serve(self) -> None:
        import numpy  # noqa: F401  (imported before Ready: a slow import counts against the start, not a job)

        from . import decoder, sampling  # noqa: F401

        threading.Thread(target=self._send, daemon=True).start()
        threading.Thread(target=self._receive, daemon=True).start()
        self.put(Ready(READY))
        while True:
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:
                self.parent_alive()
                continue
            if job is None:
                break
            try:
                if job.kind == PROBE:
                    from .decoder import video_info

                    self.put(Info(INFO, job.key, dataclasses.asdict(video_info(job.path))))
                elif job.kind == STREAM:
                    self._stream(job)
                else:
                    self._decode(job)
            except Exception as e:  # reported per job; the worker goes on with the next one
                msg = str(e) if str(e).startswith(str(job.path)) else f"{job.path}: {type(e).__name__}: {e}"
                self.put(Error(ERROR, job.key, msg))
        self.decoders.close()
        self.out.join()  # every message sent before the process ends

    def _chunk(self, key, frames, times, release: Callable[[], None], arrivals=None) -> None:
        """Send one chunk; while the consumer is busy, a backend that decodes ahead stops (``release``, once)."""
        released = []

        def consumer_busy() -> None:
            if not released:
                release()
                released.append(True)
            self.parent_alive()

        if self.out.full():
            consumer_busy()
        self.put(Chunk(CHUNK, key, self.slots.pack(frames, consumer_busy), times, arrivals))
        if self.slots.note:
            self.put(Note(NOTE, None, self.slots.note))
            self.slots.note = ""

    def _decode(self, job) -> None:
        dec = self.decoders.open(job.path, job.size, job.policy, job.resize_size, job.interpolation)  # kept open
        #                                                             from the video's last job, or new
        try:
            pos = self._read(job, dec)
        except BaseException:
            self.decoders.discard(dec)
            raise
        self.decoders.keep(dec)
        self.put(Done(DONE, job.key, pos, dec.fallback))

    def _read(self, job, dec) -> int:
        import numpy as np

        from .sampling import frame_at, plan_segment

        info = dec.info
        self.put(Start(START, job.key, dataclasses.asdict(info)))
        if job.kind == TIMES:
            idx = frame_at(np.asarray(job.times, dtype=np.float64), dec.frame_starts)
            ftimes = dec.frame_starts[idx]
        else:
            plan = plan_segment(dec.frame_starts, info.duration, job.start, job.end, job.fps)
            idx, ftimes = plan.indices, plan.times
        pos = 0
        for frames in dec.read(idx, job.chunk):
            self._chunk(job.key, frames, ftimes[pos:pos + len(frames)], dec.release)
            pos += len(frames)
        return pos

    def _stream(self, job) -> None:
        import numpy as np

        from .decoder import open_live

        src = open_live(job.path, job.fps, job.size, job.policy, job.realtime, job.stall_timeout, job.resize_size,
                        job.interpolation)
        self.put(Start(START, job.key, src.describe()))
        n = 0
        for t, arrival, rgb in src.frames():  # one chunk per grid frame: handed over as soon as it is on screen
            self._chunk(job.key, rgb[None], np.array([t]), src.release, np.array([arrival]))
            n += 1
        src.close()
        self.put(Done(DONE, job.key, n))


def worker_main(jobs_conn, out_conn, backend: str, device: str, queue_chunks: int, shared: bool = True) -> None:
    from featseq.common.signals import ignore_interrupts

    ignore_interrupts()  # Ctrl-C reaches the whole process group: the parent stops its workers
    one_thread(backend)
    WorkerProcess(jobs_conn, out_conn, backend, device, queue_chunks, shared).serve()


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def one_thread(backend: str) -> None:
    """A decode worker computes on one thread: N workers beside the parent must not each start a pool the size of
    the machine (torch's, for torchcodec's resize and conversion; OpenMP's). Set in the worker process before its
    backend loads torch; torchcodec's FFmpeg already runs one thread (num_ffmpeg_threads=1)."""
    for var in THREAD_VARS:
        os.environ[var] = "1"
    if backend == "torchcodec":
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
