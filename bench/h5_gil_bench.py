"""Does h5py release the GIL while it appends and flushes a cache (issue 31, item 13: could segment commits run on
a writer thread, off the thread that feeds the GPU)? The main thread counts a pure-Python loop for 2 s: alone;
beside a thread committing cache-like segments (60 x 512 float16 rows and their timestamps appended, then a flush,
as featurize/writer.py's CacheWriter does); beside a thread hashing 4 MB buffers (hashlib releases the GIL: the
ceiling); beside a thread spinning Python (holds the GIL: the floor). Taken in turn, 3 rounds, medians.

    .venv/bin/python bench/h5_gil_bench.py
"""
import hashlib, statistics, os, tempfile, threading, time
import h5py, numpy as np

written: list[str] = []


def spin(seconds=2.0):
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000): n += 1
    return n / seconds

def h5_commits(stop, out, rows=60, dim=512):
    written.append(tempfile.mktemp(suffix=".h5"))
    with h5py.File(written[-1], "w", libver="latest") as f:
        d = f.create_dataset("features", (0, dim), np.float16, maxshape=(None, dim), chunks=(256, dim))
        t = f.create_dataset("timestamps", (0,), np.float64, maxshape=(None,), chunks=(4096,))
        f.swmr_mode = True
        x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
        while not stop.is_set():
            n = d.shape[0]
            d.resize(n + rows, axis=0); d[n:] = x
            t.resize(n + rows, axis=0); t[n:] = np.arange(rows)
            f.flush(); out["n"] += 1

def hashing(stop, out):
    b = bytes(4 << 20)
    while not stop.is_set():
        hashlib.sha256(b).digest(); out["n"] += 1

def python(stop, out):
    while not stop.is_set():
        for _ in range(1000): out["n"] += 1

def beside(fn):
    if fn is None:
        return spin(), 0
    stop, out = threading.Event(), {"n": 0}
    th = threading.Thread(target=fn, args=(stop, out)); th.start(); time.sleep(0.2)
    out["n"] = 0; r = spin(); stop.set(); th.join()
    return r, out["n"]

kinds = {"alone": None, "h5py commits": h5_commits, "hashing (GIL released)": hashing, "python (GIL held)": python}
got = {k: [] for k in kinds}
for _ in range(3):
    for k, fn in kinds.items():
        got[k].append(beside(fn))
base = statistics.median(r for r, _ in got["alone"])
for k, v in got.items():
    print(f"{k:24s} main thread {statistics.median(r for r, _ in v) / base:.2f} of alone; other thread "
          f"{statistics.median(n for _, n in v) / 2:.0f} units/s")
print(f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}")
for p in written:
    os.remove(p)
