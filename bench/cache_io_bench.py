"""Cache I/O: load a whole cache into memory, read one random segment, file size per 1000 frames.

A Gingerbread-sized cache (184 segments x ~190 frames at 6 fps) with D=2048 (resnet50) features,
written through the real CacheWriter, in float16 and float32.

    .venv/bin/python bench/cache_io_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median, save  # noqa: E402
from featseq.featurize.cache import CacheWriter, read_cache, read_segment, string_widths  # noqa: E402


def build(path: Path, dtype: str, n_seg: int, frames: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    rows = [{"id": f"P{i // 8:02d}_music{i % 8:02d}", "label": "x", "group": f"P{i // 8:02d}", "path": f"/data/{i}.mp4"} for i in range(n_seg)]
    ident = {"source": "bench", "backbone": "resnet50", "fps": 6.0, "dtype": dtype}
    with CacheWriter(str(path), ident, {}, dim, string_widths(rows), dtype) as w:
        for r in rows:
            w.append({**r, "start": 0.0, "end": frames / 6}, rng.standard_normal((frames, dim)).astype(dtype),
                     np.arange(frames) / 6.0)


def drop_page_cache_hint(path: Path) -> None:
    try:  # best effort: ask the kernel to forget the file's pages so "cold" reads are closer to cold
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (AttributeError, OSError):
        pass


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-io-"))
    n_seg, frames, dim = (40, 100, 2048) if quick else (184, 190, 2048)
    out = {"segments": n_seg, "frames_per_segment": frames, "feature_dim": dim, "rows": []}
    for dtype in ("float16", "float32"):
        p = tmp / f"c_{dtype}.h5"
        t = time.perf_counter()
        build(p, dtype, n_seg, frames, dim)
        write_s = time.perf_counter() - t
        total = n_seg * frames
        loads, cold = [], []
        for _ in range(5):
            drop_page_cache_hint(p)
            t = time.perf_counter()
            c = read_cache(p)
            cold.append(time.perf_counter() - t)
        for _ in range(5):
            t = time.perf_counter()
            c = read_cache(p)
            loads.append(time.perf_counter() - t)
        assert c.features.shape == (total, dim)
        rng = np.random.default_rng(1)
        one = []
        for i in rng.integers(0, n_seg, 50):
            t = time.perf_counter()
            read_segment(p, c.ids[i])
            one.append(time.perf_counter() - t)
        size = os.path.getsize(p)
        row = {"dtype": dtype, "frames": total, "mb": round(size / 1e6, 1), "mb_per_1000_frames": round(size / total * 1000 / 1e6, 3),
               "write_s": round(write_s, 2), "load_all_s": round(median(loads), 3), "load_all_fadvise_s": round(median(cold), 3),
               "load_all_mb_s": round(size / 1e6 / median(loads)), "read_one_segment_ms": round(1000 * median(one), 2)}
        out["rows"].append(row)
        print(row, flush=True)
    save("cache_io", out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
