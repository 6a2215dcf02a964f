"""Featurize on a folder of many tiny clips: what the featurize command costs per segment besides the CNN.

A UCF-101-sized folder is mostly short clips, so fixed costs per segment (opening and probing each file, dealing
jobs to the decode workers and reading their messages, the pipeline's own Python, progress, the writer) add up.
``featseq synth`` renders 1,200 clips (3 classes x 20 groups x 20 clips; 32x32 px, 10 fps, 1-2 s), and ``featseq
featurize`` runs on them with a tiny CNN at a tiny size (timm's ``test_efficientnet`` at 32 px, ``--weights none``,
1 fps, the default two decode workers), so decoding and the CNN cost little and what is left is the per-segment
overhead. The CNN runs on one thread (``OMP_NUM_THREADS=1``): at 32 px each of its operations is so small that with
torch's two threads on this shared 2-core machine they spend most of the time waiting for each other while the
decode workers hold the cores (BENCHMARKS.md's note gives the figures), which would hide everything else. Measured:

* the whole command as a user runs it (a fresh process, its start and imports included): segments/s;
* a breakdown from one ``featurize()`` call in a fresh process with timers around its parts: seconds of the parent
  reading the source and the cache, probing every video (the decode workers' start included), building the model,
  the stream, and inside the stream the CNN, the writer, progress, the parent's side of the decode workers (its
  CPU time dealing jobs and reading messages, and its wait for them) and the pipeline's own Python (the rest);
  and the decode workers' CPU time per segment (``RUSAGE_CHILDREN`` once they are joined, less one pool's start).

``--baseline REV`` measures a revision of the repository (``git archive``: a plain copy in a temporary folder) in the
same run, in turn with this tree, round by round, so the shared machine's slow spells hit both alike; ratios are
this tree's over REV's.

    .venv/bin/python bench/clips_bench.py [--quick] [--baseline REV] [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CNN = {"backbone": "timm:test_efficientnet", "size": 32, "fps": 1.0, "weights": "none"}
BACKBONE = [x for k, v in CNN.items() for x in (f"--{k}", f"{v:g}" if isinstance(v, float) else str(v))]
SYNTH = ["--width", "32", "--height", "32", "--video-fps", "10", "--min-duration", "1", "--max-duration", "2",
         "--long-videos", "0"]


def tree(rev: str | None, tmp: Path) -> Path:
    """A folder to put on PYTHONPATH so that ``import featseq`` imports this tree (None) or revision ``rev``."""
    where = tmp / (rev or "this") / "featseq"
    where.parent.mkdir(parents=True)
    if rev is None:
        where.symlink_to(ROOT)
    else:
        where.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where.parent


def env_for(path: Path) -> dict:
    """Imports from ``path``; the CNN on one thread (see the module docstring)."""
    return {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}


def command(imp: Path, clips: Path, out: Path) -> dict:
    """The whole ``featseq featurize`` command in a fresh process (progress on, stderr not a terminal)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "featseq", "featurize", str(clips), *BACKBONE, "--out", str(out)],
                       env=env_for(imp), cwd=imp, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"featurize failed ({p.returncode}): {p.stderr[-2000:]}")
    n = int(re.search(r"(\d+) segment\(s\) written", p.stderr).group(1))
    out.unlink()
    return {"wall_s": wall, "segments": n}


def breakdown(imp: Path, clips: Path, out: Path) -> dict:
    """:func:`_breakdown` in a fresh process that imports the tree at ``imp``."""
    p = subprocess.run([sys.executable, __file__, "--breakdown", str(clips), str(out)], env=env_for(imp), cwd=imp,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"breakdown failed ({p.returncode}): {p.stderr[-3000:]}")
    out.unlink()
    return json.loads(p.stdout.strip().splitlines()[-1])


def _breakdown(clips: str, out: str) -> dict:
    """One featurize() call with timers around its parts (see the module docstring); runs in the process that
    imports the tree measured, so it only wraps names both old and new trees have."""
    from featseq.featurize import backbones as bb, pipeline, worker, writer
    from featseq.featurize.commands import Progress
    from featseq.featurize.config import FeaturizeConfig

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with worker.DecodePool(workers=worker.default_workers("cpu", "cpu")) as pool:  # one pool's start: not per segment
        pool.probe(sorted(str(p) for p in Path(clips).glob("*/*.mp4"))[:pool.n])  # (the workers are ready)
    mid = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                wall[key] = wall.get(key, 0.0) + time.perf_counter() - t
        static = isinstance(getattr(owner, "__dict__", {}).get(name), staticmethod)
        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    timed(worker.DecodePool, "probe", "probing")
    timed(bb, "create_backbone", "model")
    timed(bb.Embedder, "submit", "cnn")
    timed(bb.Embedder, "result", "cnn")
    for name in ("append", "publish_due", "__exit__"):
        timed(writer.CacheWriter, name, "writer")
    real_run = worker.DecodePool.run

    def run(self, jobs, idle=None):  # the parent's side of the workers: its CPU (thread time) and its wait
        it = real_run(self, jobs, idle)
        key = "decode jobs" if cpu.get("probe done") else "probe jobs"
        while True:
            t, c = time.perf_counter(), time.thread_time()
            try:
                msg = next(it)
            except StopIteration:
                return
            finally:
                wall[key] = wall.get(key, 0.0) + time.perf_counter() - t
                cpu[key] = cpu.get(key, 0.0) + time.thread_time() - c
            yield msg
    worker.DecodePool.run = run
    real_probe = worker.DecodePool.probe

    def probe(self, paths):
        try:
            return real_probe(self, paths)
        finally:
            cpu["probe done"] = 1.0
    worker.DecodePool.probe = probe
    shown = Progress()

    def progress(p):
        t = time.perf_counter()
        shown(p)
        wall["progress"] = wall.get("progress", 0.0) + time.perf_counter() - t

    cfg = FeaturizeConfig(source=clips, **CNN, out=out)
    err, sys.stderr = sys.stderr, open(os.devnull, "w")  # progress lines, as the command writes them, to nowhere
    try:
        t = time.perf_counter()
        res = pipeline.featurize(cfg, progress=progress)
        total = time.perf_counter() - t
    finally:
        sys.stderr = err
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def used(a, b):
        return (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)

    start_cpu = used(before, mid)  # the start of one pool (all its workers)
    return {"segments": res.written, "frames": res.frames, "featurize_s": total, "stream_s": res.stream_seconds,
            "wall": wall, "parent_cpu": {k: v for k, v in cpu.items() if k != "probe done"},
            "workers_cpu_s": used(mid, after) - start_cpu, "workers_start_cpu_s": start_cpu}


def rows(b: dict, c: dict) -> list[tuple[str, float]]:
    """(what, milliseconds per segment) from one breakdown ``b`` and the command's wall ``c``."""
    n, w, cpu = b["segments"], b["wall"], b["parent_cpu"]
    inside = sum(w.get(k, 0.0) for k in ("cnn", "writer", "progress", "decode jobs"))
    before_stream = b["featurize_s"] - b["stream_s"]
    out = [("whole command (process start and imports included)", c["wall_s"]),
           ("featurize() call", b["featurize_s"]),
           ("  probing every video (the workers' start included)", w.get("probing", 0.0)),
           ("    of which the parent's CPU", cpu.get("probe jobs", 0.0)),
           ("  building the model", w.get("model", 0.0)),
           ("  reading the source and the cache, the rest before the stream",
            before_stream - w.get("probing", 0.0) - w.get("model", 0.0)),
           ("  the stream", b["stream_s"]),
           ("    CNN", w.get("cnn", 0.0)),
           ("    writer", w.get("writer", 0.0)),
           ("    progress", w.get("progress", 0.0)),
           ("    decode workers: the parent's CPU dealing jobs, reading messages", cpu.get("decode jobs", 0.0)),
           ("    decode workers: the parent waiting for them", w.get("decode jobs", 0.0) - cpu.get("decode jobs", 0.0)),
           ("    the pipeline's own Python (the rest)", b["stream_s"] - inside),
           ("decode workers' CPU, probing and decoding (their start excluded)", b["workers_cpu_s"])]
    return [(what, 1000.0 * secs / n) for what, secs in out]


def measure(imp: Path, clips: Path, tmp: Path) -> dict:
    c = command(imp, clips, tmp / "c.h5")
    b = breakdown(imp, clips, tmp / "b.h5")
    return {"command": c, "breakdown": b}


def main(quick: bool = False, baseline: str | None = None, rounds: int | None = None) -> dict:
    from bench.common import median, save

    tmp = Path(tempfile.mkdtemp(prefix="featseq-clips-"))
    clips_per, groups = (4, 10) if quick else (20, 20)
    rounds = rounds or (1 if quick else 3)
    try:
        trees = {"this": tree(None, tmp)} | ({"baseline": tree(baseline, tmp)} if baseline else {})
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "featseq", "synth", str(data), "--clips", str(clips_per), "--groups",
                        str(groups), *SYNTH], env=env_for(trees["this"]), check=True, capture_output=True)
        clips = data / "clips"
        got: dict[str, list[dict]] = {k: [] for k in trees}
        for r in range(rounds):
            for name, imp in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                got[name].append(measure(imp, clips, tmp))
                m = got[name][-1]
                print(name, f"{m['command']['segments'] / m['command']['wall_s']:.1f} segments/s (command)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = got["this"][0]["command"]["segments"]
    out = {"clips": n, "backbone": " ".join(BACKBONE), "synth": " ".join(SYNTH), "rounds": rounds,
           "baseline": baseline, "runs": got, "table": []}
    per = {name: [dict(rows(m["breakdown"], m["command"])) for m in ms] for name, ms in got.items()}
    for what in per["this"][0]:
        row = {"what": what, "this_ms": round(median([p[what] for p in per["this"]]), 2)}
        if baseline:
            row["baseline_ms"] = round(median([p[what] for p in per["baseline"]]), 2)
            row["ratio"] = round(row["this_ms"] / row["baseline_ms"], 2) if row["baseline_ms"] > 0 else None
        out["table"].append(row)
        print(row, flush=True)
    for name in trees:
        out[f"{name}_segments_per_s"] = round(median([n / m["command"]["wall_s"] for m in got[name]]), 1)
        out[f"{name}_stream_segments_per_s"] = round(median([m["breakdown"]["segments"] / m["breakdown"]["stream_s"]
                                                             for m in got[name]]), 1)
    save("clips", out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline", default=None, help="a git revision to measure in turn with this tree")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--breakdown", nargs=2, metavar=("CLIPS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.breakdown:
        print(json.dumps(_breakdown(*a.breakdown)))
    else:
        sys.path.insert(0, str(ROOT))
        main(a.quick, a.baseline, a.rounds)
