"""Scale: the cache writer and cache commands at the sizes users have (UCF-101: 13,320 clips; Kinetics-400: ~300k).

Synthetic caches written by featseq's own CacheWriter (random float16 features, 101 classes, 25 groups):

* writer: segments/s and frames/s for 10-frame x 2048-dim segments (1 fps, 10 s clips: the case where a fixed
  cost per segment shows most) and 35-frame x 2048 (UCF-101 at 5 fps), publishing every segment on its own
  (group_seconds=0, the writer before group commits) against groups (the default), taken in turn per round;
* cache info / verify / merge of two halves on the UCF-101-sized cache.

    .venv/bin/python bench/scale_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, median, save  # noqa: E402
from featseq.featurize.cache import string_widths  # noqa: E402
from featseq.featurize.writer import GROUP_SECONDS, CacheWriter  # noqa: E402

DIM = 2048
FEATSEQ = [sys.executable, "-m", "featseq"]


def rows_for(n: int) -> list[dict]:
    return [{"id": f"v_{i % 101:03d}_g{i % 25:02d}_c{i:06d}", "label": f"class{i % 101:03d}", "group": f"g{i % 25:02d}",
             "path": f"/data/ucf/{i}.avi"} for i in range(n)]


def write(path: Path, n: int, frames: int, group_seconds: float, shard: tuple[int, int] | None = None) -> float:
    """Write n segments of ``frames`` x DIM; seconds spent in the writer (features made beforehand)."""
    rows = rows_for(n)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((64, frames, DIM)).astype("float16")  # 64 distinct segments, reused
    ts = np.arange(frames) / 5.0
    attrs = {"backbone": "resnet50", "weights": "none-seed0", "size": 224, "resize": "squash", "fps": 5.0,
             "precision": "fp32", "dtype": "float16"}
    if shard:
        attrs.update(shard_index=shard[0], shard_count=shard[1],
                     shard_plan={r["id"]: i % shard[1] for i, r in enumerate(rows)})
        rows = [r for i, r in enumerate(rows) if i % shard[1] == shard[0]]
    t = time.perf_counter()
    with CacheWriter(str(path), attrs, {"source": "scale_bench"}, DIM, string_widths(rows),
                     group_seconds=group_seconds) as w:
        for i, r in enumerate(rows):
            w.append({**r, "start": 0.0, "end": frames / 5.0}, block[i % 64], ts)
    return time.perf_counter() - t


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-scale-"))
    sizes = [(1000, 10), (5000, 10)] if quick else [(1000, 10), (13320, 10), (13320, 35)]
    rounds = 1 if quick else 2
    out = {"feature_dim": DIM, "dtype": "float16", "group_seconds": GROUP_SECONDS, "writer": [], "commands": []}
    try:
        for n, frames in sizes:
            got = {"per_segment": [], "grouped": []}
            for _ in range(rounds):
                for name, gs in (("per_segment", 0.0), ("grouped", GROUP_SECONDS)):
                    p = tmp / f"w_{name}.h5"
                    got[name].append(write(p, n, frames, gs))
                    p.unlink()
            row = {"segments": n, "frames_per_segment": frames}
            for name, secs in got.items():
                s = median(secs)
                row[f"{name}_segments_per_s"] = round(n / s)
                row[f"{name}_frames_per_s"] = round(n * frames / s)
            row["speedup"] = round(row["grouped_segments_per_s"] / row["per_segment_segments_per_s"], 1)
            out["writer"].append(row)
            print(row, flush=True)
        n, frames = sizes[-1]
        big = tmp / "ucf.h5"
        write(big, n, frames, GROUP_SECONDS)
        mb = big.stat().st_size / 1e6
        merged = tmp / "merged" / "ucf.h5"
        merged.parent.mkdir()
        for k in range(2):
            write(merged.with_name(f"ucf.part-{k}-of-2.h5"), n, frames, GROUP_SECONDS, shard=(k, 2))
        for name, cmd in (("cache info", FEATSEQ + ["cache", "info", str(big)]),
                          ("cache verify", FEATSEQ + ["cache", "verify", str(big)]),
                          ("cache merge (2 parts)", FEATSEQ + ["cache", "merge", str(merged)])):
            row = {"command": name, "segments": n, "frames_per_segment": frames, "mb": round(mb), "seconds": round(timed(cmd), 2)}
            out["commands"].append(row)
            print(row, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save("scale", out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
