"""Helpers for the sequence tests: tiny hand-made caches (no video) and one learnable synthetic cache.

Not a conftest: import what you need. ``synthetic_cache`` builds its files once per test session
under pytest's base temp folder, so several test modules share them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before decord, always)

from featseq.featurize.cache import string_widths
from featseq.featurize.writer import CacheWriter


def write_fake_cache(path, labels, groups=None, durations=None, starts=None, fps=6.0, dim=8, seed=0, jitter=0.0,
                     video_fps=25.0, splits=None, paths=None, order=None, ids=None) -> str:
    """A valid cache with random features; segment i samples start + k/fps for k < ceil(duration*fps).

    jitter > 0 moves timestamps to the presentation time of a video_fps frame (up to one frame early),
    like real decoded timestamps. splits: the segments' split column (default empty); paths: their videos.
    ids: the segments' ids (default s000, s001, ...).
    order: the order in which the segments are written (as several decode workers complete them); each segment's
    features are the same whatever the order.
    """
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
    with CacheWriter(str(path), {"fps": float(fps)}, attrs, dim, string_widths(rows or [{"id": "x", "label": "x", "group": "x", "path": "x"}])) as w:
        feats = [rng.standard_normal((int(math.ceil(float(durations[i]) * fps - 1e-6)), dim)).astype(np.float16)
                 for i in range(n)]
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

    Classes differ only in temporal order, so order-blind models sit near chance. Built once per session.
    """
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset
    from conftest import featurize_cfg

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
