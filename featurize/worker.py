"""Decoding in a separate process that can be timed out and replaced.

decord can hang (holding the GIL) or abort the whole process on some files. Every decode and
probe therefore runs in a worker process started with ``spawn``; the parent waits for each
message with a timeout. A worker that stops answering is killed, one that died is noted, the
job it was on is reported as failed, and a fresh worker carries on with the remaining jobs.

The worker also decodes ahead of the consumer (bounded by the queue size), so decoding overlaps
the backbone's compute in the parent.

Messages, in job order:
  ("info",  key, info_dict)                       reply to a probe job
  ("start", key, info_dict)                       a decode job opened its video
  ("chunk", key, frames uint8 (k,S,S,3), times float64 (k,))
  ("done",  key, n_frames)                        a decode job finished
  ("error", key, message)                         a job failed (message names the file)
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import time
from typing import Iterable, Iterator

PROBE = "probe"
PROBE_SIZE = 64
DECODE = "decode"
TIMES = "times"


def probe_job(key, path: str) -> tuple:
    return (PROBE, key, path)


def decode_job(key, path: str, start: float, end: float | None, fps: float, size: int, policy: str, chunk: int) -> tuple:
    return (DECODE, key, path, start, end, fps, size, policy, chunk)


def times_job(key, path: str, times, size: int, policy: str, chunk: int) -> tuple:
    """Frames shown at explicit times (e.g. cached timestamps a sequence selected), for finetune/predict."""
    return (TIMES, key, path, [float(t) for t in times], size, policy, chunk)


def _worker_main(jobs: "mp.Queue", out: "mp.Queue") -> None:  # runs in the child process
    import numpy as np

    from .decoder import Decoder
    from .sampling import frame_at, plan_segment

    # The worker ends itself when its parent is gone (e.g. featurize killed with -9): it checks at least once
    # a second while idle or blocked on a full queue. (Not PR_SET_PDEATHSIG: that fires when the *thread*
    # that started the worker ends, and finetune starts it from a prefetch thread.)
    parent = os.getppid()

    def put(msg) -> None:  # never block forever on a parent that is gone
        while True:
            try:
                return out.put(msg, timeout=1.0)
            except queue.Full:
                if os.getppid() != parent:
                    os._exit(0)

    put(("ready", None, None))
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if job is None:
            return
        kind, key = job[0], job[1]
        try:
            if kind == PROBE:
                # a small output size: opening a reader starts decoding ahead, keep that cheap
                put(("info", key, dataclasses.asdict(Decoder(job[2], size=PROBE_SIZE).info)))
                continue
            if kind == TIMES:
                _, _, path, times, size, policy, chunk = job
            else:
                _, _, path, start, end, fps, size, policy, chunk = job
            dec = Decoder(path, size=size, policy=policy)
            info = dec.info
            put(("start", key, dataclasses.asdict(info)))
            if kind == TIMES:
                idx = frame_at(np.asarray(times, dtype=np.float64), dec.frame_starts)
                ftimes = dec.frame_starts[idx]
            else:
                plan = plan_segment(dec.frame_starts, info.duration, start, end, fps)
                idx, ftimes = plan.indices, plan.times
            pos = 0
            for frames in dec.read(idx, chunk):
                k = len(frames)
                if out.full():  # the consumer is busy: don't let decord buffer frames meanwhile
                    dec.release()
                put(("chunk", key, frames, ftimes[pos:pos + k]))
                pos += k
            dec.close()
            put(("done", key, pos))
        except Exception as e:  # reported per job; the worker goes on with the next one
            msg = str(e) if str(e).startswith(str(job[2])) else f"{job[2]}: {type(e).__name__}: {e}"
            put(("error", key, msg))


class _WorkerFailed(Exception):
    pass


class WorkerStartError(RuntimeError):
    """The decode worker process could not start at all (not the fault of any video)."""


class DecodePool:
    """Runs probe/decode jobs in one replaceable worker process; see the module docstring.

    The worker is started on first use and kept for later :meth:`run` calls (probe, then decode),
    so a featurize run pays the process start once. Call :meth:`close` (or use ``with``) at the end.
    """

    def __init__(self, timeout: float = 60.0, queue_chunks: int = 4):
        self.timeout = timeout
        self.queue_chunks = queue_chunks
        self._ctx = mp.get_context("spawn")
        self._w = None  # (process, job queue, out queue) of the live worker
        self.restarts = 0
        self.worker_pid: int | None = None  # the current worker's pid (tests use it to kill or stop one)

    def start(self) -> "DecodePool":
        """Start the worker now (e.g. so its start overlaps building a model)."""
        if self._w is None:
            jq = self._ctx.Queue()
            oq = self._ctx.Queue(maxsize=self.queue_chunks)
            proc = self._ctx.Process(target=_worker_main, args=(jq, oq), daemon=True, name="featseq-decoder")
            proc.start()
            self.worker_pid = proc.pid
            self._w = (proc, jq, oq)
            self._ready = False
        return self

    def _await_ready(self) -> None:
        if self._ready:
            return
        proc, _, oq = self._w
        try:
            msg = oq.get(timeout=120)
        except queue.Empty:
            msg = None
        if not msg or msg[0] != "ready":
            self._stop(kill=True)
            raise WorkerStartError(
                f"the decode worker process could not start (exit code {proc.exitcode}). featseq starts it with "
                "multiprocessing 'spawn': a script that calls featurize() must do so under "
                "`if __name__ == \"__main__\":`; see the traceback above for other causes")
        self._ready = True

    def _get(self, path: str):
        proc, _, oq = self._w
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return oq.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                pass
            if not proc.is_alive():
                try:  # it may have put its last message just before exiting
                    return oq.get(timeout=0.5)
                except queue.Empty:
                    raise _WorkerFailed(f"{path}: the decoder process died (exit code {proc.exitcode}) while decoding this video") from None
            if time.monotonic() > deadline:
                raise _WorkerFailed(f"{path}: the decoder gave no frame for {self.timeout:g} s (hung); it was killed and this video skipped")

    def _stop(self, kill: bool) -> None:
        if self._w is None:
            return
        proc, jq, oq = self._w
        self._w = None
        if not kill and proc.is_alive():
            jq.put(None)
            proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        for q in (jq, oq):
            q.cancel_join_thread()
            q.close()

    def close(self) -> None:
        self._stop(kill=False)

    def __enter__(self) -> "DecodePool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, jobs: Iterable[tuple]) -> Iterator[tuple]:
        """Yield the messages of every job, in job order, replacing the worker when it fails.

        Abandoning the iterator early kills the worker (it may hold queued frames); the next call starts a new one.
        """
        jobs = list(jobs)
        i = 0
        while i < len(jobs):
            self.start()
            self._await_ready()
            for j in jobs[i:]:
                self._w[1].put(j)
            complete = False
            try:
                while i < len(jobs):
                    msg = self._get(jobs[i][2])
                    if msg[0] in ("info", "done", "error"):
                        i += 1
                    yield msg
                complete = True
            except _WorkerFailed as f:
                self.restarts += 1
                self._stop(kill=True)
                key = jobs[i][1]
                i += 1
                yield ("error", key, str(f))
            finally:
                if not complete:
                    self._stop(kill=True)

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
                out[key] = np.concatenate(parts.pop(key, [])) if key in parts else np.zeros((0, size, size, 3), np.uint8)
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
