"""Does committing on a writer thread (CacheWriter(background=True)) take commits off featurize's main thread?
Seconds the main thread spends inside CacheWriter calls (append + publish_due) for 4000 segments of 10 x 512 float16
rows, groups due every 0.05 s, commits on the main thread vs on the writer thread, in two regimes of what the main
thread does between segments: it waits 0.3 ms (sleeps: as featurize's parent while a GPU computes and the decode
workers fill their pipes) or it computes 0.3 ms (spins Python: as a parent that runs the CNN itself, on the CPU).
Two rounds, taken in turn.

    .venv/bin/python bench/writer_thread_bench.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featseq.featurize.cache import string_widths  # noqa: E402
from featseq.featurize.writer import CacheWriter  # noqa: E402

ROWS = [{"id": f"s{i:05d}", "label": "a", "group": "g", "path": "/v.mp4"} for i in range(4000)]


def between_segments(regime: str) -> None:
    if regime == "waits":
        time.sleep(0.0003)
        return
    end = time.perf_counter() + 0.0003
    while time.perf_counter() < end:
        pass


def run(regime: str, background: bool) -> tuple[float, float]:
    x = np.ones((10, 512), "float16")
    with tempfile.TemporaryDirectory() as d:
        inside, t0 = 0.0, time.perf_counter()
        with CacheWriter(f"{d}/c.h5", {"fps": 5.0}, {}, 512, string_widths(ROWS), group_seconds=0.05,
                         background=background) as w:
            for r in ROWS:
                t = time.perf_counter()
                w.append(r, x, np.arange(10.0))
                w.publish_due()
                inside += time.perf_counter() - t
                between_segments(regime)
        return inside, time.perf_counter() - t0


def main() -> None:
    for rnd in range(2):
        for regime in ("waits", "computes"):
            for background in (False, True):
                inside, total = run(regime, background)
                print(f"round {rnd}, main thread {regime}, commits on the {'writer' if background else 'main'} thread: "
                      f"{inside:.2f} s inside the writer of {total:.2f} s", flush=True)


if __name__ == "__main__":
    main()
