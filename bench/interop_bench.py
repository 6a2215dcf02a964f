"""cache export / import memory: peak RSS of `featseq cache export` (every format) and of `featseq cache import` of
what it wrote, for a small and a 16x larger synthetic cache (300 frames x 1280 dims float16 per segment, written by
the real CacheWriter). Export reads one segment at a time, so its peak should not grow with the cache.

    .venv/bin/python bench/interop_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import run_with_peak_rss, save  # noqa: E402
from featseq.featurize.cache import string_widths  # noqa: E402
from featseq.featurize.writer import CacheWriter  # noqa: E402

FRAMES, DIM = 300, 1280
FORMATS = ("npy", "h5-per-video", "webdataset")


def build(path: Path, n: int) -> None:
    rows = [{"id": f"v{i:05d}", "label": f"c{i % 10}", "group": f"g{i % 20}", "path": "/v", "split": ""} for i in range(n)]
    block = np.random.default_rng(0).standard_normal((FRAMES, DIM)).astype(np.float16)
    with CacheWriter(str(path), {"fps": 6.0}, {"backbone": "bench", "weights": "none", "size": 32}, DIM,
                     string_widths(rows)) as w:
        for i, r in enumerate(rows):
            w.append({**r, "start": 0.0, "end": FRAMES / 6}, block + np.float16(i % 7), np.arange(FRAMES) / 6.0)


def main(quick: bool = False) -> None:
    sizes = (10, 40) if quick else (50, 800)
    rows = []
    with tempfile.TemporaryDirectory(prefix="featseq-interop-bench-") as d:
        d = Path(d)
        for n in sizes:
            cache = d / f"c{n}.h5"
            build(cache, n)
            mb = os.path.getsize(cache) / 1e6
            for fmt in FORMATS:
                out = d / f"out{n}-{fmt}"
                ex = run_with_peak_rss([sys.executable, "-m", "featseq", "cache", "export", str(cache), "--format", fmt,
                                        "--out", str(out)])
                src = out / "features.h5" if fmt == "h5-per-video" else out
                im = run_with_peak_rss([sys.executable, "-m", "featseq", "cache", "import", str(src), "--format", fmt,
                                        "--out", str(d / f"back{n}-{fmt}.h5")])
                rows.append({"segments": n, "cache_mb": round(mb, 1), "format": fmt,
                             "export_s": round(ex["seconds"], 2), "export_peak_mib": round(ex["peak_tree_mib"], 1),
                             "import_s": round(im["seconds"], 2), "import_peak_mib": round(im["peak_tree_mib"], 1)})
                print(rows[-1], flush=True)
    save("interop", {"frames_per_segment": FRAMES, "feature_dim": DIM, "rows": rows, "quick": quick})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
