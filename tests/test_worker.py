"""The decode worker survives a hung and a crashed decoder: a real process stopped or killed."""
import glob
import os
import signal

import pytest

from featseq.featurize.worker import DecodePool, decode_job


def _jobs(synth_data, n=3):
    return [decode_job(i, c["path"], 0.0, None, 6.0, 32, "squash", 4) for i, c in enumerate(synth_data["clips"][:n])]


def _run(pool, jobs, on_first_chunk):
    seen, done, errors, fired = set(), [], {}, False
    for msg in pool.run(jobs):
        if msg[0] == "chunk" and not fired:
            fired = True
            on_first_chunk(pool.worker_pid)
        elif msg[0] == "done":
            done.append(msg[1])
        elif msg[0] == "error":
            errors[msg[1]] = msg[2]
        seen.add(msg[1])
    return done, errors


def test_hung_decoder_is_killed_and_the_run_goes_on(synth_data):
    pool = DecodePool(timeout=3.0, queue_chunks=1)
    stopped = []

    def hang(pid):  # SIGSTOP: the worker stops answering, as a decoder stuck holding the GIL would
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    done, errors = _run(pool, _jobs(synth_data), hang)
    assert list(errors) == [0] and "hung" in errors[0] and synth_data["clips"][0]["path"] in errors[0]
    assert done == [1, 2] and pool.restarts == 1
    assert not os.path.exists(f"/proc/{stopped[0]}") or open(f"/proc/{stopped[0]}/stat").read().split()[2] == "Z"


def test_crashed_decoder_is_replaced(synth_data):
    pool = DecodePool(timeout=30.0, queue_chunks=1)
    done, errors = _run(pool, _jobs(synth_data), lambda pid: os.kill(pid, signal.SIGKILL))
    assert list(errors) == [0] and "died" in errors[0] and "exit code -9" in errors[0]
    assert done == [1, 2] and pool.restarts == 1


def test_probe_reports_unreadable(tmp_path, synth_data):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    out = DecodePool().probe([synth_data["clips"][0]["path"], str(bad)])
    assert isinstance(out[synth_data["clips"][0]["path"]], dict) and out[synth_data["clips"][0]["path"]]["fps"] == 30
    assert isinstance(out[str(bad)], str) and str(bad) in out[str(bad)]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decoder_release_between_chunks_reads_the_same_frames(synth_data, backend):
    """The worker releases a reader while its consumer is busy (decord stops decoding ahead and seeks back on the
    next read); the frames must be the same as read straight through."""
    import numpy as np

    from featseq.featurize.decoder import open_decoder
    from featseq.featurize.sampling import plan_segment
    from featseq.featurize.synth import read_frame_number

    path = synth_data["long_csv"].replace("long_segments.csv", "long/long_01.mp4")
    d = open_decoder(path, size=48, backend=backend)
    idx = plan_segment(d.frame_starts, d.info.duration, 0.0, None, 3.0).indices
    straight = np.concatenate(list(d.read(idx, 8)))
    released = []
    for chunk in d.read(idx, 8):
        released.append(chunk)
        d.release()
    released = np.concatenate(released)
    assert np.array_equal(straight, released)
    assert [read_frame_number(f) for f in released] == idx.tolist()


def test_two_workers_decode_every_job_once_with_the_same_frames(synth_data):
    import numpy as np

    jobs = _jobs(synth_data, n=6)

    def frames(workers):
        got, done = {}, []
        with DecodePool(workers=workers) as pool:
            for msg in pool.run(jobs):
                if msg[0] == "chunk":
                    got.setdefault(msg[1], []).append(msg[2])
                elif msg[0] == "done":
                    done.append(msg[1])
            assert len(set(pool.worker_pids)) == workers
        assert sorted(done) == list(range(6))
        return {k: np.concatenate(v) for k, v in got.items()}

    one, two = frames(1), frames(2)
    assert all(np.array_equal(one[k], two[k]) for k in range(6))


@pytest.mark.parametrize("sig, why", [(signal.SIGSTOP, "hung"), (signal.SIGKILL, "died")])
def test_a_failed_worker_among_two_loses_only_its_own_job(synth_data, sig, why):
    """One of two workers stops answering (or dies) on its first job: that job is reported, the job queued behind it
    goes to the other worker or the replacement, and every other job completes exactly once."""
    jobs = _jobs(synth_data, n=6)
    pool = DecodePool(timeout=3.0, queue_chunks=1, workers=2)
    done, errors, victim = [], {}, {}
    for msg in pool.run(jobs):
        if msg[0] == "start" and not victim:
            # the worker that opened this job (not worker 0, which may still be starting: stopped before its first
            # message it would be a worker that never started, not a hung decoder)
            pid = next(w.proc.pid for w in pool._w if w is not None and w.assigned and w.assigned[0][1] == msg[1])
            victim.update(pid=pid, key=msg[1])
            os.kill(pid, sig)
        elif msg[0] == "done":
            done.append(msg[1])
        elif msg[0] == "error":
            errors[msg[1]] = msg[2]
    pool.close()
    assert len(errors) == 1 and why in next(iter(errors.values()))
    (lost,) = errors
    assert lost == victim["key"] and jobs[lost][2] in errors[lost]
    assert sorted(done + [lost]) == list(range(6)) and len(done) == 5
    assert pool.restarts == 1


# ---------------------------------------------------------------- frames through shared memory

def _blocks(pid):
    """The shared blocks of worker ``pid`` still named in /dev/shm."""
    return glob.glob(f"/dev/shm/featseq_{pid}_*")


def test_frames_travel_through_shared_memory_and_equal_the_pipes(synth_data):
    """Two workers hand every chunk over in shared blocks (none through the pipe), a larger chunk size remakes a
    block, the frames equal those the pipe carries, and no block is left in /dev/shm once the pool is closed."""
    import numpy as np

    clips = synth_data["clips"][:4]
    jobs = [decode_job(i, c["path"], 0.0, None, 6.0, 32 if i % 2 else 48, "squash", 4 if i < 2 else 8)
            for i, c in enumerate(clips)]
    got = {}
    for shared in (True, False):
        frames = {}
        with DecodePool(workers=2, shared_memory=shared) as pool:
            pids = pool.worker_pids
            for msg in pool.run(jobs):
                if msg[0] == "chunk":
                    frames.setdefault(msg[1], []).append(msg[2])
            counts = dict(pool.chunks)
        used, unused = ("shm", "pipe") if shared else ("pipe", "shm")
        assert counts[used] == sum(len(v) for v in frames.values()) and counts[unused] == 0
        assert not any(_blocks(p) for p in pids)
        got[shared] = {k: np.concatenate(v) for k, v in frames.items()}
    assert sorted(got[True]) == [0, 1, 2, 3]
    assert all(np.array_equal(got[True][k], got[False][k]) for k in range(4))


def test_a_worker_waits_for_a_block_and_remakes_one_too_small():
    """With every block out, packing waits (calling its callback) until the parent hands one back; a chunk larger
    than a block gets a new, larger block under a new name."""
    import numpy as np
    from multiprocessing.shared_memory import SharedMemory

    from featseq.featurize.shm import Slots

    seen = {}

    def take(ref):  # what the parent does: map the block once (and unlink its name), copy the frames out
        if ref[2] not in seen:
            seen[ref[2]] = SharedMemory(name=ref[2])
            seen[ref[2]].unlink()
        return np.ndarray(ref[3], np.uint8, buffer=seen[ref[2]].buf).copy()

    slots = Slots(1)
    small = np.full((2, 8, 8, 3), 7, np.uint8)
    ref = slots.pack(small, lambda: None)
    assert ref[:2] == ("shm", 0) and np.array_equal(take(ref), small)
    waits = []
    ref2 = slots.pack(small + 1, lambda: (waits.append(1), slots.returned(0)))
    assert waits == [1] and ref2[2] == ref[2] and np.array_equal(take(ref2), small + 1)  # the same block, handed back
    slots.returned(0)
    big = np.full((4, 8, 8, 3), 9, np.uint8)
    ref3 = slots.pack(big, lambda: None)
    assert ref3[2] != ref[2] and np.array_equal(take(ref3), big)
    for shm in seen.values():
        shm.close()
    assert not _blocks(os.getpid())


def test_a_full_dev_shm_falls_back_to_the_pipe(monkeypatch):
    """/dev/shm cannot hold a block (posix_fallocate: ENOSPC, as in a container with Docker's 64 MB default): the block
    is removed, and this chunk and every later one go through the pipe instead of failing with SIGBUS mid-copy."""
    import errno

    import numpy as np

    from featseq.featurize.shm import Slots

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    slots = Slots(2)
    frames = np.ones((2, 8, 8, 3), np.uint8)
    assert slots.pack(frames, lambda: None) is frames and not slots.enabled
    assert slots.pack(frames, lambda: None) is frames
    assert not _blocks(os.getpid())


def test_blocks_a_dead_worker_never_handed_over_are_removed():
    """A worker killed after making a block and before the parent mapped it: closing the pool removes the block."""
    from multiprocessing.shared_memory import SharedMemory

    pool = DecodePool().start()
    pid = pool.worker_pid
    stray = SharedMemory(name=f"featseq_{pid}_0_99", create=True, size=4096)  # as the worker would have made it
    stray.close()
    os.kill(pid, signal.SIGKILL)
    pool.close()
    assert not _blocks(pid)


_NO_ROOM = r'''
import json, resource, sys
import numpy as np
from featseq.featurize.worker import DecodePool, decode_job

if __name__ == "__main__":
    jobs = [decode_job(i, p, 0.0, None, 6.0, 128, "squash", 64) for i, p in enumerate(sys.argv[1:])]
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))  # the workers inherit it; Python ignores SIGXFSZ
    logged, out = [], {}
    for shared in (True, False):
        got = {}
        with DecodePool(workers=2, shared_memory=shared, log=logged.append) as pool:
            for m in pool.run(jobs):
                if m[0] == "chunk":
                    got.setdefault(m[1], []).append(m[2])
            out[shared] = {k: np.concatenate(v) for k, v in got.items()}
            if shared:
                chunks = dict(pool.chunks)
    same = sorted(out[True]) == sorted(out[False]) and all(np.array_equal(out[True][k], out[False][k]) for k in out[False])
    print(json.dumps({"chunks": chunks, "logged": logged, "same": same}))
'''


def test_a_worker_without_room_for_a_block_sends_its_frames_through_the_pipe_and_says_so(synth_data, tmp_path):
    """Real workers whose file-size limit (256 KB) is below a chunk of frames (49 KB a frame, 30 or more frames a
    chunk): creating the shared block
    fails as on a full /dev/shm, so they send their frames through the pipe; the frames are the same, and one note
    (logged once per pool) names the fix."""
    import json
    import subprocess
    import sys

    from helpers import CHILD_ENV, ROOT

    script = tmp_path / "no_room.py"
    script.write_text(_NO_ROOM)
    r = subprocess.run([sys.executable, str(script)] + [c["path"] for c in synth_data["clips"][:3]], cwd=ROOT,
                       env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["same"] and res["chunks"]["shm"] == 0 and res["chunks"]["pipe"] >= 3
    assert len(res["logged"]) == 1 and "--shm-size" in res["logged"][0], res["logged"]
    assert "Traceback" not in r.stderr and "leaked" not in r.stderr, r.stderr


def test_the_dealer_gives_a_worker_its_own_jobs_first_then_common_ones_then_the_most_loaded_workers_last():
    from featseq.featurize.dealer import Dealer

    owner = {"a0": 0, "b1": 1, "c0": 0, "d": None, "e0": 0, "f": None, "g0": 0, "h1": 1}
    d = Dealer(owner, owner.get)
    assert [d.take(1) for _ in range(5)] == ["b1", "h1", "d", "f", "g0"]  # g0: the end of worker 0's list
    d.put_back(["x", "y"])  # a lost worker's queued jobs: next in line for a worker with none of its own left
    assert [d.take(0) for _ in range(3)] + [d.take(1), d.take(1)] == ["a0", "c0", "e0", "x", "y"]
    assert not d


def test_each_worker_decodes_the_videos_it_probed_before_any_other(synth_data, tmp_path, monkeypatch):
    """Two workers: a worker is dealt the decode jobs of the videos it probed (its process keeps their frame tables)
    before it takes over any the other worker probed (once it has none of its own left)."""
    import shutil

    from featseq.featurize import worker

    paths = []
    for i in range(24):
        paths.append(str(tmp_path / f"c{i}.mp4"))
        shutil.copy(synth_data["clips"][i % 6]["path"], paths[-1])
    dealt, send = [], worker._Worker.send

    def noted(w, jobs):
        dealt.extend((w.proc.pid, j.path) for j in jobs)
        send(w, jobs)
    monkeypatch.setattr(worker._Worker, "send", noted)
    with DecodePool(workers=2) as pool:
        pool.probe(paths)
        probed, dealt[:] = dict(pool._opened), []
        done = [m.key for m in pool.run([decode_job(p, p, 0.0, None, 1.0, 32, "squash", 4) for p in paths])
                if m.kind == "done"]
    assert sorted(done) == sorted(paths) and sorted(p for _, p in dealt) == sorted(paths)
    for pid in set(probed.values()):
        own = [probed[p] == pid for q, p in dealt if q == pid]
        assert own and own[0] and own == sorted(own, reverse=True), own  # its own first, then the other's
