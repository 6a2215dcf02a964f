"""The cache writer publishes segments in groups (featurize.writer.CacheWriter): one write and one flush per dataset
per group, and the commit protocol unchanged. A real writer process is killed with SIGKILL at random moments over
thousands of small segments; after every kill the cache opens, verifies and holds whole published segments only, and
reruns resume it to the full set with the right features."""
import random
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from helpers import CHILD_ENV, ROOT
from featseq.featurize.cache import open_read, read_cache, string_widths
from featseq.featurize.verify import verify
from featseq.featurize.writer import CacheWriter

N, DIM = 30000, 16

WRITER = textwrap.dedent(f"""
    import sys
    import numpy as np
    from featseq.featurize.cache import string_widths
    from featseq.featurize.writer import CacheWriter

    path, group_seconds, background = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
    rows = [{{"id": f"s{{i:05d}}", "label": f"c{{i % 7}}", "group": f"g{{i % 5}}", "path": f"/v/{{i}}.mp4"}} for i in range({N})]
    with CacheWriter(path, {{"fps": 5.0}}, {{}}, {DIM}, string_widths(rows), group_seconds=group_seconds,
                     background=background) as w:
        print("open", flush=True)
        for i, r in enumerate(rows):
            if r["id"] in w.done_ids:
                continue
            n = 1 + i % 12  # 1 to 12 frames: segments of every size
            w.append({{**r, "start": 0.0, "end": n / 5}}, np.full((n, {DIM}), i % 1000, dtype="float16"),
                     i + np.arange(n) / 5.0)
    print("done", flush=True)
""")


def _frames(i: int) -> int:
    return 1 + i % 12


def _check(path) -> int:
    """The cache opens and verifies; every published segment is whole and holds its own values. Returns how many."""
    v = verify(path)
    assert v.ok, v.problems
    c = read_cache(path)
    for k, sid in enumerate(c.ids):
        i = int(sid[1:])
        o, n = int(c.segments["offset"][k]), int(c.segments["length"][k])
        assert n == _frames(i)
        assert np.all(c.features[o:o + n] == i % 1000)
        assert np.allclose(c.timestamps[o:o + n], i + np.arange(n) / 5.0)
    return len(c.ids)


@pytest.mark.parametrize("background", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_loses_at_most_the_unpublished_group(tmp_path, background):
    """Also with groups written by the writer thread (featurize's way): a kill mid-write there leaves whole published
    segments only, like one on the main thread."""
    path, script = tmp_path / "c.h5", tmp_path / "writer.py"
    script.write_text(WRITER)
    rnd = random.Random(7)
    counts = []
    for _ in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(path), "0.02", str(int(background))], cwd=ROOT, env=CHILD_ENV,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "open"
        # the kill lands at a random moment once this run has published something (a loaded machine, or the writer
        # thread, which shares the GIL with the appending loop, can take over half a second to publish the first group)
        before, deadline = (counts or [0])[-1], time.monotonic() + 60
        while len(read_cache(path, features=False).ids) <= before and time.monotonic() < deadline:
            time.sleep(0.02)
        # a random moment within 0.4 s, but before a third of what is left is published: a fast machine must not
        # finish the whole write before the last kill
        end, most = time.monotonic() + rnd.uniform(0.0, 0.4), before + (N - before) // 3
        while time.monotonic() < end and len(read_cache(path, features=False).ids) < most:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()
        counts.append(_check(path))
    # each rerun kept what the last one published; most kills landed mid-write (a fast machine may finish the last run)
    assert counts == sorted(counts) and sum(c < N for c in counts) >= 4, counts
    assert len(set(counts)) > 2, counts  # the kills really landed at different moments of the write
    out = subprocess.run([sys.executable, str(script), str(path), "1.0", str(int(background))], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "done", out.stderr
    assert _check(path) == N
    assert sorted(read_cache(path, features=False).ids) == [f"s{i:05d}" for i in range(N)]


def test_a_group_is_published_in_one_write_per_dataset(tmp_path):
    """Held segments are invisible to readers until the group is published, then all of them are, in order."""
    path = tmp_path / "c.h5"
    rows = [{"id": f"s{i}", "label": "a", "group": "g", "path": "/v.mp4"} for i in range(50)]
    with CacheWriter(str(path), {"fps": 5.0}, {}, 4, string_widths(rows), group_seconds=3600) as w:
        for i, r in enumerate(rows):
            w.append(r, np.full((3, 4), i, dtype="float16"), np.arange(3) / 5.0)
        with open_read(path) as f:
            assert len(f["segments"]) == 0 and f["features"].shape[0] == 0
        w.publish()
        with open_read(path) as f:
            assert len(f["segments"]) == 50 and f["features"].shape[0] == 150
            assert list(f["segments"]["offset"]) == list(range(0, 150, 3))
        w.append({"id": "last", "label": "a", "group": "g", "path": "/v.mp4"}, np.ones((2, 4), "float16"), np.zeros(2))
    assert len(read_cache(path).ids) == 51  # close publishes what is held


def test_a_group_fills_by_size_and_by_time(tmp_path):
    path = tmp_path / "c.h5"
    rows = [{"id": f"s{i}", "label": "a", "group": "g", "path": "/v.mp4"} for i in range(10)]
    with CacheWriter(str(path), {"fps": 5.0}, {}, 256, string_widths(rows), group_bytes=3 * 256 * 2 * 4,
                     group_seconds=3600) as w:
        for r in rows[:3]:
            w.append(r, np.zeros((4, 256), "float16"), np.arange(4.0))
        with h5py.File(path, "r", swmr=True) as f:
            assert len(f["segments"]) == 3  # 3 x 4 rows x 256 x 2 bytes reached group_bytes
    with CacheWriter(str(path), {"fps": 5.0}, {}, 256, string_widths(rows), group_seconds=0.2) as w:
        w.append(rows[3], np.zeros((4, 256), "float16"), np.arange(4.0))
        w.publish_due()
        with open_read(path) as f:
            assert len(f["segments"]) == 3
        time.sleep(0.25)
        w.publish_due()
        with open_read(path) as f:
            assert len(f["segments"]) == 4


def test_a_duplicate_id_is_refused_while_it_is_held(tmp_path):
    path = tmp_path / "c.h5"
    row = {"id": "x", "label": "a", "group": "g", "path": "/v.mp4"}
    with CacheWriter(str(path), {"fps": 5.0}, {}, 4, string_widths([row])) as w:
        w.append(row, np.zeros((1, 4), "float16"), np.zeros(1))
        with pytest.raises(Exception, match="already cached"):
            w.append(row, np.zeros((1, 4), "float16"), np.zeros(1))


def test_a_background_group_is_written_by_the_writer_thread_while_the_caller_goes_on(tmp_path, monkeypatch):
    """featurize's writer (background=True): a due group is written off the caller's thread, the caller's next
    append does not wait for it, and close() waits for it and publishes the rest, in order."""
    import threading

    path = tmp_path / "c.h5"
    rows = [{"id": f"s{i}", "label": "a", "group": "g", "path": "/v.mp4"} for i in range(20)]
    started, release, threads = threading.Event(), threading.Event(), []
    real = CacheWriter._write

    def slow_write(self, held):
        threads.append(threading.current_thread())
        started.set()
        release.wait(10)
        real(self, held)

    monkeypatch.setattr(CacheWriter, "_write", slow_write)
    with CacheWriter(str(path), {"fps": 5.0}, {}, 4, string_widths(rows), group_seconds=0, background=True) as w:
        w.append(rows[0], np.full((3, 4), 0, dtype="float16"), np.arange(3) / 5.0)
        assert started.wait(10)  # the first group is being written, held up in the writer thread
        for i, r in enumerate(rows[1:], 1):  # the caller goes on meanwhile; due groups stay held until it is done
            w.append(r, np.full((3, 4), i, dtype="float16"), np.arange(3) / 5.0)
        # every append returned while the first group was still held up: the caller did not wait for the writer
        assert not release.is_set() and w._thread.is_alive() and len(w._held) == len(rows) - 1
        release.set()
    assert threads[0] is not threading.main_thread()
    c = read_cache(path)
    assert list(c.ids) == [r["id"] for r in rows] and _check_values(c)


def _check_values(c) -> bool:
    return all(np.all(c.features[int(o):int(o) + 3] == k) for k, o in enumerate(c.segments["offset"]))


def test_a_background_write_error_is_raised_in_the_callers_next_call_and_keeps_what_was_published(tmp_path,
                                                                                                monkeypatch):
    path = tmp_path / "c.h5"
    rows = [{"id": f"s{i}", "label": "a", "group": "g", "path": "/v.mp4"} for i in range(6)]
    real = CacheWriter._write
    calls = []

    def failing_write(self, held):
        calls.append(len(held))
        if len(calls) == 2:
            raise OSError("the writer thread's write failed")
        real(self, held)

    monkeypatch.setattr(CacheWriter, "_write", failing_write)
    with pytest.raises(OSError, match="writer thread's write failed"):
        with CacheWriter(str(path), {"fps": 5.0}, {}, 4, string_widths(rows), group_seconds=0, background=True) as w:
            for i, r in enumerate(rows):
                w.append(r, np.full((3, 4), i, dtype="float16"), np.arange(3) / 5.0)
                if w._thread is not None:  # each group written before the next segment comes
                    w._thread.join()
    c = read_cache(path)
    assert list(c.ids) == ["s0"] and len(calls) == 2 and _check_values(c)  # nothing after the failure was written


def test_an_error_on_its_way_is_not_replaced_by_the_writer_threads_own(tmp_path, monkeypatch):
    """A run stopped by an error (the CNN's, a signal) while the writer thread fails too: the original error is the
    one raised, with the writer's failure as a note on it."""
    path = tmp_path / "c.h5"
    rows = [{"id": f"s{i}", "label": "a", "group": "g", "path": "/v.mp4"} for i in range(3)]

    def failing_write(self, held):
        raise OSError("disk gone")

    monkeypatch.setattr(CacheWriter, "_write", failing_write)
    with pytest.raises(RuntimeError, match="the CNN failed") as info:
        with CacheWriter(str(path), {"fps": 5.0}, {}, 4, string_widths(rows), group_seconds=0, background=True) as w:
            w.append(rows[0], np.zeros((3, 4), dtype="float16"), np.arange(3) / 5.0)
            raise RuntimeError("the CNN failed")
    assert any("the cache writer also failed: OSError: disk gone" in n for n in info.value.__notes__)
