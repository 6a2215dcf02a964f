"""Plain helpers shared by the test modules: paths, the environment of child processes, small inputs, process and
study probes. Fixtures live in conftest.py; test modules import what they need from here, never from each other
(nor from bench/).

Imported by test modules, so after conftest.py has put this checkout first on PYTHONPATH (CHILD_ENV copies it).
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (torch before decord, always)

ROOT = Path(__file__).resolve().parents[1]
GINGERBREAD = ROOT.parent / "shared" / "data" / "gingerbread" / "segments"
EFFNET_WEIGHTS = ROOT.parent / "shared" / "weights" / "efficientnet_lite0_timm.pth"

needs_gingerbread = pytest.mark.skipif(
    not GINGERBREAD.is_dir(), reason=f"real Gingerbread clips not found at {GINGERBREAD} (only on the team's machines)")

# the environment of featseq processes the tests start: this checkout's code first (PYTHONPATH, set by conftest.py),
# and none of the torchrun or SLURM variables of the shell that runs pytest
CHILD_ENV = dict(os.environ)
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
    CHILD_ENV.pop(_k, None)


# ---------------------------------------------------------------- commands

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args) -> list[str]:
    """``torchrun --nproc-per-node NPROC featseq ARGS...`` on this machine (a free port; this checkout's cli, with
    cwd=ROOT and env=CHILD_ENV); the test is skipped where torchrun is not installed next to the interpreter."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    return [str(torchrun), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
            str(free_port()), "-m", "featseq", *map(str, args)]


def featurize_cfg(source, out, **kw):
    from featseq.featurize.pipeline import FeaturizeConfig

    kw.setdefault("size", 32)
    kw.setdefault("fps", 6.0)
    kw.setdefault("device", "cpu")
    return FeaturizeConfig(source=str(source), out=str(out), **kw)


# ---------------------------------------------------------------- inputs

def clip_folder(clips, root: Path) -> Path:
    """A folder-per-class source ROOT/<label>/<clip> of copies of synthetic ``clips`` (mtimes kept)."""
    import shutil

    for c in clips:
        dst = Path(root) / c["label"] / Path(c["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(c["path"], dst)
    return Path(root)


def published_segments(path) -> int:
    """Segments a (possibly half-written) cache publishes; 0 while it doesn't exist yet."""
    from featseq.featurize.cache import open_read

    try:
        with open_read(path) as f:
            return len(f["segments"])
    except Exception:
        return 0


def small_run(d):
    """A conv1d run on synthetic 32 px clips featurized at 2 fps (8 frames = 4 s windows): (clips root, cache, run)."""
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset
    from featseq.sequence.train import TrainConfig, train

    src = render_dataset(d / "v", clips_per_class_per_group=6, groups=4, width=32, height=32, duration=(6, 8),
                         long_videos=0, seed=0)["clips_root"]
    cache = featurize(featurize_cfg(src, d / "c.h5", fps=2.0)).path
    run = d / "run"
    res = train(TrainConfig(cache=cache, out=str(run), model="conv1d", fps=2, seq_len=8, split="group", epochs=40,
                            patience=15, plots=False, device="cpu"))
    return src, cache, str(run), res


def gingerbread_killed_and_resumed(d) -> dict:
    """All 184 real Gingerbread clips featurized at 1 fps (resnet18, random weights, 64 px) by a real featseq process,
    killed with SIGKILL once it has published 60 segments, then rerun to completion (the same command):
    {"cache", "alive_at_kill", "published_at_kill", "rerun"} (rerun: the second process's CompletedProcess)."""
    import signal
    import subprocess

    out = Path(d) / "gb.h5"
    cmd = [sys.executable, "-c", "from featseq.cli import main; main()", "featurize", str(GINGERBREAD), "--backbone",
           "resnet18", "--weights", "none", "--fps", "1", "--size", "64", "--out", str(out), "-q"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while p.poll() is None and published_segments(out) < 60 and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = p.poll() is None
    if alive:
        os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    half = published_segments(out)
    rerun = subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    return {"cache": str(out), "alive_at_kill": alive, "published_at_kill": half, "rerun": rerun}


def write_fake_cache(path, labels, groups=None, durations=None, starts=None, fps=6.0, dim=8, seed=0, jitter=0.0,
                     video_fps=25.0, splits=None, paths=None, order=None, ids=None, dtype="float16", features=None) -> str:
    """A valid cache with random features; segment i samples start + k/fps for k < ceil(duration*fps).

    jitter > 0 moves timestamps to the presentation time of a video_fps frame (up to one frame early),
    like real decoded timestamps. splits: the segments' split column (default empty); paths: their videos.
    ids: the segments' ids (default s000, s001, ...). dtype: the features' storage dtype. features: each segment's
    (frames, dim) array (default random; its frame count must be the one the duration gives).
    order: the order in which the segments are written (as several decode workers complete them); each segment's
    features are the same whatever the order.
    """
    from featseq.featurize.cache import string_widths
    from featseq.featurize.writer import CacheWriter

    rng = np.random.default_rng(seed)
    n = len(labels)
    groups = groups if groups is not None else [f"g{i % 2}" for i in range(n)]
    durations = durations if durations is not None else [6.0] * n
    starts = starts if starts is not None else [0.0] * n
    splits = splits if splits is not None else [""] * n
    paths = paths if paths is not None else [f"/v/{i}.mp4" for i in range(n)]
    ids = ids if ids is not None else [f"s{i:03d}" for i in range(n)]
    rows = [{"id": ids[i], "label": labels[i], "group": groups[i], "path": paths[i], "split": splits[i]}
            for i in range(n)]
    attrs = {"source": "/fake/source", "backbone": "fake", "weights": "none-seed0", "size": 32, "resize": "squash",
             "precision": "fp32"}  # what featurize records; no real backbone made these random features
    with CacheWriter(str(path), {"fps": float(fps)}, attrs, dim, string_widths(rows or [{"id": "x", "label": "x", "group": "x", "path": "x"}]),
                     dtype=dtype) as w:
        feats = [rng.standard_normal((int(math.ceil(float(durations[i]) * fps - 1e-6)), dim)).astype(dtype)
                 for i in range(n)] if features is None else [np.asarray(f, dtype) for f in features]
        for i in (range(n) if order is None else order):
            s, d = float(starts[i]), float(durations[i])
            k = np.arange(len(feats[i]))
            ts = s + k / fps
            if jitter:
                ts = np.floor(ts * video_fps + 1e-4) / video_fps
            w.append({**rows[i], "start": s, "end": s + d, "video_duration": s + d, "video_fps": video_fps},
                     feats[i], ts)
    return str(path)


def synthetic_cache(tmp_path_factory) -> str:
    """96 synthetic clips (3 classes x 4 groups x 8), 6-9 s, featurized at 6 fps with resnet18 random weights, 32 px.

    Classes differ only in temporal order, so order-blind models sit near chance. Built once per session (under
    pytest's base temp folder, so several test modules share it).
    """
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset

    base = Path(tmp_path_factory.getbasetemp()) / "seq_synthetic"
    cache = base / "synth32.h5"
    if not (base / "done").exists():
        base.mkdir(parents=True, exist_ok=True)
        res = render_dataset(base / "videos", clips_per_class_per_group=8, groups=4, width=32, height=32,
                             duration=(6.0, 9.0), long_videos=0, seed=3)
        out = featurize(featurize_cfg(res["clips_root"], cache, size=32, fps=6.0))
        assert out.written == 96 and not out.failures
        (base / "done").write_text("ok")
    return str(cache)


def expected_indices(start, end, fps, video_fps, n_frames):
    """Independent formula: frame shown at start + k/fps, for every grid time before end."""
    out, k = [], 0
    while start + k / fps < end - 1e-6:
        out.append(min(n_frames - 1, int(math.floor((start + k / fps) * video_fps + 1e-4))))
        k += 1
    return out


# ---------------------------------------------------------------- processes

def children(pid):
    """Every descendant process of pid (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def wait_for(cond, timeout=120, proc=None):
    """Whether ``cond()`` became true within ``timeout`` seconds (polled); fails at once if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        assert proc is None or proc.poll() is None, f"the process ended early: {proc.communicate()}"
        time.sleep(0.05)
    return False


def gone(pids, timeout=5.0):
    """Whether every process of pids has ended (within timeout: the parent's exit reaches a helper such as
    multiprocessing's resource tracker a moment later)."""
    return wait_for(lambda: not any(alive(p) for p in pids), timeout=timeout)


# ---------------------------------------------------------------- sweeps

def study_trials(out, study="featseq-sweep"):
    """The trials of a sweep's Optuna study in ``out/study.journal`` (read with Optuna's public API)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(Path(out) / "study.journal")
    storage = optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
